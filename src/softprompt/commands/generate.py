"""`softprompt generate`: answers of the base model and of a saved prompt, side by side."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace

from softprompt.artifacts import load_prompt, read_meta, trained_base_model, trained_choices
from softprompt.config import GenerateRunConfig
from softprompt.console import say
from softprompt.data import read_records
from softprompt.errors import SoftpromptError
from softprompt.generation import cut_at_label, generate, generate_chat
from softprompt.loading import LoadedModel, load_model
from softprompt.prompt import SoftPrompt
from softprompt.templates import PromptFormat, check_messages

Fields = Mapping[str, object]


@dataclass
class Generation:
    """One input of `softprompt generate` and what came of it."""

    text: str
    tuned: str | None = None  # with the prompt
    base: str | None = None  # without it
    expected: str | None = None  # the file's target, when it has one


def run_generate(cfg: GenerateRunConfig, loaded: LoadedModel | None = None) -> list[Generation]:
    """Generate for ``cfg.texts`` and the rows of ``cfg.file``: with the prompt, and without
    it for ``--compare`` or when no prompt is given. Inputs are rendered as the prompt was
    trained (its saved format); conversations (``--chat``, or a prompt trained on them) get
    the next assistant message."""
    meta = read_meta(cfg.prompt) if cfg.prompt else {}
    fmt = _format_for(cfg, meta)
    items, fields, chats = _inputs(cfg, meta, fmt)
    if loaded is None:
        model = cfg.model.model or (trained_base_model(cfg.prompt) if cfg.prompt else None)
        loaded = load_model(replace(cfg.model, model=model), labels=meta.get("labels"))
    labels = None if cfg.free_text else trained_choices(meta)
    if labels:
        say(f"the prompt was trained on the labels {','.join(labels)}: its answers end after "
            "the label (--free-text keeps generating)")  # fmt: skip
    prompts: list[SoftPrompt | None] = [None] if cfg.compare or not cfg.prompt else []
    if cfg.prompt:
        prompt, _ = load_prompt(cfg.prompt, loaded.model, allow_mismatch=cfg.allow_mismatch)
        prompts.append(prompt.to(loaded.model.device))
    for prompt in prompts:
        if fmt.chat:
            outs = generate_chat(loaded, chats, prompt, cfg.sampling, fmt)
        else:
            outs = generate(loaded, [i.text for i in items], prompt, cfg.sampling, fields=fields,
                            fmt=fmt, labels=labels)  # fmt: skip
        for item, out in zip(items, outs):
            if fmt.chat and prompt is not None and labels:
                out = cut_at_label(out, labels)
            setattr(item, "base" if prompt is None else "tuned", out)
    return items


def _format_for(cfg: GenerateRunConfig, meta: dict) -> PromptFormat:
    """The prompt's saved format, as the flags amend it."""
    fmt = PromptFormat.from_meta(meta) if meta else PromptFormat()
    if cfg.chat and not fmt.chat and cfg.prompt and meta.get("prompt_format"):
        raise SoftpromptError(
            f"{cfg.prompt} was trained on raw text, not conversations; leave out --chat"
        )
    if cfg.chat and not fmt.chat:
        fmt = PromptFormat(chat=True)
    if cfg.template is not None or cfg.no_template:
        fmt = replace(fmt, template=None if cfg.no_template else cfg.template)
    if cfg.system is not None:
        fmt = replace(fmt, system=cfg.system)
    fmt.check()
    return fmt


def _inputs(
    cfg: GenerateRunConfig, meta: dict, fmt: PromptFormat
) -> tuple[list[Generation], list[Fields | None], list[list[dict]]]:
    """The inputs: (items, template fields per item, conversations per item)."""
    given = dict(parse_fields(cfg.field))
    items = [Generation(t) for t in cfg.texts]
    fields: list[Fields | None] = [given] * len(items)
    chats = [[{"role": "user", "content": t}] for t in cfg.texts]
    data = meta.get("data", {})
    name = cfg.input_field or data.get("input_field") or "input"
    target = data.get("target_field") or "target"
    for i, (record, where) in enumerate(read_records(cfg.file) if cfg.file else []):
        if cfg.limit is not None and i >= cfg.limit:
            break
        if fmt.chat and isinstance(record.get("messages"), list):
            messages = check_messages(record["messages"], where)
            answer = messages.pop()["content"] if messages[-1]["role"] == "assistant" else None
            user = [m["content"] for m in messages if m["role"] == "user"]
            items.append(Generation(user[-1] if user else "", expected=answer))
            chats.append(messages)
        elif name in record:
            items.append(Generation(str(record[name]), expected=record.get(target)))
            chats.append([{"role": "user", "content": str(record[name])}])
        else:
            raise SoftpromptError(f"{where}: no field {name!r}; set --input-field")
        fields.append({**record, **given})  # the template's other fields: the record's
    if not items:
        raise SoftpromptError("nothing to generate: give TEXT arguments or --file")
    return items, fields, chats


def parse_fields(pairs: list[str]) -> list[tuple[str, str]]:
    """``--field NAME=VALUE`` flags as (name, value) pairs."""
    out = []
    for pair in pairs:
        name, sep, value = pair.partition("=")
        if not sep or not name.isidentifier():
            raise SoftpromptError(f"--field {pair!r}: write NAME=VALUE, e.g. --field topic=films")
        out.append((name, value))
    return out


def format_generations(items: list[Generation]) -> str:
    """Each input, then the base and tuned answers (stripped) and the expected one."""
    lines = []
    for i, item in enumerate(items, 1):
        lines.append(f"[{i}] {item.text}")
        if item.base is not None:
            lines.append(f"  base    : {item.base.strip()!r}")
        if item.tuned is not None:
            lines.append(f"  tuned   : {item.tuned.strip()!r}")
        if item.expected is not None:
            lines.append(f"  expected: {item.expected!r}")
    return "\n".join(lines)


def main(cfg: GenerateRunConfig) -> None:
    """The command: generate, then print each input with its answers."""
    print(format_generations(run_generate(cfg)), flush=True)
