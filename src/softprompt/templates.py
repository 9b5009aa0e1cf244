"""One set of rules for how an input becomes text around the soft prompt, used by training
data, evaluation, generation and serving alike.

**Raw templates** are text with ``{name}`` fields, e.g. ``'Review: {input}\\nSentiment:'``;
``{{`` and ``}}`` are literal braces. Nothing but a plain name may stand in braces: no format
spec (``{input:>9}``), no conversion (``{input!r}``), no attribute or index (``{input.x}``), so
a template read from a prompt folder can neither reach into Python objects nor blow a short
input up into a huge one. How a field gets its value:

- ``{input}`` and ``{<input field>}`` (e.g. ``{review}`` with ``--input-field review``) are the
  input: the record's input field in training, the text given at inference;
- any other name is a field of the record (training, eval) or of ``fields`` at inference
  (``generate --field k=v``, the request's ``fields`` object);
- a template whose fields do not name the input and have exactly one field with no value
  (a prompt saved without its input field's name) gets the input in that field;
- ``{soft_prompt}`` marks where the virtual tokens go (default: before everything).

**Conversations** (``{"messages": [...]}``) are rendered by the model's chat template (or
``--chat-template FILE``); the virtual tokens go at the start, right after the system
message's text (``after-system``) or right before the first user turn (``before-user``).

``PromptFormat`` holds these choices; it is saved with a trained prompt, so every command
that loads the prompt renders inputs exactly as training did.
"""

from __future__ import annotations

import json
import string
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, fields
from typing import Literal

from softprompt.chat_sandbox import (
    TemplateLimit,
    compile_chat_template,
    render_chat_template,
    tokenizer_variables,
)
from softprompt.errors import ArtifactError, ConfigError, DataError

INPUT = "input"
SOFT_PROMPT = "soft_prompt"  # {soft_prompt}: where a raw template puts the virtual tokens
Position = Literal["start", "after-system", "before-user"]
POSITIONS: tuple[str, ...] = ("start", "after-system", "before-user")
ROLES = ("system", "user", "assistant")
# A conversation to read a chat template's markup off (the \x01 marks cannot be in real text).
PROBE = [{"role": "user", "content": "\x01A"}, {"role": "assistant", "content": "\x01B"}]


def template_fields(template: str, flag: str = "--template") -> list[str]:
    """The ``{names}`` a template uses, in order (``soft_prompt`` included); anything but plain
    names, or more than one ``{soft_prompt}``, is a ConfigError naming ``flag``."""
    names = [name for _, name in _parse(template, flag) if name is not None]
    if names.count(SOFT_PROMPT) > 1:
        raise ConfigError(f"{flag} {template!r} has {{{SOFT_PROMPT}}} more than once")
    return names


def _parse(template: str, flag: str) -> list[tuple[str, str | None]]:
    """(literal text, field name or None) pieces of a template, checked."""
    try:
        parts = list(string.Formatter().parse(template))
    except ValueError as err:
        raise ConfigError(
            f"{flag} {template!r} is malformed ({err}); write {{input}} or {{field}} for "
            "values and {{ }} for literal braces"
        ) from None
    for _, name, spec, conversion in parts:
        if name is not None and (not name.isidentifier() or spec or conversion):
            shown = name + (f"!{conversion}" if conversion else "") + (f":{spec}" if spec else "")
            raise ConfigError(
                f"{flag} {template!r} has the field {{{shown}}}; only plain names are allowed, "
                "e.g. {input} (no format specs, conversions, attributes or indexes)"
            )
    return [(literal, name) for literal, name, _, _ in parts]


def split_template(template: str | None) -> tuple[str | None, str | None]:
    """(head, rest) of a template around ``{soft_prompt}``: the head is None when the template
    has no marker (the prompt then goes first); both are templates again."""
    if template is None or SOFT_PROMPT not in template_fields(template):
        return None, template
    head, rest, seen = [], [], False
    for literal, name in _parse(template, "--template"):
        (rest if seen else head).append(literal.replace("{", "{{").replace("}", "}}"))
        if name == SOFT_PROMPT:
            seen = True
        elif name is not None:
            (rest if seen else head).append("{" + name + "}")
    return "".join(head), "".join(rest)


def as_text(value: object) -> str:
    """A field's value as text: strings as they are, anything else as JSON."""
    return value if isinstance(value, str) else json.dumps(value)


def render(
    template: str | None,
    value: str,
    fields: Mapping[str, object] | None = None,
    input_names: Iterable[str] = (INPUT,),
    where: str = "",
    fields_from: str = "the given fields (--field NAME=VALUE, or the request's `fields`)",
) -> str:
    """Fill ``template`` with the input ``value`` (under every name of ``input_names``) and
    ``fields``; ``{soft_prompt}`` renders as nothing (``split_template`` splits there). A field
    with no value is a DataError prefixed by ``where`` ("file:3: ") that says where fields come
    from (``fields_from``)."""
    if template is None:
        return value
    return template.format_map(values_for(template, value, fields, input_names, where, fields_from))


def values_for(
    template: str,
    value: str,
    fields: Mapping[str, object] | None,
    input_names: Iterable[str],
    where: str,
    fields_from: str,
) -> dict[str, str]:
    """Every field of ``template`` with its value, by the rules above."""
    names = [n for n in template_fields(template) if n != SOFT_PROMPT]
    inputs = set(input_names)
    values = {k: as_text(v) for k, v in (fields or {}).items()}
    values.update(dict.fromkeys(inputs, value))
    missing = [n for n in dict.fromkeys(names) if n not in values]
    if len(missing) == 1 and not inputs & set(names):  # the only open field is the input
        values[missing.pop()] = value
    if missing:
        known = ", ".join(fields or {}) or "none"
        raise DataError(
            f"{where}template field {{{missing[0]}}} is not in {fields_from} (fields: {known}); "
            "use {input} or a field name, and {{ }} for literal braces"
        )
    return {**values, SOFT_PROMPT: ""}


def uses_input(template: str | None, input_names: Iterable[str]) -> bool:
    """Whether the template places the input somewhere (a template that does not would train
    on inputs the model never sees)."""
    return template is None or bool(set(template_fields(template)) & set(input_names))


def apply_template(text: str, template: str | None, fields: Mapping | None = None) -> str:
    """An inference input in its template: ``{input}`` (or the template's one field) is
    ``text``, other fields come from ``fields``."""
    return render(template, text, fields)


# --- conversations ---------------------------------------------------------------------


def check_messages(messages: object, where: str) -> list[dict[str, str]]:
    """A list of {"role", "content"} messages with known roles and string contents."""
    if not isinstance(messages, list) or not messages:
        raise DataError(f"{where}: expected a non-empty list of messages")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise DataError(f"{where}: message {i} needs a 'role' and a 'content'")
        if m["role"] not in ROLES:
            raise DataError(
                f"{where}: message {i} has the unknown role {m['role']!r}; use " + ", ".join(ROLES)
            )
        if not isinstance(m["content"], str):
            kind = type(m["content"]).__name__
            raise DataError(f"{where}: message {i}'s content is {kind}, not a string")
        out.append({"role": m["role"], "content": m["content"]})
    return out


@dataclass(frozen=True)
class ChatText:
    """A rendered conversation, cut where the soft prompt goes."""

    head: str | None  # the text before the virtual tokens; None: they come first
    pieces: list[tuple[str, bool]]  # the text after them as (text, learn?) pieces
    prompt: str  # the text after the head up to the last answer (what generation continues)
    answer: str | None  # the last assistant message's content (None when generating)


_FORMAT_TYPES = {"template": (str, type(None)), "input_field": str, "target_delimiter": str,
                 "chat": bool, "chat_template": (str, type(None)), "position": str,
                 "system": (str, type(None))}  # fmt: skip
_TYPE_WORDS = {str: "text", bool: "true or false", (str, type(None)): "text or null"}


def check_chat_template(source: str) -> None:
    """Refuse a chat template that does not parse, or that goes past the sandbox's limits
    on a two-turn conversation (a template that does for every input is a bomb)."""
    try:
        compile_chat_template(source)
    except Exception as err:  # noqa: BLE001 - Jinja's syntax errors have several types
        raise ConfigError(f"the chat template does not parse: {err}") from None
    try:
        render_chat_template(source, messages=PROBE, add_generation_prompt=True)
    except TemplateLimit as err:
        raise ConfigError(str(err)) from None
    except Exception:  # noqa: BLE001, S110 - a template may refuse the probe conversation
        pass


@dataclass(frozen=True)
class PromptFormat:
    """How an input becomes text around the soft prompt; saved in softprompt.json."""

    template: str | None = None  # raw mode: the template (may hold {soft_prompt})
    input_field: str = INPUT
    target_delimiter: str = " "
    chat: bool = False  # conversations rendered by a chat template
    chat_template: str | None = None  # its Jinja text; None: the tokenizer's own
    position: str = "start"  # chat: start, after-system or before-user
    system: str | None = None  # chat: system message for conversations that have none

    @property
    def position_name(self) -> str:
        """Where the virtual tokens go, in words: start, after-system, before-user, marker."""
        return "marker" if split_template(self.template)[0] is not None else self.position

    @property
    def peft_compatible(self) -> bool:
        """PEFT can only put the virtual tokens first."""
        return self.position_name == "start"

    def to_meta(self) -> dict:
        return asdict(self)

    @classmethod
    def from_meta(cls, meta: dict) -> PromptFormat:
        """The format a prompt folder's softprompt.json records (older ones: its template)."""
        saved = meta.get("prompt_format")
        if saved is None:  # before formats were saved: a raw template at the top level
            data = meta.get("data") or {}
            return cls(
                template=meta.get("template"),
                input_field=data.get("input_field") or INPUT,
                target_delimiter=" "
                if meta.get("target_delimiter") is None
                else meta["target_delimiter"],
            )
        known = {f.name for f in fields(cls)}
        if not isinstance(saved, dict) or not set(saved) <= known:
            what = (f"unknown keys {sorted(map(str, set(saved) - known))[:5]}"
                    if isinstance(saved, dict) else f"a {type(saved).__name__}")  # fmt: skip
            raise ArtifactError(f"softprompt.json has a malformed format record ({what})")
        fmt = cls(**saved)
        fmt.check()
        return fmt

    def check(self) -> None:
        """Refuse values that no command could use (also for formats read from disk)."""
        for f in fields(self):
            value, kind = getattr(self, f.name), _FORMAT_TYPES[f.name]
            if not isinstance(value, kind) or (
                kind is str and not value and f.name != "target_delimiter"
            ):
                raise ConfigError(f"prompt_format.{f.name} is {type(value).__name__}, not "
                                  f"{_TYPE_WORDS[kind]}")  # fmt: skip
        if self.chat_template is not None:
            check_chat_template(self.chat_template)
        if self.template is not None:
            template_fields(self.template)
        if self.position not in POSITIONS:
            raise ConfigError(
                f"--prompt-position must be one of {', '.join(POSITIONS)}, not {self.position!r}"
            )
        if (
            self.chat
            and self.template is not None
            and SOFT_PROMPT in template_fields(self.template)
        ):
            raise ConfigError(
                "{soft_prompt} is for raw templates; with conversations use --prompt-position"
            )

    # --- raw inputs ------------------------------------------------------------------

    def raw_text(
        self,
        value: str,
        fields: Mapping[str, object] | None = None,
        where: str = "",
        fields_from: str | None = None,
    ) -> tuple[str | None, str]:
        """(head, rest) of a raw input in this format's template (head None: no marker)."""
        if self.template is None:
            return None, value
        names = (INPUT, self.input_field)
        frm = fields_from or "the given fields (--field NAME=VALUE, or the request's `fields`)"
        values = values_for(self.template, value, fields, names, where, frm)
        head_tpl, rest_tpl = split_template(self.template)
        return (None if head_tpl is None else head_tpl.format_map(values)), rest_tpl.format_map(
            values
        )

    # --- conversations ---------------------------------------------------------------

    def stop_ids(self, tokenizer) -> list[int]:
        """Tokens that end an answer: the EOS and, for conversations, the template's
        end-of-turn token (e.g. Llama 3's <|eot_id|>, which is not its EOS)."""
        ids = [] if tokenizer.eos_token_id is None else [tokenizer.eos_token_id]
        if self.chat:
            probe = [
                {"role": "user", "content": "\x01A"},
                {"role": "assistant", "content": "\x01B"},
            ]
            text = self._render(tokenizer, probe, False, "probe").rstrip()
            after = text[text.rindex("\x01B") + 2 :]
            end = tokenizer(after, add_special_tokens=False)["input_ids"] if after else []
            if end and end[-1] in tokenizer.all_special_ids and end[-1] not in ids:
                ids.append(end[-1])
        return ids

    def chat_text(
        self,
        tokenizer,
        messages: Sequence[dict],
        generate: bool,
        where: str = "",
        loss_on: str = "all-assistant",
    ) -> ChatText:
        """Render a conversation and cut it where the soft prompt goes. For training
        (``generate`` False) it must end with an assistant message; the pieces mark the
        assistant turns to learn (``loss_on``: all-assistant or last-assistant), each with its
        end-of-turn marker. For generation it is rendered up to the assistant's header."""
        msgs = list(messages)
        if self.system is not None and not any(m["role"] == "system" for m in msgs):
            msgs.insert(0, {"role": "system", "content": self.system})
        answers = [i for i, m in enumerate(msgs) if m["role"] == "assistant"]
        if not generate and (not answers or answers[-1] != len(msgs) - 1):
            raise DataError(f"{where}: the conversation must end with an assistant message")
        full = self._render(tokenizer, msgs, generate, where)
        cut = self._cut(tokenizer, msgs, full, where)
        learn = [] if generate else (answers if loss_on == "all-assistant" else answers[-1:])
        spans = [self._span(tokenizer, msgs, i, full, where) for i in learn]
        pieces, at = [], cut or 0
        for start, end in spans:
            if start < at:
                raise DataError(f"{where}: an assistant turn comes before the soft prompt's place")
            pieces += [(full[at:start], False), (full[start:end], True)]
            at = end
        if generate:  # training ends at the last learned turn: what follows is never read
            pieces.append((full[at:], False))
        pieces = [(t, learn) for t, learn in pieces if t]
        last = spans[-1][0] if spans else len(full)
        answer = None if generate else msgs[-1]["content"]
        return ChatText(None if cut is None else full[:cut], pieces, full[cut or 0 : last], answer)

    def _render(self, tokenizer, msgs: list[dict], generate: bool, where: str) -> str:
        template = self.chat_template or getattr(tokenizer, "chat_template", None)
        if not template:
            raise ConfigError(
                "this model's tokenizer has no chat template; give one with --chat-template FILE "
                "(a Jinja file, e.g. from the instruct model's tokenizer_config.json)"
            )
        variables = {**tokenizer_variables(tokenizer), "messages": msgs,
                     "add_generation_prompt": generate}  # fmt: skip
        try:  # sandboxed, with limits on output and time: the template may come from a file
            return render_chat_template(template, **variables)
        except TemplateLimit as err:
            raise DataError(f"{where}: {err}") from None
        except Exception as err:  # Jinja raises its own types, e.g. for role order
            raise DataError(
                f"{where}: the chat template refused this conversation: {err}"
            ) from None

    def _prefix_of(self, tokenizer, msgs: list[dict], full: str, where: str, generate: bool) -> str:
        """The rendering of ``msgs`` (a prefix of the conversation); it must start ``full``."""
        text = self._render(tokenizer, msgs, generate, where) if msgs else ""
        if not full.startswith(text):
            raise ConfigError(
                "this chat template renders a conversation's beginning differently from the "
                "whole; softprompt cannot find the turns in it (try --prompt-position start, or "
                "another --chat-template)"
            )
        return text

    def _span(self, tokenizer, msgs: list[dict], i: int, full: str, where: str) -> tuple[int, int]:
        """Where assistant message ``i`` is in ``full``: its content and end-of-turn marker."""
        start = len(self._prefix_of(tokenizer, msgs[:i], full, where, generate=True))
        end = len(self._prefix_of(tokenizer, msgs[: i + 1], full, where, generate=False).rstrip())
        if end <= start:
            raise DataError(f"{where}: assistant message {i} renders as nothing")
        return start, end

    def _cut(self, tokenizer, msgs: list[dict], full: str, where: str) -> int | None:
        """Index of ``full`` where the virtual tokens go; None for the start."""
        if self.position == "start":
            return None
        if self.position == "after-system":
            system = next((m for m in msgs if m["role"] == "system"), None)
            if system is None:
                raise DataError(
                    f"{where}: --prompt-position after-system needs a system message; add one "
                    "to the conversation or give --system TEXT"
                )
            at = full.find(system["content"])
            if at < 0 or not system["content"]:
                raise ConfigError(
                    "the chat template changes the system message's text; "
                    "use --prompt-position before-user or start"
                )
            return at + len(system["content"])
        first = next((i for i, m in enumerate(msgs) if m["role"] == "user"), None)
        if first is None:
            raise DataError(f"{where}: --prompt-position before-user needs a user message")
        before = len(self._prefix_of(tokenizer, msgs[:first], full, where, generate=False))
        content = full.find(msgs[first]["content"], before)
        at = full.rfind(self._user_header(tokenizer), before, max(content, before))
        if at < 0 or content < 0:
            raise ConfigError(
                "cannot find where the first user turn starts in this chat "
                "template; use --prompt-position start or after-system"
            )
        return at

    def _user_header(self, tokenizer) -> str:
        """The text a chat template puts before a user message's content (e.g.
        '<|im_start|>user\\n'), read off a probe conversation."""
        first = self._render(tokenizer, PROBE, False, "probe")
        both = self._render(tokenizer, [*PROBE, {"role": "user", "content": "\x01C"}], False, "")
        if not both.startswith(first) or "\x01C" not in both[len(first) :]:
            raise ConfigError(
                "cannot find the user turn's header in this chat template; use "
                "--prompt-position start or after-system"
            )
        return both[len(first) : both.index("\x01C", len(first))]
