"""One data path: files or data sets -> records -> examples -> token rows -> masked batches.

Two shapes of example: input/target pairs (loss on the target tokens only) and
plain text (loss on every token). Every error names the file and line.
"""

from __future__ import annotations

import codecs
import csv
import json
import random
import re
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from softprompt.config import DataConfig
from softprompt.console import warn
from softprompt.errors import DataError
from softprompt.templates import INPUT, PromptFormat, as_text, check_messages, uses_input

Fields = Mapping[str, object]  # a template's other fields
IGNORE_INDEX = -100  # the one label value that carries no loss
SUFFIXES = (".jsonl", ".json", ".csv", ".tsv", ".txt")


@dataclass
class Example:
    source: str  # the templated input (after the soft prompt), the text, or a chat's last user turn
    target: str | None  # None in plain-text mode; a chat's last assistant message
    where: str  # "file.jsonl:12", for messages
    task: str | None = None  # multi-task training: the record's task name
    head: str | None = None  # a template's text before {soft_prompt}; None: the prompt goes first
    messages: list[dict] | None = None  # a conversation, rendered when tokenized


@dataclass
class Row:
    """One tokenized example: its ids and their labels (the loss's targets)."""

    input_ids: list[int]
    labels: list[int]  # IGNORE_INDEX where no loss
    task: int = 0  # index of the row's task (its prompt) in a multi-task run
    prompt_at: int = 0  # where the virtual tokens go: before input_ids[prompt_at]


# --- reading --------------------------------------------------------------------------


def read_records(spec: str) -> Iterator[tuple[dict, str]]:
    """Yield (record, "file:line") from a data file or ``hf:NAME[,CONFIG][:SPLIT]``."""
    if spec.startswith("hf:"):
        yield from _read_hub(spec)
        return
    path = Path(spec).expanduser()
    if not path.is_file():
        raise DataError(
            f"data file {spec} not found; give a .jsonl, .csv, .tsv or .txt file "
            "(or hf:NAME for a Hugging Face data set)"
        )
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".json"):
        yield from _read_jsonl(path)
    elif suffix in (".csv", ".tsv"):
        yield from _read_csv(path, "\t" if suffix == ".tsv" else ",")
    elif suffix == ".txt":
        with _open_text(path) as fh:
            for i, line in _lines(fh, path):
                if line.strip():
                    yield {"text": line.rstrip("\n")}, f"{path}:{i}"
    else:
        raise DataError(f"{path}: unknown data format {suffix!r}; use one of {', '.join(SUFFIXES)}")


# Byte-order marks, longest first (a UTF-32 LE mark starts like a UTF-16 LE one).
BOMS = (
    (codecs.BOM_UTF32_LE, "utf-32"),
    (codecs.BOM_UTF32_BE, "utf-32"),
    (codecs.BOM_UTF8, "utf-8-sig"),
    (codecs.BOM_UTF16_LE, "utf-16"),
    (codecs.BOM_UTF16_BE, "utf-16"),
)


@contextmanager
def _open_text(path: Path, **kwargs) -> Iterator:
    """The file as text: decoded by its byte-order mark if it has one, else as UTF-8; bytes
    that do not decode are one DataError naming the file and the encoding."""
    with path.open("rb") as fh:
        head = fh.read(4)
    encoding = next((enc for bom, enc in BOMS if head.startswith(bom)), "utf-8")
    with path.open(encoding=encoding, **kwargs) as fh:
        try:
            yield fh
        except UnicodeDecodeError as err:
            raise DataError(
                f"{path}: not readable as {encoding} text ({err.reason} at byte {err.start}); "
                "save it as UTF-8 (or UTF-16 with a byte-order mark)"
            ) from None


MAX_LINE = 32 * 2**20  # characters: a line past it is not a record (a sparse or binary file)


def _lines(fh, path: Path) -> Iterator[tuple[int, str]]:
    """(number, line) of a text file, read one bounded line at a time (never slurped)."""
    i = 0
    while line := fh.readline(MAX_LINE + 1):
        i += 1
        if len(line) > MAX_LINE:
            raise DataError(
                f"{path}:{i}: the line is longer than {MAX_LINE} characters; a data file holds "
                "one record per line (is it a binary or sparse file?)"
            )
        yield i, line


def _read_jsonl(path: Path) -> Iterator[tuple[dict, str]]:
    with _open_text(path) as fh:
        for i, line in _lines(fh, path):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise DataError(
                    f"{path}:{i}: not valid JSON ({err.msg} at column {err.colno}); "
                    "each line must hold one JSON object"
                ) from None
            except RecursionError:
                raise DataError(
                    f"{path}:{i}: the JSON is nested too deeply to read; each line must hold "
                    "one JSON object of ordinary depth"
                ) from None
            if not isinstance(record, dict):
                raise DataError(f"{path}:{i}: expected a JSON object, got {type(record).__name__}")
            yield record, f"{path}:{i}"


def _read_csv(path: Path, delimiter: str) -> Iterator[tuple[dict, str]]:
    with _open_text(path, newline="") as fh:
        reader = csv.DictReader(fh, delimiter=delimiter)
        try:
            for record in reader:
                where = f"{path}:{reader.line_num}"
                if None in record or None in record.values():
                    raise DataError(
                        f"{where}: row has a different number of fields than the header "
                        f"({len(reader.fieldnames or [])}: {', '.join(reader.fieldnames or [])})"
                    )
                yield record, where
        except csv.Error as err:
            raise DataError(f"{path}:{reader.line_num}: malformed row ({err})") from None


def _read_hub(spec: str) -> Iterator[tuple[dict, str]]:
    try:
        import datasets
    except ImportError:
        raise DataError(
            f"{spec} needs the 'datasets' package: pip install 'softprompt[hub]'"
        ) from None
    name, _, split = spec[3:].partition(":")
    name, _, config = name.partition(",")
    try:
        ds = datasets.load_dataset(name, config or None, split=split or "train")
    except Exception as err:  # datasets raises many types; all mean "cannot load"
        raise DataError(f"cannot load Hugging Face data set {spec}: {err}") from None
    for i, record in enumerate(ds):
        yield dict(record), f"{spec}[{i}]"


# --- records -> examples --------------------------------------------------------------


def load_examples(spec: str, cfg: DataConfig, task_field: str | None = None) -> list[Example]:
    """Read ``spec`` and turn each record into an Example, per the field flags (and, with
    ``task_field``, the record's task name)."""
    examples: list[Example] = []
    for record, where in read_records(spec):
        example = _to_example(record, where, cfg)
        if task_field is not None:
            example.task = _task_name(record, task_field, where)
        examples.append(example)
    if not examples:
        raise DataError(f"{spec} holds no examples; check that the file is not empty")
    chat = [ex for ex in examples if ex.messages is not None]
    if chat and len(chat) < len(examples):
        other = next(ex for ex in examples if ex.messages is None)
        raise DataError(
            f"{other.where}: not a conversation, while {chat[0].where} is one; a file holds "
            "either conversations or input/target pairs (or plain text)"
        )
    return examples


TASK_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


def _task_name(record: dict, name: str, where: str) -> str:
    """A task name becomes a folder (and a served model) name: keep it plain."""
    task = _field(record, name, where, "--task-field")
    if not TASK_NAME.fullmatch(task):
        raise DataError(
            f"{where}: task name {task!r} cannot name a folder; use letters, digits, '.', '_' "
            "and '-' (starting with a letter or digit, at most 64)"
        )
    return task


def _to_example(record: dict, where: str, cfg: DataConfig) -> Example:
    if _is_conversation(record, cfg):
        return _chat_example(record, where)
    fmt = cfg.prompt_format()
    text_field = cfg.text_field
    if text_field is None and cfg.input_field not in record and "text" in record:
        text_field = "text"  # a plain-text file, or records with only a text field
    if text_field is not None:
        text = _field(record, text_field, where, "--text-field")
        fmt = PromptFormat(template=cfg.template, input_field="text")
        head, body = fmt.raw_text(text, record, f"{where}: ", "the record")
        return Example(body, None, where, head=head)
    if not uses_input(cfg.template, (INPUT, cfg.input_field)):
        raise DataError(
            f"--template {cfg.template!r} never places the input; write {{input}} (or "
            f"{{{cfg.input_field}}}) where it goes"
        )
    source = _field(record, cfg.input_field, where, "--input-field")
    target = _field(record, cfg.target_field, where, "--target-field")
    head, body = fmt.raw_text(source, record, f"{where}: ", "the record")
    return Example(body, target, where, head=head)


def _is_conversation(record: dict, cfg: DataConfig) -> bool:
    """Records of the OpenAI / TRL conversational shapes: {"messages": [...]} or
    {"prompt": [...], "completion": [...]}."""
    if cfg.input_field in record or cfg.text_field is not None:
        return False
    return isinstance(record.get("messages"), list) or isinstance(record.get("prompt"), list)


def _chat_example(record: dict, where: str) -> Example:
    if "messages" in record:
        messages = check_messages(record["messages"], where)
    else:
        if not isinstance(record.get("completion"), list):
            raise DataError(f"{where}: a 'prompt' list needs a 'completion' list of messages")
        messages = check_messages(record["prompt"] + record["completion"], where)
    if messages[-1]["role"] != "assistant":
        raise DataError(f"{where}: the conversation must end with an assistant message")
    users = [m["content"] for m in messages if m["role"] == "user"]
    return Example(users[-1] if users else "", messages[-1]["content"], where, messages=messages)


def _field(record: dict, name: str, where: str, flag: str) -> str:
    value = record.get(name)
    if value is None:
        if name in record:
            raise DataError(f"{where}: field {name!r} is empty (null); give it a value")
        found = ", ".join(repr(k) for k in record) or "none"
        raise DataError(f"{where}: no field {name!r} (fields found: {found}); set {flag}")
    if isinstance(value, (list, dict)):
        kind = "list" if isinstance(value, list) else "JSON object"
        raise DataError(f"{where}: field {name!r} holds a {kind}, not text; give it a string")
    if not isinstance(value, str):
        source = where.rsplit(":", 1)[0]
        if (source, name) not in _NUMBERS_SEEN:
            _NUMBERS_SEEN.add((source, name))
            warn(f"{source}: field {name!r} holds numbers (e.g. {value!r}); they are used as text")
    return as_text(value)


_NUMBERS_SEEN: set[tuple[str, str]] = set()  # (file, field) already warned about


MAX_LABELS = 10  # --choices auto: at most this many distinct targets ...
MAX_LABEL_WORDS = 3  # ... of at most this many words each


def detect_labels(examples: list[Example]) -> list[str] | None:
    """The label set of a classification data set, or None: the targets are 2 to
    ``MAX_LABELS`` distinct short strings (at most ``MAX_LABEL_WORDS`` words), each seen more
    than once. Labels come in order of first appearance."""
    counts: dict[str, int] = {}
    for ex in examples:
        if ex.target is None or ex.messages is not None:
            return None  # plain text or conversations: not a label set
        counts[ex.target] = counts.get(ex.target, 0) + 1
        if len(counts) > MAX_LABELS:
            return None
    if len(counts) < 2:
        return None
    for label, n in counts.items():
        words = label.split()
        if n < 2 or not words or len(words) > MAX_LABEL_WORDS or label != label.strip():
            return None
        if "," in label:  # --choices is comma-separated: such a label cannot be recorded
            return None
    return list(counts)


def split_validation(
    examples: list[Example], fraction: float, seed: int
) -> tuple[list[Example], list[Example]]:
    """Hold out ``fraction`` of the examples (shuffled with ``seed``) for validation; with
    tasks, ``fraction`` of each task's examples, so that every task is validated."""
    if examples and examples[0].task is not None:
        train, val = [], []
        for task in sorted({ex.task for ex in examples}):
            t, v = _split([ex for ex in examples if ex.task == task], fraction, seed, task)
            train, val = train + t, val + v
        return train, val
    return _split(examples, fraction, seed)


def _split(
    examples: list[Example], fraction: float, seed: int, task: str | None = None
) -> tuple[list[Example], list[Example]]:
    n_val = round(len(examples) * fraction)
    if fraction > 0 and (n_val == 0 or n_val >= len(examples)):
        of = f" of task {task!r}" if task else ""
        warn(f"{len(examples)} examples{of} are too few to hold out {fraction:.0%}; no validation")
        return examples, []
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    val = sorted(order[:n_val])
    train = sorted(order[n_val:])
    return [examples[i] for i in train], [examples[i] for i in val]


# --- examples -> token rows -> batches ------------------------------------------------


def tokenize(
    examples: list[Example],
    tokenizer,
    max_text_tokens: int,
    delimiter: str = " ",
    task_ids: dict[str, int] | None = None,
    fmt: PromptFormat | None = None,
    loss_on: str = "all-assistant",
) -> list[Row]:
    """Token rows with labels; rows longer than ``max_text_tokens`` are cut (and counted).
    ``task_ids`` maps task names to the rows' task indices in a multi-task run; ``fmt``
    renders conversations (``loss_on``: which assistant turns are learned)."""
    fmt = fmt or PromptFormat(target_delimiter=delimiter)
    rows, cut = [], 0
    for ex in examples:
        if ex.messages is not None:
            row, was_cut = _chat_row(ex, tokenizer, max_text_tokens, fmt, loss_on)
        elif ex.head is not None:
            row, was_cut = _headed_row(ex, tokenizer, max_text_tokens, delimiter)
        else:
            row, was_cut = _tokenize_one(ex, tokenizer, max_text_tokens, delimiter)
        row.task = task_ids[ex.task] if task_ids else 0
        rows.append(row)
        cut += was_cut
    if cut:
        warn(
            f"{cut} of {len(rows)} rows were longer than {max_text_tokens} text tokens and were "
            "cut; raise --max-length to keep them whole"
        )
    return rows


def _tokenize_one(ex: Example, tokenizer, limit: int, delimiter: str) -> tuple[Row, bool]:
    """A row with the virtual tokens first (before the BOS, as PEFT puts them)."""
    src = tokenizer(ex.source, add_special_tokens=True)["input_ids"]
    bos = tokenizer.bos_token_id
    has_bos = bool(src) and src[0] == bos
    if ex.target is None:  # plain text: loss on every token but a leading BOS
        cut = len(src) > limit
        ids = src[:limit]
        labels = list(ids)
        if has_bos:
            labels[0] = IGNORE_INDEX
        return Row(ids, labels), cut
    tgt = _target_ids(ex, tokenizer, delimiter)
    cut = len(src) + len(tgt) > limit
    if cut:  # cut the input's start (its end, the question, matters most), then the target
        keep = max(limit - len(tgt), min(len(src), 1 + has_bos))
        tgt = tgt[: limit - keep]
        src = (src[:1] + src[len(src) - keep + 1 :]) if has_bos else src[len(src) - keep :]
    return Row(src + tgt, [IGNORE_INDEX] * len(src) + tgt), cut


def _target_ids(ex: Example, tokenizer, delimiter: str) -> list[int]:
    """The target's tokens after the input, and an EOS so the model learns to stop."""
    sep = "" if not ex.source or ex.source[-1].isspace() else delimiter
    return tokenizer(sep + ex.target, add_special_tokens=False)["input_ids"] + [
        tokenizer.eos_token_id
    ]


def _headed_row(ex: Example, tokenizer, limit: int, delimiter: str) -> tuple[Row, bool]:
    """A raw template with {soft_prompt}: [head (with BOS)][virtual tokens][input][target]."""
    head = tokenizer(ex.head, add_special_tokens=True)["input_ids"]
    body = tokenizer(ex.source, add_special_tokens=False)["input_ids"]
    if ex.target is None:
        return _cut_row(head, [(body, True)], limit)
    return _cut_row(head, [(body, False), (_target_ids(ex, tokenizer, delimiter), True)], limit)


def _chat_row(
    ex: Example, tokenizer, limit: int, fmt: PromptFormat, loss_on: str
) -> tuple[Row, bool]:
    """A conversation rendered by the chat template, the soft prompt at its place, the
    assistant turns to learn labelled (each ends with its end-of-turn token)."""
    text = fmt.chat_text(tokenizer, ex.messages, generate=False, where=ex.where, loss_on=loss_on)
    head = [] if text.head is None else _ids(tokenizer, text.head)
    pieces = [(_ids(tokenizer, t), learn) for t, learn in text.pieces]
    special = set(tokenizer.all_special_ids)
    for ids, learn in pieces:  # a template without an end-of-turn token: learn an EOS
        if learn and ids and ids[-1] not in special:
            ids.append(tokenizer.eos_token_id)
    return _cut_row(head, pieces, limit)


def _ids(tokenizer, text: str) -> list[int]:
    """Tokens of rendered text that already holds its special tokens."""
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def _cut_row(head: list[int], pieces: list[tuple[list[int], bool]], limit: int) -> tuple[Row, bool]:
    """[head][pieces...], labelled where a piece is learned; the prompt goes after the head.
    Too long: the start of what follows the head is cut (the end, the answer, matters most)."""
    ids = [t for p, _ in pieces for t in p]
    labels = [t if learn else IGNORE_INDEX for p, learn in pieces for t in p]
    keep = max(limit - len(head), 1)
    cut = len(ids) > keep
    if cut:
        ids, labels = ids[-keep:], labels[-keep:]
    return Row(head + ids, [IGNORE_INDEX] * len(head) + labels, prompt_at=len(head)), cut


def batch_order(
    lengths: list[int], batch_size: int, seed: int, epoch: int, shuffle: bool = True
) -> list[list[int]]:
    """Row indices grouped into batches of similar length (less padding), in an order that
    depends only on (seed, epoch), so a resumed run sees the same batches."""
    idx = list(range(len(lengths)))
    if not shuffle:
        return [idx[i : i + batch_size] for i in range(0, len(idx), batch_size)]
    rng = random.Random(seed * 100_003 + epoch)
    rng.shuffle(idx)
    pool = batch_size * 50  # sort within pools: similar lengths, still random overall
    batches = []
    for start in range(0, len(idx), pool):
        chunk = sorted(idx[start : start + pool], key=lambda i: lengths[i])
        batches += [chunk[i : i + batch_size] for i in range(0, len(chunk), batch_size)]
    rng.shuffle(batches)
    return batches


def collate(rows: list[Row], pad_id: int) -> dict[str, Tensor]:
    """Right-pad to the longest row: real tokens keep positions 0.. and never see padding."""
    width = max(len(r.input_ids) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    task = torch.tensor([r.task for r in rows], dtype=torch.long)  # (B,) multi-task runs
    prompt_at = torch.tensor([r.prompt_at for r in rows], dtype=torch.long)  # (B,)
    for i, r in enumerate(rows):
        n = len(r.input_ids)
        ids[i, :n] = torch.tensor(r.input_ids)
        labels[i, :n] = torch.tensor(r.labels)
        mask[i, :n] = 1
    batch = {"input_ids": ids, "attention_mask": mask, "labels": labels, "task": task}
    if prompt_at.any():  # only batches whose prompt sits inside the rows carry it
        batch["prompt_at"] = prompt_at
    return batch


Encoded = tuple[list[int] | None, list[int]]  # (head ids or None, the ids after the prompt)


def encode_raw(tokenizer, fmt: PromptFormat, text: str, fields: Fields | None = None) -> Encoded:
    """A raw input's tokens, split where the prompt goes (as ``data.tokenize`` splits them)."""
    head, rest = fmt.raw_text(text, fields)
    if head is None:
        return None, tokenizer(rest, add_special_tokens=True)["input_ids"]
    head_ids = tokenizer(head, add_special_tokens=True)["input_ids"]
    return head_ids, tokenizer(rest, add_special_tokens=False)["input_ids"]


def encode_chat(tokenizer, fmt: PromptFormat, messages: list[dict]) -> Encoded:
    """A conversation rendered up to the assistant's turn, split where the prompt goes."""
    text = fmt.chat_text(tokenizer, messages, generate=True)
    head = (
        None if text.head is None else tokenizer(text.head, add_special_tokens=False)["input_ids"]
    )
    return head, tokenizer(text.prompt, add_special_tokens=False)["input_ids"]


def encode_example(tokenizer, fmt: PromptFormat, ex: Example) -> Encoded:
    """An example's input as generation and scoring see it: a conversation up to its last
    answer, or a templated input split at its ``{soft_prompt}`` (``data.Example.head``)."""
    if ex.messages is not None:
        messages = ex.messages[:-1] if ex.messages[-1]["role"] == "assistant" else ex.messages
        return encode_chat(tokenizer, fmt, messages)
    if ex.head is None:
        return None, tokenizer(ex.source, add_special_tokens=True)["input_ids"]
    head = tokenizer(ex.head, add_special_tokens=True)["input_ids"]
    return head, tokenizer(ex.source, add_special_tokens=False)["input_ids"]
