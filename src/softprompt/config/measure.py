"""Settings of the commands that measure: eval, compare, sweep."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from softprompt.config.base import (
    CHOICE_LOSSES,
    METHODS,
    REPARAMS,
    ChoiceLoss,
    DataConfig,
    ModelConfig,
    PromptConfig,
    check_choice,
    check_finite,
    choice_labels,
    nested,
    opt,
    parse_list,
)
from softprompt.errors import ConfigError


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
    against_teacher: bool = opt(
        False,
        "For a prompt made by `softprompt distill`: compare it with its teacher (the context "
        "its folder records) on --data: how often their answers agree, the teacher's answer "
        "tokens reproduced, KL per token, both task metrics where --data has targets, prefill "
        "tokens and time to first token (answers up to the teacher's --max-new-tokens).",
    )

    @property
    def choice_list(self) -> list[str] | None:
        """--choices as a list of labels (None: no classification)."""
        return choice_labels(self.choices)

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


COMPARE_METHODS = ("zero-shot", "few-shot", "prompt-tuning", "prefix-tuning", "lora", "full-ft")
# run unless --methods says otherwise (prefix-tuning: a deep prompt, on request)
DEFAULT_COMPARE = ("zero-shot", "few-shot", "prompt-tuning", "lora", "full-ft")


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
        "restricted",
        "With --choices: the training loss of every trained method (see `train --choice-loss`).",
    )
    methods: str = opt(
        ",".join(DEFAULT_COMPARE),
        "Comma-separated methods to run, in order; also prefix-tuning (a deep prompt, "
        "--method prefix, trained like prompt-tuning).",
    )
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
        return choice_labels(self.choices)

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
    methods: str | None = opt(
        None,
        "Comma-separated --method values to try (prompt, prefix: a deep prompt). Default: "
        "train's default only.",
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
    def method_list(self) -> list[str] | None:
        return parse_list(self.methods, "--methods") if self.methods else None

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
        return choice_labels(self.choices)

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
        for value in self.method_list or []:
            check_choice(value, METHODS, "--methods")
        for value in self.choice_loss_list or []:
            check_choice(value, CHOICE_LOSSES, "--choice-losses")
        if self.choice_losses and not self.choices:
            raise ConfigError("--choice-losses needs --choices (the label words)")
        _ = self.seed_list
        if self.test is not None and not Path(self.test).is_file():
            raise ConfigError(f"--test {self.test}: no such file")
        if self.steps < 1 or self.batch_size < 1:
            raise ConfigError("--steps and --batch-size must be at least 1")
