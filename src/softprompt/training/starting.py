"""The prompts a run starts from: a saved prompt's folder, a library's best fit, random or
common tokens, or the task's own words (`--init auto`), one per task or ensemble member."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from softprompt.artifacts import load_prompt
from softprompt.config import TrainConfig
from softprompt.console import say
from softprompt.errors import ConfigError
from softprompt.library import pick_prompt
from softprompt.loading import LoadedModel
from softprompt.prompt import (
    DeepPrompt,
    SoftPrompt,
    init_prompt,
    words_used,
)
from softprompt.templates import template_fields
from softprompt.training.run import TrainData


def task_words(cfg: TrainConfig, choices: list[str] | None) -> str:
    """The task's own words for --init auto: the label words, then the template's fixed
    text (its fields left out) or the system prompt; '' when there are none."""
    parts = list(choices or [])
    d = cfg.data
    if d.template:
        text = d.template
        for name in template_fields(d.template):
            text = text.replace("{" + name + "}", " ")
        parts.append(" ".join(text.split()))
    if d.system:
        parts.append(" ".join(d.system.split()))
    return " ".join(p for p in parts if p)


def starting_prompts(
    cfg: TrainConfig, loaded: LoadedModel, data: TrainData
) -> tuple[list[SoftPrompt], dict]:
    """One starting prompt per task (every task starts from the same one) or per ensemble
    member (member k: seed SEED+k; with auto or text init, the words' tokens shuffled from
    the second member on), and a record of how they were chosen."""
    p, info = cfg.prompt, {"requested": cfg.prompt.init}
    members = cfg.ensemble
    if p.library is not None:
        first, record = pick_prompt(
            p.library, loaded.model, data.train_rows, cfg.batch_size,
            loaded.tokenizer.pad_token_id, p.num_virtual_tokens, data.choice_ids,
        )  # fmt: skip
        say(
            f"--init {p.init}: starting from {record['picked']} (lowest loss on "
            f"{record['scored_rows']} training rows of {len(record['scores'])} prompts)"
        )
        info.update(used="library", **record)
        starts = [first]
    elif p.from_folder:
        starts, info["used"] = [_starting_prompt(cfg, loaded)], "folder"
    elif p.init in ("random", "vocab"):
        starts = [init_prompt(loaded.model, loaded.tokenizer, p, cfg.seed + k)
                  for k in range(members)]  # fmt: skip
        info["used"] = p.init
    else:  # text or auto: words, repeated to N tokens
        if p.init == "text":  # its own checks (a phrase that gives no tokens is refused)
            init_prompt(loaded.model, loaded.tokenizer, p, cfg.seed)
        words = task_words(cfg, data.choices) if p.init == "auto" else words_used(
            loaded.tokenizer, p.init_text, p.num_virtual_tokens)  # fmt: skip
        as_auto = dataclasses.replace(p, init="auto")
        starts = [init_prompt(loaded.model, loaded.tokenizer, as_auto, cfg.seed + k, words,
                              shuffle=k > 0) for k in range(members)]  # fmt: skip
        info.update(used="text" if words else "vocab", text=words or None)
        if p.init == "auto":
            say(f"--init auto: {'the task words ' + repr(words) if words else 'common tokens'}"
                f", repeated to {p.num_virtual_tokens} virtual tokens")  # fmt: skip
    if isinstance(starts[0], DeepPrompt) and cfg.method != "prefix":
        raise ConfigError(f"--init {p.init}: that is a deep prompt (prefix tuning); continue it "
                          "with --method prefix")  # fmt: skip
    if members > 1:
        starts = starts if len(starts) == members else starts * members
        return [_copy(s) for s in starts], info
    return [_copy(starts[0]) for _ in data.tasks], info


def _copy(prompt: SoftPrompt) -> SoftPrompt:
    """A prompt of its own (a deep one keeps its layout)."""
    if isinstance(prompt, DeepPrompt):
        return DeepPrompt(prompt.embedding, *prompt.layout)
    return SoftPrompt(prompt.embedding)


def _starting_prompt(cfg: TrainConfig, loaded: LoadedModel) -> SoftPrompt:
    """The prompt training starts from: ``--init`` (a saved prompt's folder, or a method)."""
    if cfg.prompt.from_folder:
        saved, _ = load_prompt(Path(cfg.prompt.init), model=loaded.model)
        if saved.num_virtual_tokens != cfg.prompt.num_virtual_tokens:
            raise ConfigError(
                f"--init {cfg.prompt.init} holds a prompt of {saved.num_virtual_tokens} virtual "
                f"tokens, but --num-virtual-tokens is {cfg.prompt.num_virtual_tokens}; pass "
                f"--num-virtual-tokens {saved.num_virtual_tokens} to continue from it"
            )
        return saved
    return init_prompt(loaded.model, loaded.tokenizer, cfg.prompt, seed=cfg.seed)
