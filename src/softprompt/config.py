"""Typed settings for every command, validated where they are created.

Each field's ``help`` metadata is the text of its ``--flag`` in the CLI, so the
Python API and the command line describe the same thing in the same words.
"""

from __future__ import annotations

import math
import string
from dataclasses import dataclass, field, fields
from pathlib import Path

from softprompt.errors import ConfigError

EMBEDDED_MODEL = "embedded"
INIT_CHOICES = ("random", "text", "vocab")
DTYPE_CHOICES = ("float32", "bfloat16")
CHOICE_LOSSES = ("restricted", "full")


def parse_choices(text: str) -> list[str]:
    """'negative,positive' -> ['negative', 'positive']; fewer than two is a ConfigError."""
    choices = [c.strip() for c in text.split(",") if c.strip()]
    if len(choices) < 2 or len(set(choices)) < len(choices):
        raise ConfigError(
            f"--choices {text!r} must name two or more different labels, comma-separated, "
            "e.g. 'negative,positive'"
        )
    return choices


def template_fields(template: str) -> list[str]:
    """The ``{names}`` a template uses; a malformed template is a ConfigError naming --template."""
    try:
        names = [name for _, name, _, _ in string.Formatter().parse(template) if name is not None]
    except ValueError as err:
        raise ConfigError(
            f"--template {template!r} is malformed ({err}); write {{input}} or {{field}} for "
            "values and {{ }} for literal braces"
        ) from None
    bad = [n for n in names if not n.isidentifier()]
    if bad:
        raise ConfigError(
            f"--template {template!r} has the field {{{bad[0]}}}; name a field, e.g. {{input}}"
        )
    return names


def opt(default, help: str, **extra):  # noqa: A002 - mirrors argparse's name
    """A dataclass field whose ``help`` becomes the CLI flag's help."""
    return field(default=default, metadata={"help": help, **extra})


@dataclass
class ModelConfig:
    """Which frozen base model to load, and how."""

    model: str = opt(
        EMBEDDED_MODEL,
        "Base model: a Hugging Face id (needs the network the first time), a local folder, "
        "a .gguf file, or 'embedded' for the bundled Gemma 3 270M that works offline.",
    )
    dtype: str = opt(
        "float32",
        "Precision of the frozen model's weights. The soft prompt itself always stays float32.",
        choices=DTYPE_CHOICES,
    )
    trust_remote_code: bool = opt(
        False, "Allow a hub model to run its own Python code. Only for models you trust."
    )

    def __post_init__(self) -> None:
        if self.dtype not in DTYPE_CHOICES:
            raise ConfigError(
                f"--dtype must be one of {', '.join(DTYPE_CHOICES)}, not {self.dtype!r}"
            )


@dataclass
class DataConfig:
    """Where the examples come from and how they become token sequences."""

    data: str = opt(
        "",
        "Training data: a .jsonl, .csv, .tsv or .txt file, or hf:NAME[,CONFIG][:SPLIT] for a "
        "Hugging Face data set (needs the network and the 'hub' extra).",
        required=True,
    )
    validation: str | None = opt(
        None, "Validation data in the same format. Default: a --val-fraction of --data."
    )
    val_fraction: float = opt(
        0.1, "Fraction of --data held out for validation when --validation is not given (0 = none)."
    )
    input_field: str = opt("input", "Field holding the model's input in input/target pairs.")
    target_field: str = opt("target", "Field holding the text the model should produce.")
    text_field: str | None = opt(
        None, "Field of plain text (loss on every token). Setting it selects plain-text mode."
    )
    template: str | None = opt(
        None,
        "Template for the input, with {input} (or any field name) in braces, e.g. "
        "'Review: {input}\\nSentiment:' (\\n and \\t are read as newline and tab). "
        "Default: the input as it is.",
        escapes=True,
    )
    target_delimiter: str = opt(
        " ",
        "Put between input and target unless the input already ends in whitespace.",
        escapes=True,
    )
    max_length: int = opt(
        256,
        "Most tokens per row, virtual tokens included. Longer rows are cut (the input's start "
        "first, so the target survives) and counted in a warning.",
    )

    def __post_init__(self) -> None:
        if self.template is not None:
            template_fields(self.template)
        if not 0.0 <= self.val_fraction < 1.0:
            raise ConfigError(f"--val-fraction must be in [0, 1), not {self.val_fraction}")
        if self.max_length < 2:
            raise ConfigError(f"--max-length must be at least 2, not {self.max_length}")


@dataclass
class PromptConfig:
    """Shape and starting point of the soft prompt."""

    num_virtual_tokens: int = opt(
        20,
        "Number of virtual tokens. 20 is where Lester et al. (2021) saw most of the gain; "
        "longer prompts cost compute on every row.",
    )
    init: str = opt(
        "vocab",
        "Initial values: 'random' (normal, scaled like real token embeddings), 'text' (the "
        "embeddings of --init-text, repeated or cut), 'vocab' (embeddings of common tokens "
        "drawn at random), or a folder holding a saved prompt.",
    )
    init_text: str | None = opt(
        None, "Phrase for --init text, e.g. 'Classify the sentiment of this review'."
    )

    def __post_init__(self) -> None:
        if self.num_virtual_tokens < 1:
            raise ConfigError(
                f"--num-virtual-tokens must be at least 1, not {self.num_virtual_tokens}"
            )
        if self.init not in INIT_CHOICES and not Path(self.init).is_dir():
            raise ConfigError(
                f"--init must be one of {', '.join(INIT_CHOICES)} or a folder with a saved prompt; "
                f"{self.init!r} is neither"
            )
        if self.init == "text" and not self.init_text:
            raise ConfigError("--init text needs --init-text 'a phrase describing the task'")


@dataclass
class TrainConfig:
    """Everything `softprompt train` needs."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    prompt: PromptConfig = field(default_factory=PromptConfig)
    output: str = opt("", "Folder for the trained prompt, metrics, plot and checkpoints.")
    epochs: int = opt(3, "Passes over the training data (ignored when --max-steps is set).")
    max_steps: int | None = opt(None, "Stop after this many optimizer steps instead of --epochs.")
    batch_size: int = opt(8, "Rows per forward pass.")
    grad_accum: int = opt(1, "Forward passes per optimizer step (effective batch = both).")
    lr: float = opt(
        3e-2, "Peak learning rate of AdamW. Soft prompts need much larger rates than weights."
    )
    weight_decay: float = opt(0.0, "AdamW weight decay on the prompt (0 keeps it free).")
    warmup_ratio: float = opt(0.06, "Fraction of the steps spent warming the rate up from 0.")
    max_grad_norm: float | None = opt(1.0, "Clip the prompt's gradient norm (none to disable).")
    seed: int = opt(0, "Seed for initialisation, the split and data order.")
    eval_every: int | None = opt(None, "Also run validation every K steps (default: each epoch).")
    save_every: int | None = opt(None, "Also checkpoint every K steps (default: each epoch).")
    patience: int | None = opt(
        None, "Stop after this many validations without improvement (default: never)."
    )
    choices: str | None = opt(
        None,
        "Classification mode: the comma-separated label words, e.g. 'negative,positive'. The "
        "targets must be these words.",
    )
    choice_loss: str = opt(
        "restricted",
        "With --choices: 'restricted' puts the softmax over the choices' first tokens at the "
        "answer position only (the default: 0.96 vs 0.54 validation accuracy after one epoch "
        "on the sentiment example, docs/measurements.md); 'full' keeps the whole-vocabulary "
        "loss on every target token, which also teaches the prompt to generate the label.",
        choices=CHOICE_LOSSES,
    )
    task_field: str | None = opt(
        None,
        "Multi-task training: the field naming each record's task. One prompt per task is "
        "trained in this run, the tasks mixed in batches, and each is saved in OUTPUT/<task>/ "
        "(serve them all with `softprompt serve --prompts OUTPUT`).",
    )
    shard_model: bool = opt(
        False,
        "With several processes (torchrun / accelerate launch): split the frozen model's "
        "decoder layers across them with PyTorch FSDP2, for base models too large for one "
        "device. Embeddings and LM head stay whole on each process. Same results as without.",
    )
    resume: bool = opt(False, "Continue the run in --output from its last good checkpoint.")
    overwrite: bool = opt(False, "Replace an earlier run in --output instead of refusing.")

    def __post_init__(self) -> None:
        for name in ("epochs", "batch_size", "grad_accum"):
            if getattr(self, name) < 1:
                raise ConfigError(f"--{name.replace('_', '-')} must be at least 1")
        if self.max_steps is not None and self.max_steps < 1:
            raise ConfigError("--max-steps must be at least 1")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ConfigError(f"--lr must be a positive number, not {self.lr}")
        if not 0.0 <= self.warmup_ratio < 1.0:
            raise ConfigError(f"--warmup-ratio must be in [0, 1), not {self.warmup_ratio}")
        if self.data.max_length <= self.prompt.num_virtual_tokens + 1:
            raise ConfigError(
                f"--max-length {self.data.max_length} leaves no room for text after "
                f"{self.prompt.num_virtual_tokens} virtual tokens; raise --max-length or lower "
                "--num-virtual-tokens"
            )
        if not self.data.data:
            raise ConfigError("--data is required: a .jsonl, .csv, .tsv or .txt file")
        if self.choices is not None:
            parse_choices(self.choices)
        if self.choice_loss not in CHOICE_LOSSES:
            raise ConfigError(f"--choice-loss must be one of {', '.join(CHOICE_LOSSES)}")


@dataclass
class GenerateConfig:
    """Settings of `softprompt generate`."""

    max_new_tokens: int = opt(32, "Most tokens to generate per input.")
    temperature: float = opt(0.0, "Sampling temperature; 0 means greedy decoding.")
    top_p: float = opt(1.0, "Nucleus sampling: keep the smallest set of tokens with this mass.")
    repetition_penalty: float = opt(1.0, "Above 1 discourages repeating tokens (1 = off).")
    seed: int = opt(0, "Seed for sampling.")
    batch_size: int = opt(8, "Inputs generated together.")

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ConfigError("--max-new-tokens must be at least 1")
        if self.temperature < 0:
            raise ConfigError("--temperature must be 0 (greedy) or positive")
        if not 0.0 < self.top_p <= 1.0:
            raise ConfigError("--top-p must be in (0, 1]")
        if self.repetition_penalty <= 0:
            raise ConfigError("--repetition-penalty must be positive")
        if self.batch_size < 1:
            raise ConfigError("--batch-size must be at least 1")


@dataclass
class ServeConfig:
    """Settings of `softprompt serve`."""

    prompts: str = opt(
        "",
        "Folder of saved prompts, one sub-folder each; the sub-folder's name is the prompt's "
        "model name in the API.",
        required=True,
    )
    model: str | None = opt(
        None,
        "Base model (a hub id, folder, .gguf or 'embedded'). Default: the model the prompts "
        "were trained on, else 'embedded'.",
    )
    dtype: str = opt("float32", "Precision of the base model's weights.", choices=DTYPE_CHOICES)
    host: str = opt("127.0.0.1", "Address to listen on (0.0.0.0 accepts other machines).")
    port: int = opt(8000, "Port to listen on.")
    max_batch_size: int = opt(16, "Most rows generated together; also most prompts per request.")
    batch_wait_ms: float = opt(5.0, "How long a batch waits for more requests, in milliseconds.")
    max_prompt_tokens: int = opt(2048, "Longest input accepted (virtual tokens included).")
    max_tokens: int = opt(512, "Largest max_tokens a request may ask for.")
    max_queue: int = opt(256, "Most rows waiting; requests beyond it get 429.")
    allow_mismatch: bool = opt(False, "Load prompts trained for another base model.")

    def __post_init__(self) -> None:
        for flag in ("port", "max_batch_size", "max_prompt_tokens", "max_tokens", "max_queue"):
            if getattr(self, flag) < (0 if flag == "port" else 1):
                raise ConfigError(f"--{flag.replace('_', '-')} must be positive")
        if self.batch_wait_ms < 0:
            raise ConfigError("--batch-wait-ms must be 0 or more")
        if self.dtype not in DTYPE_CHOICES:
            raise ConfigError(f"--dtype must be one of {', '.join(DTYPE_CHOICES)}")


def flat_fields(cls) -> list:
    """The leaf fields of a config, nested configs expanded (for the CLI)."""
    out = []
    for f in fields(cls):
        if f.metadata.get("help") is None:
            out.extend(flat_fields(f.default_factory))  # a nested config
        else:
            out.append(f)
    return out


@dataclass
class EvalConfig:
    """Everything `softprompt eval` needs."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    prompt: str | None = opt(
        None,
        "Folder of a trained prompt. Its base model, template and choices are used unless "
        "given here. Without it the bare base model is measured.",
    )
    choices: str | None = opt(
        None,
        "Classification: comma-separated label words; the prediction is the one with the "
        "highest log-likelihood as a continuation of the input.",
    )
    length_norm: bool = opt(
        False, "Score each choice by its mean log-likelihood per token instead of the sum."
    )
    generate: bool = opt(
        False, "Also generate an answer per input (greedy) and score it against the target."
    )
    shots: int = opt(
        0,
        "Few-shot baseline: put K examples of --shots-data before each input (fewer if they do "
        "not fit --context). 0 = zero-shot.",
    )
    shots_data: str | None = opt(None, "Where the few-shot examples come from (training data).")
    context: int = opt(1024, "Most tokens per scored row, few-shot examples included.")
    limit: int | None = opt(None, "Use only the first N examples of --data.")
    batch_size: int = opt(8, "Rows per forward pass.")
    max_new_tokens: int = opt(16, "Most tokens generated per input with --generate.")
    seed: int = opt(0, "Seed for picking few-shot examples.")
    output: str | None = opt(
        None, "Folder for results.json (and generations.jsonl). Default: only print the table."
    )

    def __post_init__(self) -> None:
        if not self.data.data:
            raise ConfigError("--data is required: the .jsonl, .csv, .tsv or .txt file to measure")
        if self.choices is not None:
            parse_choices(self.choices)
        if self.shots < 0:
            raise ConfigError("--shots must be 0 or more")
        if self.shots and not self.shots_data:
            raise ConfigError("--shots needs --shots-data FILE (the examples to show)")
        if self.batch_size < 1 or self.max_new_tokens < 1 or self.context < 8:
            raise ConfigError("--batch-size, --max-new-tokens must be >= 1 and --context >= 8")
        if self.limit is not None and self.limit < 1:
            raise ConfigError("--limit must be at least 1")


COMPARE_METHODS = ("zero-shot", "few-shot", "prompt-tuning", "lora", "full-ft")


@dataclass
class CompareConfig:
    """Everything `softprompt compare` needs: one data set, five ways to adapt a model."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    test: str = opt("", "Test data, same format as --data: every method is measured on it.")
    output: str = opt("", "Folder for report.md, report.html, metrics.jsonl and artifacts.")
    choices: str | None = opt(
        None, "Classification: comma-separated label words (quality = accuracy). Else: loss."
    )
    choice_loss: str = opt(
        "restricted",
        "With --choices: the training loss of every trained method (see `train --choice-loss`).",
        choices=CHOICE_LOSSES,
    )
    methods: str = opt(",".join(COMPARE_METHODS), "Comma-separated methods to run, in order.")
    steps: int = opt(30, "Step budget of every trained method (prompt tuning, LoRA, full FT).")
    batch_size: int = opt(8, "Rows per step for the trained methods, and per scoring pass.")
    shots: int = opt(8, "Few-shot: examples in the hard prompt (fewer if they do not fit).")
    context: int = opt(1024, "Most tokens per scored row, few-shot examples included.")
    num_virtual_tokens: int = opt(20, "Prompt tuning: number of virtual tokens.")
    prompt_lr: float = opt(3e-2, "Prompt tuning: learning rate.")
    lora_r: int = opt(8, "LoRA: rank of the adapters on every linear layer.")
    lora_lr: float = opt(1e-3, "LoRA: learning rate.")
    full_lr: float = opt(2e-5, "Full fine-tuning: learning rate.")
    limit: int | None = opt(None, "Use only the first N test examples.")
    seed: int = opt(0, "Seed for every method.")
    overwrite: bool = opt(False, "Replace an earlier comparison in --output.")

    def __post_init__(self) -> None:
        if not self.data.data or not self.test:
            raise ConfigError("compare needs --data (training) and --test files")
        if not self.output:
            raise ConfigError("--output is required: the folder for the report")
        bad = [m for m in self.method_list() if m not in COMPARE_METHODS]
        if bad or not self.method_list():
            raise ConfigError(
                f"--methods: unknown {', '.join(bad) or 'empty list'}; choose from "
                + ", ".join(COMPARE_METHODS)
            )
        if self.choices is not None:
            parse_choices(self.choices)
        if min(self.steps, self.batch_size, self.num_virtual_tokens, self.lora_r) < 1:
            raise ConfigError("--steps, --batch-size, --num-virtual-tokens, --lora-r must be >= 1")

    def method_list(self) -> list[str]:
        return [m.strip() for m in self.methods.split(",") if m.strip()]


@dataclass
class SweepConfig:
    """Everything `softprompt sweep` needs: a small grid of prompt-tuning recipes."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    output: str = opt("", "Folder for one run per recipe, sweep.jsonl and sweep.md.")
    lrs: str = opt("3e-3,3e-2,3e-1", "Comma-separated learning rates to try.")
    inits: str = opt("vocab,random", "Comma-separated initialisations to try.")
    lengths: str = opt("20", "Comma-separated prompt lengths (virtual tokens) to try.")
    steps: int = opt(30, "Optimizer steps per recipe (validated at the end).")
    batch_size: int = opt(8, "Rows per step.")
    choices: str | None = opt(
        None, "Classification: label words; recipes are also ranked by validation accuracy."
    )
    generate: bool = opt(
        False, "Generation task: also score greedy answers on validation (exact match, chrF)."
    )
    seed: int = opt(0, "Seed of every run.")
    overwrite: bool = opt(False, "Replace an earlier sweep in --output.")

    def __post_init__(self) -> None:
        if not self.data.data or not self.output:
            raise ConfigError("sweep needs --data and --output")
        try:
            lrs = [float(x) for x in self.lrs.split(",")]
            lengths = [int(x) for x in self.lengths.split(",")]
        except ValueError:
            raise ConfigError(
                "--lrs takes numbers and --lengths integers, comma-separated"
            ) from None
        if not all(lr > 0 for lr in lrs) or not all(n >= 1 for n in lengths):
            raise ConfigError("--lrs must be positive and --lengths at least 1")
        for init in self.inits.split(","):
            PromptConfig(init=init.strip(), init_text="x")  # validates the name
        if self.choices is not None:
            parse_choices(self.choices)
        if self.steps < 1 or self.batch_size < 1:
            raise ConfigError("--steps and --batch-size must be at least 1")
