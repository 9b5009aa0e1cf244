"""Typed settings for every command, validated where they are created.

Each field's ``help`` metadata is the text of its ``--flag`` in the CLI, so the Python API
and the command line describe the same thing in the same words. A nested config (a
``ModelConfig`` inside ``ServeConfig``) contributes its flags to its parent's command;
``nested(...)`` can pick and reorder those flags and word them for that command.

Comma-separated options (``choices``, ``methods``, ``lrs``, ...) keep the text the user gave
(it is what results files record); the one parser of each is a property beside it
(``choice_list``, ``method_list``, ...), checked in ``__post_init__`` and used by the code.
"""

from __future__ import annotations

import math
import os
import typing
from collections.abc import Callable
from dataclasses import MISSING, dataclass, field, fields
from pathlib import Path
from typing import Any, Literal

from softprompt.errors import SWITCHES, ConfigError
from softprompt.templates import POSITIONS, PromptFormat, template_fields

EMBEDDED_MODEL = "embedded"
EMBEDDED_CHAT_MODEL = "embedded-chat"  # SmolLM2-135M-Instruct, for conversations
EMBEDDED_ENCODER_MODEL = "embedded-encoder"  # all-MiniLM-L6-v2, a BERT-family encoder
INIT_CHOICES = ("auto", "random", "text", "vocab")
LIBRARY = "library:"  # --init library:DIR, a folder of saved prompts to transfer from
Dtype = Literal["float32", "bfloat16", "auto"]
ChoiceLoss = Literal["restricted+rest", "restricted", "full"]
Reparam = Literal["none", "residual"]
PromptPosition = Literal["start", "after-system", "before-user"]
LossOn = Literal["all-assistant", "last-assistant"]
ModelTask = Literal["auto", "causal", "seq2seq", "classify"]
DTYPE_CHOICES = typing.get_args(Dtype)
CHOICE_LOSSES = typing.get_args(ChoiceLoss)
REPARAMS = typing.get_args(Reparam)
CHOICES_AUTO, CHOICES_NONE = "auto", "none"
MIN_TEMPERATURE = 0.01  # sampling below it overflows: use 0 (greedy)
MAX_BATCH_WAIT_MS = 60_000.0


def opt(default, help: str, **extra):  # noqa: A002 - mirrors argparse's name
    """A dataclass field whose ``help`` becomes the CLI flag's help. ``extra`` may hold
    ``required``, ``escapes`` (read \\n and \\t), ``positional``, ``metavar``."""
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata={"help": help, **extra})
    return field(default=default, metadata={"help": help, **extra})


def nested(
    factory: Callable[[], object],
    only: tuple[str, ...] | None = None,
    help: dict[str, str] | None = None,  # noqa: A002
):
    """A nested config field. ``only`` names the sub-fields that become flags of this
    command, in this order (default: all, in their own order); ``help`` rewords some."""
    return field(default_factory=factory, metadata={"nested": True, "only": only, "help_for": help})


def check_choice(value: object, allowed: tuple, flag: str) -> None:
    if value not in allowed:
        raise ConfigError(f"{flag} must be one of {', '.join(allowed)}, not {value!r}")


def check_finite(cfg: object) -> None:
    """Every float setting of ``cfg`` is a finite number (nan and inf pass ``<`` checks)."""
    for f in fields(cfg):
        value = getattr(cfg, f.name)
        if isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"--{f.name.replace('_', '-')} must be a finite number, not {value}")


def parse_list(text: str | list | tuple, flag: str, convert: Callable = str) -> list:
    """'a,b' (or an already split list) -> [convert('a'), convert('b')]."""
    items = text.split(",") if isinstance(text, str) else list(text)
    try:
        return [convert(x.strip() if isinstance(x, str) else x) for x in items if str(x).strip()]
    except ValueError:
        raise ConfigError(f"{flag} {text!r}: expected comma-separated values") from None


def parse_choices(text: str | list[str]) -> list[str]:
    """'negative,positive' -> ['negative', 'positive']; fewer than two is a ConfigError."""
    choices = parse_list(text, "--choices")
    if len(choices) < 2 or len(set(choices)) < len(choices):
        raise ConfigError(
            f"--choices {text!r} must name two or more different labels, comma-separated, "
            "e.g. 'negative,positive'"
        )
    return choices


@dataclass
class ModelConfig:
    """Which frozen base model to load, and how."""

    model: str | None = opt(
        EMBEDDED_MODEL,
        "Base model: a Hugging Face id (needs the network the first time), a local folder, "
        "a .gguf file, or 'embedded' for the bundled Gemma 3 270M that works offline "
        "('embedded-chat': the bundled SmolLM2-135M-Instruct, for conversations; "
        "'embedded-encoder': the bundled all-MiniLM-L6-v2 encoder, for --task classify).",
    )
    task: ModelTask = opt(
        "auto",
        "What kind of model this is: causal (a decoder LM), seq2seq (an encoder-decoder such as "
        "T5 or BART: the prompt goes before the encoder's input) or classify (a BERT-style "
        "encoder with a classification head trained beside the prompt). auto: from the "
        "model's config.",
    )
    dtype: Dtype = opt(
        "float32",
        "Precision of the frozen model's weights. The soft prompt itself always stays float32. "
        "'auto': bfloat16 where the hardware computes it natively (a CUDA GPU with bf16, a CPU "
        "with AVX-512 BF16 or AMX), float32 elsewhere; bfloat16 matched float32's accuracy "
        "on the shipped tasks (docs/measurements.md) at 2-4x the speed.",
    )
    trust_remote_code: bool = opt(
        False, "Allow a hub model to run its own Python code. Only for models you trust."
    )

    def __post_init__(self) -> None:
        check_finite(self)
        check_choice(self.dtype, DTYPE_CHOICES, "--dtype")
        check_choice(self.task, typing.get_args(ModelTask), "--task")


def prompt_model() -> ModelConfig:
    """A model config whose default is the model a saved prompt was trained on (None)."""
    return ModelConfig(model=None)


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
    prompt_position: PromptPosition = opt(
        "start",
        "Where the virtual tokens go in a conversation: 'start' (before everything, as PEFT "
        "puts them), 'after-system' (right after the system message's text) or 'before-user' "
        "(just before the first user turn). In a raw --template write {soft_prompt} where "
        "they go instead.",
    )
    chat_template: str | None = opt(
        None,
        'Conversations ({"messages": [...]} records): a Jinja chat template file to render '
        "them with. Default: the model's own.",
    )
    system: str | None = opt(
        None,
        "Conversations: the system message for those that have none (e.g. a task description; "
        "with eval, the system-prompt baseline).",
        escapes=True,
    )
    loss_on: LossOn = opt(
        "all-assistant",
        "Conversations: learn every assistant turn or only the last, each with its "
        "end-of-turn token.",
    )

    def __post_init__(self) -> None:
        check_finite(self)
        if self.template is not None:
            template_fields(self.template)
        check_choice(self.prompt_position, POSITIONS, "--prompt-position")
        check_choice(self.loss_on, typing.get_args(LossOn), "--loss-on")
        if self.chat_template is not None and not Path(self.chat_template).is_file():
            raise ConfigError(f"--chat-template {self.chat_template}: no such file")
        if not 0.0 <= self.val_fraction < 1.0:
            raise ConfigError(f"--val-fraction must be in [0, 1), not {self.val_fraction}")
        if self.max_length < 2:
            raise ConfigError(f"--max-length must be at least 2, not {self.max_length}")

    def prompt_format(self, chat: bool = False) -> PromptFormat:
        """The format these settings describe (``chat``: for conversations)."""
        if chat and self.template is not None:
            raise ConfigError(
                "--template is for input/target pairs and text; conversations are rendered by "
                "the chat template (--chat-template), the prompt placed by --prompt-position"
            )
        template = None
        if chat and self.chat_template is not None:
            template = Path(self.chat_template).read_text(encoding="utf-8")
        return PromptFormat(
            template=None if chat else self.template,
            input_field=self.input_field,
            target_delimiter=self.target_delimiter,
            chat=chat,
            chat_template=template,
            position=self.prompt_position,
            system=self.system,
        )


@dataclass
class PromptConfig:
    """Shape and starting point of the soft prompt."""

    num_virtual_tokens: int = opt(
        20,
        "Number of virtual tokens. 20 is where Lester et al. (2021) saw most of the gain; "
        "longer prompts cost compute on every row.",
    )
    init: str = opt(
        "auto",
        "Initial values: 'auto' (the task's own words: the label words and the template's or "
        "system prompt's words, repeated to fill the prompt; 'vocab' when there are none), "
        "'random' (normal, scaled like real token embeddings), 'text' (the embeddings of "
        "--init-text, repeated or cut), 'vocab' (embeddings of common tokens drawn at random), "
        "'library:DIR' (score every saved prompt in DIR on a few training batches and start "
        "from the best), or a folder holding a saved prompt (hf:owner/name: one on the Hugging "
        "Face Hub).",
    )
    init_text: str | None = opt(
        None, "Phrase for --init text, e.g. 'Classify the sentiment of this review'."
    )

    def __post_init__(self) -> None:
        check_finite(self)
        if self.num_virtual_tokens < 1:
            raise ConfigError(
                f"--num-virtual-tokens must be at least 1, not {self.num_virtual_tokens}"
            )
        if self.library is not None:
            if not Path(self.library).is_dir():
                raise ConfigError(f"--init {self.init}: {self.library} is not a folder")
        elif (
            self.init not in INIT_CHOICES
            and not self.init.startswith("hf:")
            and not Path(self.init).is_dir()
        ):
            raise ConfigError(
                "--init must be one of random, text, vocab or a folder with a saved prompt, or "
                f"'auto' or 'library:DIR'; {self.init!r} is none of these"
            )
        if self.init == "text" and not self.init_text:
            raise ConfigError("--init text needs --init-text 'a phrase describing the task'")

    @property
    def from_folder(self) -> bool:
        """Whether ``init`` names a saved prompt's folder."""
        return self.init not in INIT_CHOICES and self.library is None

    @property
    def library(self) -> str | None:
        """The folder of ``--init library:DIR`` (None for any other init)."""
        return self.init[len(LIBRARY) :] if self.init.startswith(LIBRARY) else None


@dataclass
class TrainConfig:
    """Everything `softprompt train` needs."""

    model: ModelConfig = nested(ModelConfig)
    data: DataConfig = nested(DataConfig)
    prompt: PromptConfig = nested(PromptConfig)
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
        CHOICES_AUTO,
        "Classification mode: the comma-separated label words, e.g. 'negative,positive' (the "
        "targets must be these words); 'auto' (the default) detects a small label set in the "
        "targets (at most 10 distinct strings of at most 3 words, each seen more than once) "
        "and says so; 'none' turns classification mode off.",
    )
    choice_loss: ChoiceLoss = opt(
        "restricted+rest",
        "With choices: 'restricted+rest' (the default) is a softmax over the choices' first "
        "tokens plus one 'rest' logit standing for every other token, at the answer position "
        "only, so the prompt also learns to put the probability on the labels; 'restricted' "
        "leaves the rest out; 'full' keeps the whole-vocabulary loss on every target token "
        "(docs/measurements.md compares them).",
    )
    reparam: Reparam = opt(
        "none",
        "'residual' (Razdaibiedina et al. 2023) trains the prompt through a bottleneck MLP "
        "with a skip connection, P + LayerNorm(MLP(P)); only the mapped prompt is saved, so "
        "the artifact stays a plain prompt. 'none' trains P directly.",
    )
    reparam_hidden: int = opt(128, "With --reparam residual: the MLP's bottleneck width.")
    ensemble: int = opt(
        1,
        "Train K prompts with seeds SEED..SEED+K-1 in one run (one model pass per batch, every "
        "row repeated per prompt); saved as OUTPUT/member-I/ plus ensemble.json, which eval "
        "and serve read as one voting model.",
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
    report_to: str = opt(
        "none",
        "Also send the config, every logged value and the loss plot to trackers, "
        "comma-separated: tensorboard (OUTPUT/tensorboard), wandb, mlflow, trackio, csv "
        "(OUTPUT/metrics.csv), or none. metrics.jsonl is always written.",
    )
    resume: bool = opt(False, "Continue the run in --output from its last good checkpoint.")
    overwrite: bool = opt(False, "Replace an earlier run in --output instead of refusing.")

    def __post_init__(self) -> None:
        check_finite(self)
        from softprompt.tracking import report_targets

        report_targets(self.report_to)  # known names, packages installed
        for name in ("epochs", "batch_size", "grad_accum"):
            if getattr(self, name) < 1:
                raise ConfigError(f"--{name.replace('_', '-')} must be at least 1")
        if self.max_steps is not None and self.max_steps < 1:
            raise ConfigError("--max-steps must be at least 1")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ConfigError(f"--lr must be a positive number, not {self.lr}")
        if not 0.0 <= self.warmup_ratio < 1.0:
            raise ConfigError(f"--warmup-ratio must be in [0, 1), not {self.warmup_ratio}")
        if self.weight_decay < 0 or (self.max_grad_norm is not None and self.max_grad_norm <= 0):
            raise ConfigError("--weight-decay must be 0 or more and --max-grad-norm positive")
        if self.data.max_length <= self.prompt.num_virtual_tokens + 1:
            raise ConfigError(
                f"--max-length {self.data.max_length} leaves no room for text after "
                f"{self.prompt.num_virtual_tokens} virtual tokens; raise --max-length or lower "
                "--num-virtual-tokens"
            )
        if not self.data.data:
            raise ConfigError("--data is required: a .jsonl, .csv, .tsv or .txt file")
        _ = self.choice_list
        check_choice(self.choice_loss, CHOICE_LOSSES, "--choice-loss")
        check_choice(self.reparam, REPARAMS, "--reparam")
        if self.reparam_hidden < 1:
            raise ConfigError("--reparam-hidden must be at least 1")
        if self.ensemble < 1:
            raise ConfigError("--ensemble must be at least 1")
        if self.ensemble > 1 and self.task_field:
            raise ConfigError("--ensemble and --task-field cannot be combined yet; pick one")

    @property
    def choice_list(self) -> list[str] | None:
        """--choices as a list of labels (None: not given, 'auto' or 'none')."""
        if self.choices is None or self.choices in (CHOICES_AUTO, CHOICES_NONE):
            return None
        return parse_choices(self.choices)

    @property
    def auto_choices(self) -> bool:
        """Whether the label set is to be detected from the data (``--choices auto``)."""
        return self.choices == CHOICES_AUTO

    @property
    def restricted_choices(self) -> list[str] | None:
        """The label words of the restricted classification loss, or None (the full loss)."""
        return self.choice_list if self.choice_loss != "full" else None


@dataclass
class GenerateConfig:
    """Sampling settings of `softprompt generate` (and of ``softprompt.generate``)."""

    max_new_tokens: int = opt(32, "Most tokens to generate per input.")
    temperature: float = opt(0.0, "Sampling temperature; 0 means greedy decoding.")
    top_p: float = opt(1.0, "Nucleus sampling: keep the smallest set of tokens with this mass.")
    repetition_penalty: float = opt(1.0, "Above 1 discourages repeating tokens (1 = off).")
    seed: int = opt(0, "Seed for sampling.")
    batch_size: int = opt(8, "Inputs generated together.")

    def __post_init__(self) -> None:
        check_finite(self)
        if self.max_new_tokens < 1:
            raise ConfigError("--max-new-tokens must be at least 1")
        if self.temperature < 0 or 0 < self.temperature < MIN_TEMPERATURE:
            raise ConfigError(
                f"--temperature must be 0 (greedy) or at least {MIN_TEMPERATURE} (a smaller one "
                "divides the scores into inf)"
            )
        if not 0.0 < self.top_p <= 1.0:
            raise ConfigError("--top-p must be in (0, 1]")
        if self.repetition_penalty <= 0:
            raise ConfigError("--repetition-penalty must be positive")
        if self.batch_size < 1:
            raise ConfigError("--batch-size must be at least 1")


@dataclass
class GenerateRunConfig:
    """Everything `softprompt generate` needs: inputs, an optional prompt, sampling."""

    texts: list[str] = opt([], "inputs to continue", positional=True, metavar="TEXT")
    prompt: str | None = opt(
        None, "folder of a trained prompt (ours or a PEFT adapter), or hf:owner/name on the Hub"
    )
    compare: bool = opt(False, "print the base model's output beside the tuned one's")
    file: str | None = opt(None, "also read inputs from a data file (its input field)")
    input_field: str | None = opt(
        None, "field of --file holding the inputs (default: the prompt's, or 'input')"
    )
    limit: int | None = opt(None, "use only the first N rows of --file")
    template: str | None = opt(
        None,
        "template for the inputs (default: the one the prompt was trained with)",
        escapes=True,
    )
    no_template: bool = opt(False, "use the inputs as they are")
    field: list[str] = opt(
        [],
        "NAME=VALUE for a field of the template other than the input (repeat for several); "
        "with --file the records' own fields are used too",
        metavar="NAME=VALUE",
    )
    chat: bool = opt(
        False,
        "treat each TEXT as a user message and render it with the chat template (automatic for "
        'a prompt trained on conversations); --file may hold {"messages": [...]} records',
    )
    system: str | None = opt(
        None,
        "with --chat: the system message (default: the prompt's, else the template's own)",
        escapes=True,
    )
    allow_mismatch: bool = opt(False, "load a prompt even if it was trained for another base model")
    model: ModelConfig = nested(
        prompt_model,
        only=("dtype", "trust_remote_code", "model", "task"),
        help={
            "model": ModelConfig.__dataclass_fields__["model"].metadata["help"]
            + " Default: the model --prompt was trained on, else 'embedded'."
        },
    )
    sampling: GenerateConfig = nested(GenerateConfig)

    def __post_init__(self) -> None:
        check_finite(self)
        if self.compare and not self.prompt:
            raise ConfigError("--compare needs --prompt DIR (the tuned prompt to compare)")
        if self.limit is not None and self.limit < 1:
            raise ConfigError("--limit must be at least 1")
        if self.template is not None:
            template_fields(self.template)


@dataclass
class InspectConfig:
    """Everything `softprompt inspect` needs."""

    prompt_dir: str = opt(
        "", "folder of a trained prompt, or hf:owner/name", positional=True, metavar="DIR"
    )
    top_k: int = opt(5, "nearest tokens shown")
    similar: str | None = opt(
        None,
        "instead: rank the saved prompts under this folder by the cosine similarity of their "
        "mean embedding with DIR's (a prompt library, see `train --init library:DIR`)",
        metavar="LIBRARY",
    )
    model: ModelConfig = nested(
        prompt_model, only=("model",), help={"model": "base model (default: the prompt's own)"}
    )

    def __post_init__(self) -> None:
        check_finite(self)
        if self.top_k < 1:
            raise ConfigError("--top-k must be at least 1")
        if self.similar is not None and not Path(self.similar).is_dir():
            raise ConfigError(f"--similar {self.similar}: no such folder")


@dataclass
class ServeConfig:
    """Settings of `softprompt serve`."""

    prompts: str = opt(
        "",
        "Folder of saved prompts, one sub-folder each; the sub-folder's name is the prompt's "
        "model name in the API.",
        required=True,
    )
    model: ModelConfig = nested(
        prompt_model,
        only=("model", "dtype"),
        help={
            "model": "Base model (a hub id, folder, .gguf or 'embedded'). Default: the model "
            "the prompts were trained on, else 'embedded'.",
            "dtype": "Precision of the base model's weights.",
        },
    )
    host: str = opt("127.0.0.1", "Address to listen on (0.0.0.0 accepts other machines).")
    port: int = opt(8000, "Port to listen on.")
    max_batch_size: int = opt(16, "Most rows generated together; also most prompts per request.")
    batch_wait_ms: float = opt(5.0, "How long a batch waits for more requests, in milliseconds.")
    max_prompt_tokens: int = opt(2048, "Longest input accepted (virtual tokens included).")
    max_tokens: int = opt(512, "Largest max_tokens a request may ask for.")
    max_queue: int = opt(256, "Most rows waiting; requests beyond it get 429.")
    allow_mismatch: bool = opt(False, "Load prompts trained for another base model.")
    api_key: str | None = opt(
        None,
        "Require `Authorization: Bearer KEY` (what the openai client sends) on every route but "
        "/health. Default: $SOFTPROMPT_API_KEY when set. Needed to listen beyond this machine.",
    )
    no_admin: bool = opt(False, "Turn off the admin routes (/v1/prompts/NAME, /v1/rescan).")
    insecure: bool = opt(
        False, "Allow a --host other than this machine without --api-key (a trusted network only)."
    )
    max_request_bytes: int = opt(
        1 << 20, "Largest request body accepted; a larger one gets 413 before it is read."
    )

    def __post_init__(self) -> None:
        check_finite(self)
        for flag in ("port", "max_batch_size", "max_prompt_tokens", "max_tokens", "max_queue",
                     "max_request_bytes"):  # fmt: skip
            if getattr(self, flag) < (0 if flag == "port" else 1):
                raise ConfigError(f"--{flag.replace('_', '-')} must be positive")
        if not 0 <= self.batch_wait_ms <= MAX_BATCH_WAIT_MS:
            raise ConfigError(
                f"--batch-wait-ms must be 0 to {MAX_BATCH_WAIT_MS:g} (ms), not {self.batch_wait_ms}"
            )
        if self.port > 65535:
            raise ConfigError(f"--port must be 0 to 65535, not {self.port}")
        if self.api_key is None:
            self.api_key = os.environ.get("SOFTPROMPT_API_KEY") or None
        loopback = self.host in ("127.0.0.1", "localhost", "::1") or self.host.startswith("127.")
        if not loopback and not self.api_key and not self.insecure:
            raise ConfigError(
                f"--host {self.host} lets other machines in: give --api-key KEY (or set "
                "SOFTPROMPT_API_KEY), or pass --insecure if this network is trusted"
            )


ExportTarget = Literal["vllm", "sglang", "numpy"]
ExportDtype = Literal["float32", "bfloat16", "float16"]


@dataclass
class ExportConfig:
    """Everything `softprompt export` needs."""

    prompt_dir: str = opt(
        "", "folder of a trained prompt, or hf:owner/name", positional=True, metavar="DIR"
    )
    to: ExportTarget = opt(
        "vllm",
        "engine: vllm (prompt_embeds.pt and its base64 text for a prompt_embeds content part), "
        "sglang (input_embeds.json: JSON floats) or numpy (prompt_embeds.npy)",
    )
    output: str = opt("", "folder to write (new or empty)", required=True)
    dtype: ExportDtype = opt(
        "float32", "precision of the exported rows (numpy has no bfloat16: float32 or float16)"
    )
    overwrite: bool = opt(False, "replace an earlier export in --output (only its own files)")

    def __post_init__(self) -> None:
        check_finite(self)
        check_choice(self.to, typing.get_args(ExportTarget), "--to")
        check_choice(self.dtype, typing.get_args(ExportDtype), "--dtype")
        if not self.output:
            raise ConfigError("--output is required: the folder to write the export to")
        if self.to == "numpy" and self.dtype == "bfloat16":
            raise ConfigError("--to numpy cannot hold bfloat16; use --dtype float32 or float16")


@dataclass
class PushConfig:
    """Everything `softprompt push` needs."""

    prompt_dir: str = opt("", "folder of a trained prompt", positional=True, metavar="DIR")
    repo_id: str = opt(
        "", "Hugging Face Hub repository, owner/name (created if needed)", positional=True,
        metavar="REPO_ID",
    )  # fmt: skip
    private: bool = opt(False, "create the repository as private")
    token: str | None = opt(
        None, "Hub token (default: the one `hf auth login` saved, or $HF_TOKEN)"
    )
    message: str | None = opt(None, "commit message (default: 'softprompt push DIR')")

    def __post_init__(self) -> None:
        check_finite(self)
        parts = self.repo_id.split("/")
        if len(parts) != 2 or not all(parts) or self.repo_id.startswith("hf:"):
            raise ConfigError(f"REPO_ID {self.repo_id!r}: write owner/name, e.g. me/sentiment")


@dataclass
class EvalConfig:
    """Everything `softprompt eval` needs."""

    model: ModelConfig = nested(ModelConfig)
    data: DataConfig = nested(DataConfig)
    prompt: str | None = opt(
        None,
        "Folder of a trained prompt (or hf:owner/name on the Hugging Face Hub). Its base model, "
        "template and choices are used unless given here. Without it the bare base model is "
        "measured. An ensemble (`train --ensemble K`'s folder, or several prompt folders, "
        "comma-separated) votes.",
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

    @property
    def choice_list(self) -> list[str] | None:
        """--choices as a list of labels (None: no classification)."""
        return parse_choices(self.choices) if self.choices is not None else None

    def __post_init__(self) -> None:
        check_finite(self)
        if not self.data.data:
            raise ConfigError("--data is required: the .jsonl, .csv, .tsv or .txt file to measure")
        _ = self.choice_list
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

    model: ModelConfig = nested(ModelConfig)
    data: DataConfig = nested(DataConfig)
    test: str = opt("", "Test data, same format as --data: every method is measured on it.")
    output: str = opt("", "Folder for report.md, report.html, metrics.jsonl and artifacts.")
    choices: str | None = opt(
        None, "Classification: comma-separated label words (quality = accuracy). Else: loss."
    )
    choice_loss: ChoiceLoss = opt(
        "restricted+rest",
        "With --choices: the training loss of every trained method (see `train --choice-loss`).",
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

    @property
    def choice_list(self) -> list[str] | None:
        """--choices as a list of labels (None: quality is the loss)."""
        return parse_choices(self.choices) if self.choices is not None else None

    @property
    def method_list(self) -> list[str]:
        """--methods as a list, in order."""
        return parse_list(self.methods, "--methods")

    def __post_init__(self) -> None:
        check_finite(self)
        if not self.data.data or not self.test:
            raise ConfigError("compare needs --data (training) and --test files")
        if not self.output:
            raise ConfigError("--output is required: the folder for the report")
        bad = [m for m in self.method_list if m not in COMPARE_METHODS]
        if bad or not self.method_list:
            raise ConfigError(
                f"--methods: unknown {', '.join(bad) or 'empty list'}; choose from "
                + ", ".join(COMPARE_METHODS)
            )
        _ = self.choice_list
        check_choice(self.choice_loss, CHOICE_LOSSES, "--choice-loss")
        if min(self.steps, self.batch_size, self.num_virtual_tokens, self.lora_r) < 1:
            raise ConfigError("--steps, --batch-size, --num-virtual-tokens, --lora-r must be >= 1")
        if min(self.prompt_lr, self.lora_lr, self.full_lr) <= 0:
            raise ConfigError("--prompt-lr, --lora-lr and --full-lr must be positive")


@dataclass
class SweepConfig:
    """Everything `softprompt sweep` needs: a small grid of prompt-tuning recipes."""

    model: ModelConfig = nested(ModelConfig)
    data: DataConfig = nested(DataConfig)
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
    reparams: str | None = opt(
        None, "Comma-separated --reparam values to try (none, residual). Default: none only."
    )
    choice_losses: str | None = opt(
        None,
        "With --choices: comma-separated --choice-loss values to try (restricted+rest, "
        "restricted, full). Default: train's default only.",
    )
    seed: int = opt(0, "Seed of every run.")
    seeds: str | None = opt(
        None,
        "Comma-separated seeds: every recipe runs once per seed and the table shows the mean "
        "(min-max). Default: --seed alone.",
    )
    test: str | None = opt(
        None,
        "Test data in the same format: every recipe is also scored on it (accuracy with "
        "--choices, exact match and chrF with --generate).",
    )
    overwrite: bool = opt(False, "Replace an earlier sweep in --output.")

    @property
    def reparam_list(self) -> list[str] | None:
        return parse_list(self.reparams, "--reparams") if self.reparams else None

    @property
    def choice_loss_list(self) -> list[str] | None:
        return parse_list(self.choice_losses, "--choice-losses") if self.choice_losses else None

    @property
    def seed_list(self) -> list[int]:
        return parse_list(self.seeds, "--seeds", int) if self.seeds else [self.seed]

    @property
    def lr_list(self) -> list[float]:
        return parse_list(self.lrs, "--lrs", float)

    @property
    def init_list(self) -> list[str]:
        return parse_list(self.inits, "--inits")

    @property
    def length_list(self) -> list[int]:
        return parse_list(self.lengths, "--lengths", int)

    @property
    def choice_list(self) -> list[str] | None:
        return parse_choices(self.choices) if self.choices is not None else None

    def __post_init__(self) -> None:
        check_finite(self)
        if not self.data.data or not self.output:
            raise ConfigError("sweep needs --data and --output")
        try:
            lrs, lengths = self.lr_list, self.length_list
        except ConfigError:
            raise ConfigError(
                "--lrs takes numbers and --lengths integers, comma-separated"
            ) from None
        if not all(0 < lr < math.inf for lr in lrs) or not all(n >= 1 for n in lengths):
            raise ConfigError("--lrs must be positive and --lengths at least 1")
        for init in self.init_list:
            PromptConfig(init=init, init_text="x")  # validates the name
        _ = self.choice_list
        for value in self.reparam_list or []:
            check_choice(value, REPARAMS, "--reparams")
        for value in self.choice_loss_list or []:
            check_choice(value, CHOICE_LOSSES, "--choice-losses")
        if self.choice_losses and not self.choices:
            raise ConfigError("--choice-losses needs --choices (the label words)")
        _ = self.seed_list
        if self.test is not None and not Path(self.test).is_file():
            raise ConfigError(f"--test {self.test}: no such file")
        if self.steps < 1 or self.batch_size < 1:
            raise ConfigError("--steps and --batch-size must be at least 1")


# --- the configs' flags, for the CLI ---------------------------------------------------------


@dataclass(frozen=True)
class Flag:
    """One command-line flag: a leaf field of a config, as its command shows it."""

    name: str
    type: Any  # the resolved annotation, e.g. int | None, Literal[...]
    default: Any
    metadata: dict


def flat_fields(cls) -> list[Flag]:
    """The leaf fields of a config as flags, nested configs expanded (as ``nested`` says)."""
    hints = typing.get_type_hints(cls)
    out: list[Flag] = []
    for f in fields(cls):
        if f.metadata.get("nested"):
            inner = {flag.name: flag for flag in flat_fields(type(f.default_factory()))}
            sample = f.default_factory()
            rewording = f.metadata["help_for"] or {}
            for name in f.metadata["only"] or list(inner):
                flag = inner[name]
                meta = {**flag.metadata, "help": rewording.get(name, flag.metadata["help"])}
                out.append(Flag(name, flag.type, getattr(sample, name), meta))
            continue
        default = f.default if f.default is not MISSING else f.default_factory()
        out.append(Flag(f.name, hints[f.name], default, dict(f.metadata)))
    return out


SWITCHES.update(  # flags without a value, named `name=True` in errors read from Python
    flag.name
    for cls in (
        TrainConfig,
        GenerateRunConfig,
        InspectConfig,
        ServeConfig,
        EvalConfig,
        CompareConfig,
        SweepConfig,
        ExportConfig,
        PushConfig,
    )  # fmt: skip
    for flag in flat_fields(cls)
    if flag.type is bool
)
