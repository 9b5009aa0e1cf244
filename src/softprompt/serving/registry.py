"""The prompts a server holds: one sub-folder of ``--prompts`` per prompt, compiled once.

Every sub-folder holding a saved prompt is a model of the API, named after the folder;
``base`` is the model without a prompt. A `train --ensemble K` folder is one model whose
members each answer and vote. A prompt is compiled into its prefix (``prefix.py``)
when it is loaded, so requests for it cost what base requests cost.
"""

from __future__ import annotations

import re
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

from softprompt.artifacts import (
    ADAPTER_WEIGHTS,
    ENSEMBLE_INDEX,
    ensemble_members,
    load_prompt,
    trained_base_model,
    trained_choices,
)
from softprompt.config import EMBEDDED_MODEL
from softprompt.errors import SoftpromptError
from softprompt.generation import label_sequences
from softprompt.loading import LoadedModel
from softprompt.prefix import Prefix, compile_prefix
from softprompt.prompt import SoftPrompt, max_positions
from softprompt.templates import PromptFormat

BASE = "base"  # the API name of the model without a prompt
NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


class ApiError(SoftpromptError):
    """An error answered with an HTTP status and a one-line message."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


@dataclass(eq=False)
class Entry:
    """A loaded prompt: the prompt, its compiled prefix (the prompt first) and the format it
    was trained with (None for a prompt saved without one: a PEFT adapter, an older run).
    A prompt placed behind a head (a system turn, a template's text) is compiled once per
    distinct head, and the last ``HEADS_KEPT`` are kept."""

    name: str
    prompt: SoftPrompt
    prefix: Prefix
    fmt: PromptFormat | None
    labels: list[str] | None = None  # trained on labels: its answers end after the label
    label_ids: list[list[int]] | None = None  # ... the labels' tokens (``LabelsOnly``)
    members: list[Entry] = field(default_factory=list)  # an ensemble's (it is its first)
    loaded_at: int = field(default_factory=lambda: int(time.time()))
    _heads: OrderedDict = field(default_factory=OrderedDict, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @property
    def nbytes(self) -> int:
        """Memory its compiled prefixes hold (an ensemble's members too; heads kept aside)."""
        if self.members:  # the first member's prefix is this entry's
            return sum(m.nbytes for m in self.members)
        return self.prefix.nbytes + sum(p.nbytes for p in list(self._heads.values()))

    @property
    def template(self) -> str | None:
        return self.fmt.template if self.fmt else None

    def prefix_for(self, model, head: list[int] | None) -> Prefix:
        """The compiled prefix of [head][prompt] (the prompt first when ``head`` is None)."""
        if not head:
            return self.prefix if head is None else compile_prefix(model, self.prompt, ())
        key = tuple(head)
        with self._lock:
            if key in self._heads:
                self._heads.move_to_end(key)
                return self._heads[key]
        prefix = compile_prefix(model, self.prompt, key)
        with self._lock:
            self._heads[key] = prefix
            while len(self._heads) > HEADS_KEPT:
                self._heads.popitem(last=False)
        return prefix


HEADS_KEPT = 64


class PromptStore:
    """The prompts of one folder, compiled for one model; safe to use from any thread."""

    def __init__(
        self,
        folder: str | Path,
        loaded: LoadedModel,
        allow_mismatch: bool = False,
        max_tokens: int | None = None,
    ):
        self.root = Path(folder).expanduser().resolve()
        self.loaded, self.allow_mismatch = loaded, allow_mismatch
        self.max_tokens = max_tokens  # the most tokens of a request, virtual tokens included
        self._entries: dict[str, Entry] = {}
        self._skipped: dict[str, str] = {}  # prompt folders that could not be loaded: why
        self._lock = threading.Lock()

    def path_of(self, name: str) -> Path:
        """The folder of prompt ``name``; names that could leave the prompts folder are refused."""
        if name == BASE or not NAME_RE.fullmatch(name) or ".." in name:
            raise ApiError(
                400, f"invalid prompt name {name!r}: use letters, digits, '.', '_' and '-'"
            )
        path = (self.root / name).resolve()  # follows links: a link out of the folder is refused
        if path.parent != self.root:
            raise ApiError(400, f"prompt {name!r} points outside the prompts folder")
        return path

    def load(self, name: str) -> Entry:
        """(Re)load prompt ``name`` from its sub-folder and compile its prefix. A folder that
        cannot be loaded is an ApiError (400) and is listed by ``skipped``."""
        path = self.path_of(name)
        if (path / ENSEMBLE_INDEX).exists():
            entry = self._ensemble(name, path)
        elif not (path / ADAPTER_WEIGHTS).exists():
            raise ApiError(404, f"no saved prompt {name!r} in the prompts folder")
        else:
            entry = self._entry(name, path, name)
        with self._lock:
            self._entries[name] = entry
            self._skipped.pop(name, None)
        return entry

    def _entry(self, name: str, path: Path, shown: str) -> Entry:
        try:
            prompt, meta = load_prompt(path, self.loaded.model, self.allow_mismatch)
            fmt = PromptFormat.from_meta(meta) if meta.get("template") or meta.get(
                "prompt_format") else None  # fmt: skip
            self._check_length(prompt)
            labels = trained_choices(meta)
            ids = label_sequences(self.loaded.tokenizer, labels, fmt) if labels else None
            return Entry(shown, prompt, self._compiled(prompt), fmt, labels, ids)
        except ApiError:
            raise
        except SoftpromptError as err:
            self._refuse(name, path, shown, err)
        except Exception as err:  # noqa: BLE001 - one folder never stops serve
            self._refuse(name, path, shown, f"cannot be loaded ({type(err).__name__}: {err})")

    def _check_length(self, prompt: SoftPrompt) -> None:
        """Refuse a prompt no request could use: as long as a whole request may be."""
        limits = [x for x in (self.max_tokens, max_positions(self.loaded.model)) if x]
        if limits and prompt.num_virtual_tokens >= min(limits):
            raise SoftpromptError(
                f"its prompt has {prompt.num_virtual_tokens} virtual tokens, and a request may "
                f"hold only {min(limits)} tokens (--max-prompt-tokens, the model's positions)"
            )

    def _ensemble(self, name: str, path: Path) -> Entry:
        """An ensemble folder as one entry: its first member, with every member kept."""
        try:
            folders = ensemble_members(path)
        except Exception as err:  # noqa: BLE001 - skipped, never fatal
            self._refuse(name, path, name, err)
        members = [self._entry(name, f, f"{name}/{f.name}") for f in folders]
        first = members[0]
        return Entry(name, first.prompt, first.prefix, first.fmt, first.labels, first.label_ids,
                     members=members)  # fmt: skip

    def _refuse(self, name: str, path: Path, shown: str, err: Exception | str):
        """A folder that cannot be loaded: listed by ``skipped``, answered with a 400."""
        # Name the folder as the client knows it, never by this server's absolute path.
        message = str(err).replace(str(path), shown).replace(str(self.root), "<prompts>")
        message = message.replace(str(Path(self.root).parent), "<server>")[:500]
        with self._lock:
            self._skipped[name] = message
        raise ApiError(400, message) from None

    def _compiled(self, prompt: SoftPrompt) -> Prefix:
        """The prompt as its model's kind serves it (a decoder's compiled prefix; an
        encoder-decoder's embeddings alone, which go before the encoder's input)."""
        prefix = self.loaded.kind.compile(self.loaded.model, prompt)
        held = [*prefix.keys, *prefix.values] + ([prefix.embeds] if not prefix.deep else [])
        if not all(bool(t.isfinite().all()) for t in held):
            raise SoftpromptError(  # values so large the model overflows on them
                "the model overflows on its prompt (its keys or values are not finite); "
                "retrain the prompt"
            )
        return prefix

    def skipped(self) -> dict[str, str]:
        """Prompt folders that could not be loaded, and why."""
        with self._lock:
            return dict(self._skipped)

    def remove(self, name: str) -> None:
        with self._lock:
            if self._entries.pop(name, None) is None:
                raise ApiError(404, f"prompt {name!r} is not loaded")

    def get(self, name: str) -> Entry | None:
        with self._lock:
            return self._entries.get(name)

    def entries(self) -> list[Entry]:
        with self._lock:
            return sorted(self._entries.values(), key=lambda e: e.name)

    def rescan(self) -> dict:
        """Load sub-folders not loaded yet, drop prompts whose folder is gone."""
        try:
            on_disk = {p.name for p in self.root.iterdir() if _holds_prompt(p)}
        except OSError:
            raise ApiError(409, "the prompts folder cannot be read (it was removed or its "
                           "permissions changed); restore it, then rescan") from None  # fmt: skip
        added, errors = [], {}
        for name in sorted(on_disk - {e.name for e in self.entries()}):
            try:
                self.load(name)
                added.append(name)
            except ApiError as err:
                errors[name] = str(err)
                with self._lock:
                    self._skipped[name] = str(err)
        removed = [e.name for e in self.entries() if e.name not in on_disk]
        for name in removed:
            self.remove(name)
        with self._lock:
            self._skipped = {k: v for k, v in self._skipped.items() if k in on_disk}
        return {"added": added, "removed": removed, "errors": errors}


def _holds_prompt(path: Path) -> bool:
    """A sub-folder that looks like a prompt (a valid name; loading checks the rest)."""
    if not NAME_RE.fullmatch(path.name) or ".." in path.name:
        return False
    try:
        return (path / ADAPTER_WEIGHTS).exists() or (path / ENSEMBLE_INDEX).exists()
    except OSError:
        return False


def base_model_of(folder: Path) -> str:
    """The base model named by the first prompt of ``folder``, else the embedded one."""
    for sub in sorted(folder.iterdir()):
        if (sub / ENSEMBLE_INDEX).is_file():  # an ensemble: its members name the model
            sub = next((m for m in sorted(sub.iterdir()) if (m / ADAPTER_WEIGHTS).is_file()), sub)
        try:
            name = trained_base_model(sub) if (sub / ADAPTER_WEIGHTS).is_file() else None
        except Exception:  # noqa: BLE001
            continue  # a damaged folder names no model; serve skips it when loading
        if isinstance(name, str) and name:
            return name
    return EMBEDDED_MODEL
