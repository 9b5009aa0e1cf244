"""One data path, its first half: files or data sets -> records -> examples (``rows.py``
turns examples into token rows and batches).

Two shapes of example: input/target pairs (loss on the target tokens only) and
plain text (loss on every token). Every error names the file and line.
"""

from __future__ import annotations

import codecs
import csv
import json
import random
import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from softprompt.config import DataConfig
from softprompt.console import warn
from softprompt.errors import DataError
from softprompt.templates import INPUT, PromptFormat, as_text, check_messages, uses_input

SUFFIXES = (".jsonl", ".json", ".csv", ".tsv", ".txt")


@dataclass
class Example:
    source: str  # the templated input (after the soft prompt), the text, or a chat's last user turn
    target: str | None  # None in plain-text mode; a chat's last assistant message
    where: str  # "file.jsonl:12", for messages
    task: str | None = None  # multi-task training: the record's task name
    head: str | None = None  # a template's text before {soft_prompt}; None: the prompt goes first
    messages: list[dict] | None = None  # a conversation, rendered when tokenized


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
    numbers: dict[str, object] = {}  # field -> a number it held (said once per call)
    fields = (cfg.input_field, cfg.target_field, cfg.text_field or "text", task_field)
    for record, where in read_records(spec):
        example = _to_example(record, where, cfg)
        if task_field is not None:
            example.task = _task_name(record, task_field, where)
        examples.append(example)
        for name in fields:
            value = record.get(name) if name else None
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                numbers.setdefault(name, value)
    for name, value in numbers.items():
        warn(f"{spec}: field {name!r} holds numbers (e.g. {value!r}); they are used as text")
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
    return as_text(value)


MAX_LABELS = 10  # --choices auto: at most this many distinct targets ...
MAX_LABEL_WORDS = 3  # ... of at most this many words each


def detect_labels(examples: list[Example]) -> list[str] | None:
    """The label set of a classification data set, or None: the targets are 2 to
    ``MAX_LABELS`` distinct short strings (at most ``MAX_LABEL_WORDS`` words), most of them
    (at least half) seen more than once: a rare class may be seen once in a small sample.
    Labels come in order of first appearance."""
    counts: dict[str, int] = {}
    for ex in examples:
        if ex.target is None or ex.messages is not None:
            return None  # plain text or conversations: not a label set
        counts[ex.target] = counts.get(ex.target, 0) + 1
        if len(counts) > MAX_LABELS:
            return None
    if len(counts) < 2:
        return None
    if 2 * sum(n > 1 for n in counts.values()) < len(counts):
        return None  # mostly seen once: free text, not labels
    for label in counts:
        words = label.split()
        if not words or len(words) > MAX_LABEL_WORDS or label != label.strip():
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
