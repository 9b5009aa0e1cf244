"""`softprompt train`'s settings."""

from __future__ import annotations

import math
from dataclasses import dataclass

from softprompt.config.base import (
    CHOICE_LOSSES,
    CHOICES_AUTO,
    METHODS,
    MIN_TEMPERATURE,
    REPARAMS,
    SELECTS,
    ChoiceLoss,
    DataConfig,
    Method,
    ModelConfig,
    PromptConfig,
    Reparam,
    Select,
    check_choice,
    check_finite,
    choice_labels,
    nested,
    opt,
)
from softprompt.errors import ConfigError
from softprompt.tracking import report_targets


@dataclass
class TrainConfig:
    """Everything `softprompt train` needs."""

    model: ModelConfig = nested(ModelConfig)
    data: DataConfig = nested(DataConfig)
    prompt: PromptConfig = nested(PromptConfig)
    output: str = opt("", "Folder for the trained prompt, metrics, plot and checkpoints.")
    epochs: int | None = opt(
        None,
        "Passes over the training data (ignored when --max-steps is set). Default: the model "
        "kind's: for decoders as many as reach 160 optimizer steps, 3 to 10 (a 128-row set gets "
        "10, a 2,000-row set 3); 3 for encoder-decoders; 10 for classifiers (prompt + a new "
        "head). Chosen on the public suite, docs/measurements.md sections 7 and 9.",
    )
    max_steps: int | None = opt(None, "Stop after this many optimizer steps instead of --epochs.")
    batch_size: int = opt(
        8,
        "Rows per forward pass. 8: on the public suite, batch 4 at the same steps scored "
        "lower on a decoder's deep default's five-task mean (docs/measurements.md, "
        "section 13).",
    )
    grad_accum: int = opt(1, "Forward passes per optimizer step (effective batch = both).")
    lr: float | None = opt(
        None,
        "Peak learning rate of AdamW. Soft prompts need much larger rates than weights. "
        "Default: the model kind's, chosen on the public suite (benchmarks/suite.py): 0.03 for "
        "decoders and encoder-decoders, 0.1 for classifiers (prompt + head); for deep "
        "prompts (--method prefix) 0.1 on decoders, 0.03 on classifiers and encoder-decoders.",
    )
    weight_decay: float = opt(0.0, "AdamW weight decay on the prompt (0 keeps it free).")
    prompt_dropout: float = opt(
        0.0,
        "Dropout on the prompt's vectors while training (a deep prompt: on its keys and "
        "values, as P-tuning v2 drops its prefix), a fresh mask for every row; validation, "
        "evaluation and serving use the whole prompt. 0 (the default) turns it off: on cb, "
        "0.1 on a decoder's deep prompt lowered test accuracy (one seed; docs/measurements.md, "
        "section 13).",
    )
    warmup_ratio: float = opt(0.06, "Fraction of the steps spent warming the rate up from 0.")
    max_grad_norm: float | None = opt(1.0, "Clip the prompt's gradient norm (none to disable).")
    seed: int = opt(0, "Seed for initialisation, the split and data order.")
    eval_every: int | None = opt(None, "Also run validation every K steps (default: each epoch).")
    save_every: int | None = opt(None, "Also checkpoint every K steps (default: each epoch).")
    keep_checkpoints: int = opt(
        2,
        "How many of the newest checkpoints to keep in OUTPUT/checkpoints. Each holds the "
        "prompt of its step, so keeping all of them (e.g. 1000) lets you score any validated "
        "step later (benchmarks/bench_select.py does).",
    )
    patience: int | None = opt(
        None, "Stop after this many validations without improvement (default: never)."
    )
    select: Select | None = opt(
        None,
        "Which validated prompt to keep: 'loss' the one with the lowest validation loss; "
        "'accuracy' the one that labels the most validation rows right (classification: "
        "--choices, or a classifier), ties to the lower loss; 'last' the last one. Default: "
        "the model kind's, chosen on the public suite (docs/measurements.md section 11): "
        "'last' for classification on decoders (--choices, given or detected: with the "
        "learning rate decayed to 0 by the end, the last prompt scored better than "
        "validation's choice), 'accuracy' for classifiers (section 14: ahead of 'loss' on the "
        "suite's mean and on a set outside it), 'loss' for generation and encoder-decoders. "
        "--patience counts validations without a better one by the same rule ('last': by "
        "the loss).",
    )
    choices: str | None = opt(
        CHOICES_AUTO,
        "Classification mode: the comma-separated label words, e.g. 'negative,positive' (the "
        "targets must be these words); 'auto' (the default) detects a small label set in the "
        "training and validation targets (at most 10 distinct strings of at most 3 words, "
        "most seen more than once) and says so; 'none' turns classification mode off.",
    )
    choice_loss: ChoiceLoss = opt(
        "restricted",
        "With choices: 'restricted' (the default) is a softmax over the choices' first tokens "
        "at the answer position only (the prompt learns the decision; generate and serve then "
        "answer with a label); 'restricted+rest' adds one 'rest' logit standing for every "
        "other token; 'full' keeps the whole-vocabulary loss on every target token. Chosen on "
        "the public suite (docs/measurements.md, section 6).",
    )
    method: Method | None = opt(
        None,
        "'prompt' trains input vectors before the text (prompt tuning, Lester et al. 2021); "
        "'prefix' trains a key and a value vector per layer and virtual token (prefix tuning, "
        "Li & Liang 2021; P-tuning v2), saved in PEFT's PREFIX_TUNING format. A deep prefix "
        "starts from the keys/values of what --init gives, sits before everything (no "
        "{soft_prompt} inside the text, no chat placement) and is served from the cache like "
        "a compiled prompt; decoders, encoder classifiers and encoder-decoders (in the "
        "decoder's self-attention, as PEFT puts it). "
        "Default: the model kind's, chosen on the public suite: prefix for decoders and "
        "classifiers, prompt for encoder-decoders; an input-layer prompt, said, where the run "
        "cannot take a deep one (a prompt inside the text or a chat, --reparam residual, a "
        "model without an attention cache). vLLM and SGLang export takes input-layer prompts "
        "only.",
    )
    prefix_projection: bool = opt(
        False,
        "With --method prefix: train the keys/values through an MLP (Li & Liang 2021's "
        "reparameterisation, PEFT's prefix_projection), starting from the --init prompt's "
        "keys/values; only the MLP's output is saved.",
    )
    prefix_hidden: int = opt(512, "With --prefix-projection: the MLP's hidden width.")
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
    gradient_checkpointing: bool = opt(
        False,
        "Activation checkpointing: the frozen decoder layers keep none of their activations "
        "and run again in backward (about one more forward's compute per step, much less "
        "memory for long rows). The shared prefix and the fast head work as without; decoder "
        "(causal) models only.",
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
        report_targets(self.report_to)  # known names, packages installed
        for name in ("epochs", "batch_size", "grad_accum"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ConfigError(f"--{name.replace('_', '-')} must be at least 1")
        if self.max_steps is not None and self.max_steps < 1:
            raise ConfigError("--max-steps must be at least 1")
        if self.lr is not None and not (self.lr > 0 and math.isfinite(self.lr)):
            raise ConfigError(f"--lr must be a positive number, not {self.lr}")
        if not 0.0 <= self.prompt_dropout < 1.0:
            raise ConfigError(f"--prompt-dropout must be in [0, 1), not {self.prompt_dropout}")
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
        if self.select is not None:
            check_choice(self.select, SELECTS, "--select")
        if self.method is not None:
            check_choice(self.method, METHODS, "--method")
        if self.prefix_projection and self.method == "prompt":
            raise ConfigError("--prefix-projection needs --method prefix")
        if self.prefix_hidden < 1:
            raise ConfigError("--prefix-hidden must be at least 1")
        if self.method == "prefix" and self.reparam != "none":
            raise ConfigError("--reparam residual maps input vectors; a deep prefix (--method "
                              "prefix) has none: leave --reparam out")  # fmt: skip
        if self.keep_checkpoints < 1:
            raise ConfigError("--keep-checkpoints must be at least 1 (--resume reads the newest)")
        if self.reparam_hidden < 1:
            raise ConfigError("--reparam-hidden must be at least 1")
        if self.ensemble < 1:
            raise ConfigError("--ensemble must be at least 1")
        if self.shard_model and self.model.quantize != "none":
            raise ConfigError("--shard-model cannot split quantized layers (FSDP2 shards plain "
                              "tensors): use --quantize or --shard-model, not both")  # fmt: skip
        if self.ensemble > 1 and self.task_field:
            raise ConfigError("--ensemble and --task-field cannot be combined yet; pick one")

    @property
    def choice_list(self) -> list[str] | None:
        """--choices as a list of labels (None: not given, 'auto' or 'none')."""
        return choice_labels(self.choices)

    @property
    def auto_choices(self) -> bool:
        """Whether the label set is to be detected from the data (``--choices auto``)."""
        return self.choices == CHOICES_AUTO

    @property
    def restricted_choices(self) -> list[str] | None:
        """The label words of the restricted classification loss, or None (the full loss)."""
        return self.choice_list if self.choice_loss != "full" else None


@dataclass
class DistillConfig(TrainConfig):
    """`softprompt distill`: train a prompt to stand in for a long context (no labels)."""

    epochs: int | None = opt(
        None,
        "Passes over the teacher's answers (ignored when --max-steps is set). Default: 10 "
        "(the distilled prompt kept gaining up to 10 on the public suite: docs/measurements.md, "
        "section 8).",
    )

    teacher_context: str | None = opt(
        None,
        "A text file: the long context (instructions, a style guide, a document) the teacher "
        "reads where the soft prompt goes (before the input, or at {soft_prompt} in --template).",
    )
    teacher_template: str | None = opt(
        None,
        "A file holding the teacher's own raw template: its long context and {input}; the "
        "student uses --template (the same template less the long context).",
    )
    teacher_system: str | None = opt(
        None,
        "A text file: the system message the teacher answers with (a chat model; plain inputs "
        "become user turns). The student has the soft prompt at --prompt-position instead.",
    )
    shots: str | None = opt(
        None,
        "A .jsonl/.csv of worked examples (--input-field, --target-field) the teacher sees "
        "before every input: in --template, or as earlier turns of a conversation.",
    )
    teacher_samples: int = opt(
        1, "Teacher answers per input (more than 1 needs --teacher-temperature above 0)."
    )
    teacher_temperature: float = opt(0.0, "The teacher's sampling temperature (0: greedy).")
    teacher_max_new_tokens: int = opt(64, "Longest teacher answer, in tokens.")
    teacher_top_k: int = opt(
        32,
        "The teacher's most likely tokens kept at each answer position; the rest of its "
        "probability is one more bucket. The loss is the KL divergence over these buckets.",
    )
    mix_labels: bool = opt(
        False,
        "Also learn the gold answers of the training inputs that have one (--target-field, or a "
        "conversation's last answer), beside the teacher's answers.",
    )
    agreement_inputs: int = opt(
        64,
        "Validation inputs on which the result is compared with the teacher at the end "
        "(answers, tokens, KL, prefill, time to first token); 0 skips it.",
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.teacher_samples < 1 or self.teacher_max_new_tokens < 1 or self.teacher_top_k < 1:
            raise ConfigError("--teacher-samples, --teacher-max-new-tokens and --teacher-top-k "
                              "must be at least 1")  # fmt: skip
        if self.teacher_temperature < 0 or 0 < self.teacher_temperature < MIN_TEMPERATURE:
            raise ConfigError(f"--teacher-temperature must be 0 (greedy) or at least "
                              f"{MIN_TEMPERATURE}")  # fmt: skip
        if self.teacher_samples > 1 and self.teacher_temperature == 0:
            raise ConfigError(f"--teacher-samples {self.teacher_samples}: greedy answers are all "
                              "the same; give --teacher-temperature (e.g. 0.7)")  # fmt: skip
        if self.agreement_inputs < 0:
            raise ConfigError("--agreement-inputs must be 0 or more")
        if self.task_field or self.ensemble > 1 or self.choice_list is not None:
            raise ConfigError("distill matches the teacher's answers: --task-field, --ensemble "
                              "and --choices do not apply")  # fmt: skip
