"""Compile a long prompt into a few virtual tokens: ``softprompt distill``.

The teacher is the frozen model with a long context (a system message, a raw template, or a
block of few-shot examples); the student is the same model with N virtual tokens in the
context's place. No labels are needed:

1. the teacher answers every input once (greedy, or ``--teacher-samples K`` sampled
   continuations), and its next-token distributions over its own answers are kept as its
   top-k tokens plus one bucket for the rest (``loss.teacher_topk``); both are cached in the
   run folder (``OUTPUT/teacher/``), so a resumed or repeated run reuses them;
2. the student's rows are its own input (the prompt where the context was) followed by the
   teacher's answer, each answer token labelled with the teacher's distribution there;
3. training is ``softprompt train``'s loop with the KL divergence from those distributions
   as the loss (``loss.teacher_kl``, in chunks: the full logits never exist), validation
   included, so checkpoints, resume, deep prompts (``--method prefix``) and trackers work
   unchanged. The result is an ordinary prompt folder.

``agreement`` measures a distilled prompt against its teacher on held-out inputs (answers,
tokens, KL, prefill and time to first token); ``softprompt eval --against-teacher`` and
``distill`` itself report it.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import itertools
import json
import math
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor
from transformers import LogitsProcessorList

from softprompt.config import DataConfig, DistillConfig, GenerateConfig
from softprompt.console import batch_starts, say, warn
from softprompt.data import Example, read_records, split_validation
from softprompt.errors import ArtifactError, ConfigError, DataError
from softprompt.generation import LabelsOnly, generate_ids, generation_config, label_sequences
from softprompt.kinds import CAUSAL
from softprompt.loading import LoadedModel, load_model
from softprompt.loss import support, teacher_topk, topk_buckets
from softprompt.outputs import atomic_write, write_json
from softprompt.prefix import Prefix, compile_all, compile_prefix, run_prefix, text_after
from softprompt.prompt import SoftPrompt, embed_tokens
from softprompt.rows import IGNORE_INDEX, Row, encode_example
from softprompt.scoring import evaluate_loss
from softprompt.templates import (
    INPUT,
    PromptFormat,
    as_text,
    check_messages,
    render,
    template_fields,
)
from softprompt.training import TrainResult, train
from softprompt.training.run import TrainData
from softprompt.training.setup import DataSource

TEACHER_DIR = "teacher"  # in the run folder: the teacher's context, answers and targets
SPEC_FILE = "spec.json"
TARGETS_FILE = "targets.safetensors"
MODES = ("context", "template", "system", "shots")


# --- the teacher's context ----------------------------------------------------------------


@dataclass(frozen=True)
class Teacher:
    """The long context the student replaces. ``mode``: 'context' (text placed where the
    soft prompt goes), 'template' (the teacher's own raw template), 'system' (a system
    message) or 'shots' (worked examples before the input)."""

    mode: str
    text: str  # the context, the teacher's template, the system message, or the shots' text
    shots: tuple[tuple[str, str], ...] = ()  # shots: (input, answer) pairs

    @property
    def digest(self) -> str:
        blob = json.dumps([self.mode, self.text, list(self.shots)], ensure_ascii=False)
        return hashlib.sha256(blob.encode("utf-8")).hexdigest()

    def to_json(self) -> dict:
        return {"mode": self.mode, "text": self.text, "shots": [list(s) for s in self.shots],
                "sha256": self.digest}  # fmt: skip

    @classmethod
    def from_json(cls, record: dict, where: str) -> Teacher:
        try:
            shots = tuple((str(a), str(b)) for a, b in record.get("shots") or [])
            teacher = cls(str(record["mode"]), str(record["text"]), shots)
        except (KeyError, TypeError, ValueError):
            raise ArtifactError(f"{where}: not a teacher record (mode, text, shots)") from None
        if teacher.mode not in MODES:
            raise ArtifactError(f"{where}: unknown teacher mode {teacher.mode!r}")
        return teacher


def read_teacher(folder: Path) -> Teacher:
    """The teacher a distilled prompt's folder records (``OUTPUT/teacher/spec.json``), checked:
    a prompt that was not distilled, or a damaged record, is refused in one line."""
    file = folder / TEACHER_DIR / SPEC_FILE
    if not file.is_file():
        raise ConfigError(
            f"{folder} has no teacher record ({TEACHER_DIR}/{SPEC_FILE}): --against-teacher is "
            "for prompts made by `softprompt distill`"
        )
    if file.is_symlink() or file.stat().st_size > MAX_SPEC_BYTES:
        raise ArtifactError(f"{file} is a link or over {MAX_SPEC_BYTES >> 20} MB: not a teacher "
                            "record")  # fmt: skip
    try:
        record = json.loads(file.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ArtifactError(f"{file} is not valid JSON ({err})") from None
    if not isinstance(record, dict):
        raise ArtifactError(f"{file}: not a teacher record (mode, text, shots)")
    teacher = Teacher.from_json(record, str(file))
    if record.get("sha256") not in (None, teacher.digest):
        raise ArtifactError(f"{file}: its text does not match its sha256; the record was changed")
    return teacher


MAX_SPEC_BYTES = 64 << 20


def teacher_from_config(cfg: DistillConfig) -> Teacher:
    """The teacher the flags name: exactly one of --teacher-context, --teacher-template,
    --teacher-system and --shots."""
    given = {name: getattr(cfg, f"teacher_{name}" if name != "shots" else "shots")
             for name in MODES}  # fmt: skip
    given = {k: v for k, v in given.items() if v}
    if len(given) != 1:
        raise ConfigError(
            "distill needs exactly one teacher: --teacher-context FILE (text where the prompt "
            "goes), --teacher-template FILE, --teacher-system FILE or --shots FILE"
            + (f" (got {', '.join('--' + k for k in given)})" if given else "")
        )
    mode, path = next(iter(given.items()))
    if mode == "shots":
        return Teacher("shots", "", tuple(_read_shots(path, cfg)))
    file = Path(path).expanduser()
    if not file.is_file():
        raise ConfigError(f"--teacher-{mode} {path}: no such file")
    text = file.read_text(encoding="utf-8")
    if not text.strip():
        raise ConfigError(f"--teacher-{mode} {path} is empty")
    if mode == "template" and not cfg.data.template:
        raise ConfigError(
            "--teacher-template needs the student's template too: give --template with the "
            "teacher's template less its long context, e.g. 'Review: {input}\\nSentiment:'"
        )
    return Teacher(mode, text)


def _read_shots(path: str, cfg: DistillConfig) -> list[tuple[str, str]]:
    d = cfg.data
    shots = []
    for record, where in read_records(path):
        if d.input_field not in record or d.target_field not in record:
            raise DataError(f"{where}: a shot needs the fields {d.input_field!r} and "
                            f"{d.target_field!r} (--input-field, --target-field)")  # fmt: skip
        shots.append((as_text(record[d.input_field]), as_text(record[d.target_field])))
    if not shots:
        raise ConfigError(f"--shots {path} holds no examples")
    return shots


# --- inputs -------------------------------------------------------------------------------


@dataclass
class Input:
    """One input to distill on: a raw value (with the record's other fields) or a
    conversation up to the answer; ``target`` (optional) is the gold answer."""

    value: str
    fields: dict
    messages: list[dict] | None
    target: str | None
    where: str
    task: None = None  # (one task: ``data.split_validation`` reads it)


def read_inputs(spec: str, d: DataConfig, teacher: Teacher) -> list[Input]:
    """Inputs of a data file: records with the input field (or ``text``), or conversations
    (a last assistant message is kept as the gold answer). With a system-message teacher
    a plain input becomes the user turn of a one-turn conversation."""
    out = []
    for record, where in read_records(spec):
        if isinstance(record.get("messages"), list):
            messages = check_messages(record["messages"], where)
            target = None
            if messages[-1]["role"] == "assistant":
                target = messages.pop()["content"]
            if not messages or messages[-1]["role"] != "user":
                raise DataError(f"{where}: the conversation must end with a user turn (or "
                                "with its answer)")  # fmt: skip
            out.append(Input(messages[-1]["content"], {}, messages, target, where))
            continue
        name = d.input_field if d.input_field in record else "text" if "text" in record else None
        if name is None:
            found = ", ".join(repr(k) for k in record) or "none"
            raise DataError(f"{where}: no field {d.input_field!r} (fields found: {found}); set "
                            "--input-field")  # fmt: skip
        target = record.get(d.target_field)
        value = as_text(record[name])
        messages = [{"role": "user", "content": value}] if teacher.mode == "system" else None
        out.append(Input(value, record, messages, None if target is None else as_text(target),
                         where))  # fmt: skip
    if not out:
        raise DataError(f"{spec} holds no inputs")
    return out


def student_format(cfg: DistillConfig, inputs: list[Input]) -> PromptFormat:
    chat = inputs[0].messages is not None
    if any((x.messages is not None) != chat for x in inputs):
        raise DataError("the inputs mix conversations and plain records; use one kind")
    return cfg.data.prompt_format(chat=chat)


def student_example(fmt: PromptFormat, x: Input) -> Example:
    """The input as training and generation see it, the prompt in the context's place."""
    if x.messages is not None:
        return Example(x.value, x.target, x.where, messages=x.messages)
    head, body = fmt.raw_text(x.value, x.fields, f"{x.where}: ", "the record")
    return Example(body, x.target, x.where, head=head)


def teacher_ids(teacher: Teacher, tokenizer, fmt: PromptFormat, x: Input) -> list[int]:
    """The teacher's tokens for an input, up to where its answer starts."""
    if teacher.mode == "template":
        text = render(teacher.text, x.value, x.fields, (INPUT, fmt.input_field), f"{x.where}: ",
                      "the record")  # fmt: skip
        return tokenizer(text, add_special_tokens=True)["input_ids"]
    if fmt.chat and teacher.mode in ("system", "shots"):
        turns = [m for m in x.messages if m["role"] != "system" or teacher.mode == "shots"]
        if teacher.mode == "system":
            turns = [{"role": "system", "content": teacher.text}, *turns]
        else:  # the shots as earlier turns, after any system message
            system = [m for m in turns if m["role"] == "system"]
            shots = [{"role": r, "content": c} for q, a in teacher.shots
                     for r, c in (("user", q), ("assistant", a))]  # fmt: skip
            turns = system + shots + [m for m in turns if m["role"] != "system"]
        plain = dataclasses.replace(fmt, position="start", system=None)
        _, ids = encode_example(tokenizer, plain, Example(x.value, None, x.where, messages=turns))
        return ids
    if teacher.mode == "system":
        raise ConfigError("--teacher-system is a system message: it needs a chat model's "
                          "conversations")  # fmt: skip
    # the context's tokens exactly where the student's virtual tokens go
    head, ids = encode_example(tokenizer, fmt, student_example(fmt, x))
    context = tokenizer(context_text(teacher, fmt), add_special_tokens=False)["input_ids"]
    if head is None:
        bos = tokenizer.bos_token_id
        lead = ids[:1] if ids and bos is not None and ids[0] == bos else []
        return lead + context + ids[len(lead) :]
    return head + context + ids


def context_text(teacher: Teacher, fmt: PromptFormat) -> str:
    """The text a raw teacher puts where the prompt goes: its context, or its shots each in
    the student's template followed by their answers."""
    if teacher.mode != "shots":
        return teacher.text
    blocks = []
    for q, a in teacher.shots:
        shown = render(fmt.template, q, {}, (INPUT, fmt.input_field), "", "the shot")
        sep = "" if not shown or shown[-1].isspace() else fmt.target_delimiter
        blocks.append(shown + sep + a)
    return "\n\n".join(blocks) + "\n\n"


# --- the teacher's answers and distributions, cached ---------------------------------------


@dataclass
class Targets:
    """The teacher's answers: for each answer, its input's index, its tokens and the
    teacher's top-k distribution before each of them."""

    source: list[int]  # which input each answer belongs to
    answers: list[list[int]]
    ids: list[torch.Tensor]  # (n, k) per answer
    logp: list[torch.Tensor]  # (n, k+1) per answer
    prompt_tokens: list[int]  # the teacher's input length of each input


def _key(cfg: DistillConfig, teacher: Teacher, loaded, prompts: list[list[int]]) -> str:
    blob = json.dumps({
        "teacher": teacher.digest, "model": loaded.name, "k": cfg.teacher_top_k,
        "samples": cfg.teacher_samples, "temperature": cfg.teacher_temperature,
        "max_new_tokens": cfg.teacher_max_new_tokens, "seed": cfg.seed,
        "inputs": hashlib.sha256(json.dumps(prompts).encode()).hexdigest(),
    })  # fmt: skip
    return hashlib.sha256(blob.encode()).hexdigest()


def teacher_targets(
    cfg: DistillConfig, teacher: Teacher, loaded, fmt: PromptFormat, inputs: list[Input],
    folder: Path | None,
) -> Targets:  # fmt: skip
    """The teacher's answers and distributions for ``inputs``, read from ``folder`` when an
    earlier run with the same teacher, model, inputs and settings left them there."""
    tok = loaded.tokenizer
    prompts = [teacher_ids(teacher, tok, fmt, x) for x in inputs]
    key = _key(cfg, teacher, loaded, prompts)
    file = None if folder is None else folder / TARGETS_FILE
    if file is not None and file.is_file():
        cached = _read_targets(file, key)
        if cached is not None:
            say(f"teacher: {len(cached.answers)} answers and their distributions read from "
                f"{file} (not generated again)")  # fmt: skip
            return cached
    started = time.perf_counter()
    limit = getattr(loaded.model.config, "max_position_embeddings", None)
    longest = max(len(p) for p in prompts) + cfg.teacher_max_new_tokens
    if limit is not None and longest > limit:
        raise ConfigError(f"the teacher's longest input and answer take {longest} positions; "
                          f"{loaded.name} holds {limit}: shorten the context or "
                          "--teacher-max-new-tokens")  # fmt: skip
    source = [i for i in range(len(inputs)) for _ in range(cfg.teacher_samples)]
    rows = [prompts[i] for i in source]
    said = _teacher_answers(cfg, loaded, fmt, rows)
    ids, logp = _distributions(loaded.model, rows, said, cfg.teacher_top_k, cfg.batch_size,
                               "teacher distributions")  # fmt: skip
    targets = Targets(source, said, ids, logp, [len(p) for p in prompts])
    took = time.perf_counter() - started
    say(f"teacher: {len(said)} answers ({statistics.mean(map(len, said)):.1f} tokens on "
        f"average) after {statistics.mean(map(len, prompts)):.0f} input tokens, with their "
        f"top-{cfg.teacher_top_k} distributions, in {took:.0f}s")  # fmt: skip
    if file is not None:
        _write_targets(file, key, targets)
    return targets


def _teacher_answers(cfg: DistillConfig, loaded, fmt: PromptFormat, prompts) -> list[list[int]]:
    """The teacher's continuation of each prompt, up to and with its stop token."""
    gen = GenerateConfig(max_new_tokens=cfg.teacher_max_new_tokens,
                         temperature=cfg.teacher_temperature, seed=cfg.seed)  # fmt: skip
    context = shared_context(loaded.model, prompts)
    return answers(loaded, fmt, prompts, None, None, gen, cfg.batch_size, "teacher answers",
                   context)  # fmt: skip


@torch.no_grad()
def answers(loaded, fmt: PromptFormat, ids: list[list[int]], prompt, heads, gen: GenerateConfig,
            batch_size: int, progress: str | None = None, context: tuple | None = None,
            labels: list[str] | None = None) -> list[list[int]]:  # fmt: skip
    """Each row's continuation (the base model's, or with ``prompt`` after its ``heads``, from
    the compiled prefix), up to and with its stop token; a progress bar named ``progress``.
    ``context`` (``shared_context``, base model only): the tokens every row starts with,
    compiled once; each row continues from it. ``labels`` (a prompt trained in classification
    mode): the prompt's rows answer with one of them, as ``generate`` answers for it."""
    tok, model = loaded.tokenizer, loaded.model
    stops = fmt.stop_ids(tok)
    gen_cfg = generation_config(tok, gen, stops)
    torch.manual_seed(gen.seed)
    heads = heads or [None] * len(ids)
    prompts = compile_all(model, [prompt] * len(ids), heads) if prompt is not None else None
    if context is not None and context[1] is not None and prompt is None:
        n, compiled = context
        prompts, ids = [compiled] * len(ids), [row[n:] for row in ids]
    order = sorted(range(len(ids)), key=lambda i: len(ids[i]))  # little padding
    out: list[list[int]] = [[] for _ in ids]
    for s in batch_starts(range(0, len(order), batch_size), progress):
        batch = order[s : s + batch_size]
        rows = [prompts[i] for i in batch] if prompts else [None] * len(batch)
        only = None
        if labels and prompt is not None:
            sequences = label_sequences(tok, labels, fmt)
            only = LogitsProcessorList([LabelsOnly([sequences] * len(batch), gen_cfg.eos_token_id)])
        new = generate_ids(model, [ids[i] for i in batch], rows, gen_cfg,
                           heads=[heads[i] for i in batch], processors=only)  # fmt: skip
        for i, row in zip(batch, new.tolist()):
            end = next((j for j, t in enumerate(row) if t in stops), None)
            out[i] = row[: end + 1] if end is not None else row
    return [a if a else [stops[0]] for a in out]


# Teacher inputs that share at least this many leading tokens (the long context) run them
# once, as a compiled prefix; shorter shared starts are not worth a cache.
MIN_SHARED = 16


def shared_length(model, rows: list[list[int]]) -> int:
    """How many leading tokens every row shares (each keeping at least one of its own), where
    the model reads a shared prefix exactly (``loss.support``); 0 when under MIN_SHARED."""
    n, first = min(len(r) for r in rows) - 1, rows[0]
    for row in rows[1:]:
        n = next((j for j in range(n) if row[j] != first[j]), n)
    return n if n >= MIN_SHARED and support(model).shared_prefix else 0


@torch.no_grad()
def shared_context(model, rows: list[list[int]]) -> tuple[int, Prefix | None]:
    """(how many leading tokens ``rows`` share, their compiled prefix), or (0, None)."""
    n = shared_length(model, rows)
    if not n:
        return 0, None
    device = model.get_input_embeddings().weight.device
    context = embed_tokens(model, torch.tensor([rows[0][:n]], device=device))[0]
    return n, compile_prefix(model, SoftPrompt(context))


@torch.no_grad()
def _distributions(model, prompts, answers, k: int, batch_size: int, progress: str | None = None):
    """The teacher's top-k distribution before each answer token: (n, k) ids and (n, k+1)
    log-probabilities per answer, read off its hidden states in chunks. The tokens every
    prompt shares (``shared_length``) run once; each batch continues from their cache."""
    device = model.get_input_embeddings().weight.device
    fast = support(model).fast_head
    ids, logp = [None] * len(prompts), [None] * len(prompts)
    shared = shared_length(model, prompts) if fast else 0
    if shared:
        context = embed_tokens(model, torch.tensor([prompts[0][:shared]], device=device))
        cache, _ = run_prefix(model, context)  # one row of the shared tokens
        prompts = [p[shared:] for p in prompts]
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]) + len(answers[i]))
    for s in batch_starts(range(0, len(order), batch_size), progress):
        batch = order[s : s + batch_size]
        seqs = [prompts[i] + answers[i] for i in batch]
        width = max(map(len, seqs))
        tokens = torch.zeros(len(seqs), width, dtype=torch.long, device=device)
        mask = torch.zeros_like(tokens)
        for r, seq in enumerate(seqs):
            tokens[r, : len(seq)] = torch.tensor(seq)
            mask[r, : len(seq)] = 1
        at = torch.zeros_like(tokens, dtype=torch.bool)
        for r, i in enumerate(batch):  # position t predicts token t+1
            at[r, len(prompts[i]) - 1 : len(prompts[i]) - 1 + len(answers[i])] = True
        if shared:  # the rows after the shared context, each reading its cache
            rows = copy.deepcopy(cache)
            rows.batch_select_indices(torch.zeros(len(batch), dtype=torch.long, device=device))
            text = text_after(model, rows, {"input_ids": tokens, "attention_mask": mask})
            top, lp = teacher_topk(model, text[at], k)
        elif fast:
            hidden = model.base_model(input_ids=tokens, attention_mask=mask).last_hidden_state
            top, lp = teacher_topk(model, hidden[at], k)
        else:  # a model whose head cannot run apart: its own logits, as a hidden state
            top, lp = topk_buckets(model(input_ids=tokens, attention_mask=mask).logits[at], k)
        start = 0
        for i in batch:
            n = len(answers[i])
            ids[i], logp[i] = top[start : start + n].cpu(), lp[start : start + n].cpu()
            start += n
    return ids, logp


def _write_targets(file: Path, key: str, t: Targets) -> None:
    file.parent.mkdir(parents=True, exist_ok=True)
    lengths = [len(a) for a in t.answers]
    tensors = {
        "source": torch.tensor(t.source, dtype=torch.long),
        "lengths": torch.tensor(lengths, dtype=torch.long),
        "answers": torch.tensor([x for a in t.answers for x in a], dtype=torch.long),
        "ids": torch.cat(t.ids).to(torch.int32),
        "logp": torch.cat(t.logp).float(),
        "prompt_tokens": torch.tensor(t.prompt_tokens, dtype=torch.long),
    }
    atomic_write(file, lambda path: save_file(tensors, str(path), metadata={"key": key}))


def _read_targets(file: Path, key: str) -> Targets | None:
    """Cached targets, or None when they were made for something else (or are damaged)."""
    from safetensors import safe_open

    try:
        with safe_open(str(file), "pt") as fh:
            if (fh.metadata() or {}).get("key") != key:
                warn(f"{file} holds another teacher's answers (context, model, inputs or "
                     "settings changed): generating them again")  # fmt: skip
                return None
        t = load_file(str(file))
        lengths = t["lengths"].tolist()
        bounds = [0, *itertools.accumulate(lengths)]
        answers = t["answers"].tolist()
        ids, logp = t["ids"].long(), t["logp"]
        if bounds[-1] != len(answers) or ids.shape[0] != len(answers) != logp.shape[0]:
            raise ValueError("lengths disagree")
    except Exception as err:  # noqa: BLE001 - a damaged cache is regenerated, never trusted
        warn(f"{file} cannot be read ({err}); generating the teacher's answers again")
        return None
    spans = list(zip(bounds[:-1], bounds[1:]))
    return Targets(t["source"].tolist(), [answers[a:b] for a, b in spans],
                   [ids[a:b] for a, b in spans], [logp[a:b] for a, b in spans],
                   t["prompt_tokens"].tolist())  # fmt: skip


# --- the student's rows -------------------------------------------------------------------


def student_rows(tokenizer, fmt: PromptFormat, inputs: list[Input], targets: Targets,
                 max_text: int, encoded: list[tuple] | None = None) -> list[Row]:  # fmt: skip
    """Each teacher answer after the student's own input, labelled with the teacher's
    distributions; too long a row loses its input's start (its head and the answer stay).
    Each input is tokenized once however many answers it has (``encoded``: already done)."""
    if encoded is None:
        encoded = [encode_example(tokenizer, fmt, student_example(fmt, x)) for x in inputs]
    rows, cut = [], 0
    for i, answer, ids, logp in zip(targets.source, targets.answers, targets.ids, targets.logp):
        head, body = encoded[i]
        head = head or []
        if len(head) + len(answer) >= max_text:  # the answer's end goes first, then the input's
            keep = max(max_text - len(head) - 1, 1)
            answer, ids, logp = answer[:keep], ids[:keep], logp[:keep]
        room = max(max_text - len(head) - len(answer), 1)
        if len(body) > room:
            body, cut = body[len(body) - room :], cut + 1
        tokens = head + body + answer
        labels = [IGNORE_INDEX] * (len(head) + len(body)) + answer
        rows.append(Row(tokens, labels, prompt_at=len(head), soft=(ids, logp)))
    if cut:
        warn(f"{cut} of {len(rows)} student rows were longer than {max_text} tokens and lost "
             "their input's start; raise --max-length to keep them whole")  # fmt: skip
    return rows


# --- the run --------------------------------------------------------------------------------


class DistillSource(DataSource):
    """A distillation run's rows: the student's inputs followed by the teacher's answers,
    labelled with the teacher's distributions (cached in ``OUTPUT/teacher/``)."""

    def __init__(self, cfg: DistillConfig):
        self.teacher = teacher_from_config(cfg)
        self.inputs: tuple[list[Input], list[Input]] | None = None
        self.fmt: PromptFormat | None = None

    def examples(self, cfg: DistillConfig) -> tuple[list[Example], list[Example]]:
        if self.inputs is None:
            d = cfg.data
            inputs = read_inputs(d.data, d, self.teacher)
            if d.validation:
                self.inputs = inputs, read_inputs(d.validation, d, self.teacher)
            else:
                self.inputs = split_validation(inputs, d.val_fraction, cfg.seed)
            self.fmt = student_format(cfg, self.inputs[0] + self.inputs[1])
        return tuple([student_example(self.fmt, x) for x in part] for part in self.inputs)

    def prepare(self, cfg: DistillConfig, train_ex, val_ex, loaded: LoadedModel, output: Path,
                device) -> TrainData:  # fmt: skip
        if loaded.kind is not CAUSAL:
            raise ConfigError(f"distill: the teacher and student are causal LMs; this is a "
                              f"{loaded.kind.name} model")  # fmt: skip
        train_in, val_in = self.inputs
        folder = output / TEACHER_DIR
        folder.mkdir(parents=True, exist_ok=True)
        write_json(folder / SPEC_FILE, self.teacher.to_json())
        everything = train_in + val_in
        targets = teacher_targets(cfg, self.teacher, loaded, self.fmt, everything, folder)
        max_text = cfg.data.max_length - cfg.prompt.num_virtual_tokens
        rows = student_rows(loaded.tokenizer, self.fmt, everything, targets, max_text)
        train_rows = [r for r, i in zip(rows, targets.source) if i < len(train_in)]
        val_rows = [r for r, i in zip(rows, targets.source) if i >= len(train_in)]
        student = [len(r.input_ids) - len(a) for r, a in zip(rows, targets.answers)]
        info = {**dataclasses.asdict(cfg.data), "mode": "distill",
                "train_examples": len(train_rows), "val_examples": len(val_rows),
                "teacher": {"mode": self.teacher.mode, "sha256": self.teacher.digest,
                            "input_tokens": round(statistics.mean(targets.prompt_tokens), 1),
                            "student_input_tokens": round(statistics.mean(student), 1),
                            "answers": len(targets.answers),
                            "answer_tokens": round(statistics.mean(map(len, targets.answers)), 1),
                            "top_k": cfg.teacher_top_k, "samples": cfg.teacher_samples,
                            "temperature": cfg.teacher_temperature,
                            "max_new_tokens": cfg.teacher_max_new_tokens}}  # fmt: skip
        say(f"data: {len(train_rows)} training and {len(val_rows)} validation rows (the "
            f"teacher's answers; {info['teacher']['input_tokens']:.0f} teacher input tokens "
            f"against {info['teacher']['student_input_tokens']:.0f} + "
            f"{cfg.prompt.num_virtual_tokens} virtual for the student)")  # fmt: skip
        if cfg.mix_labels:
            k = targets.ids[0].shape[1]
            labelled = gold_rows(cfg, loaded, self.fmt, train_in, max_text, k)
            train_rows += labelled
            info["labelled_rows"] = len(labelled)
            say(f"--mix-labels: {len(labelled)} training rows of gold answers beside the "
                "teacher's (their loss: the cross-entropy)")  # fmt: skip
        return TrainData(train_rows, [val_rows], [""], info, None, self.fmt)


def gold_rows(cfg: DistillConfig, loaded: LoadedModel, fmt: PromptFormat, inputs: list[Input],
              max_text: int, k: int) -> list[Row]:  # fmt: skip
    """Rows of the inputs' gold answers, tokenized as ``train`` tokenizes them, each answer
    token's target a one-hot distribution in the teacher's table shape (the KL divergence
    from a one-hot distribution is the cross-entropy)."""
    examples = []
    for x in inputs:
        if x.target is None:
            continue
        ex = student_example(fmt, x)
        if x.messages is not None:
            ex.messages = [*x.messages, {"role": "assistant", "content": x.target}]
        examples.append(ex)
    if not examples:
        raise ConfigError("--mix-labels: no training input has a gold answer (--target-field, "
                          "or a conversation ending with the assistant's answer)")  # fmt: skip
    delimiter = "" if fmt.chat else fmt.target_delimiter
    rows = loaded.kind.tokenize(examples, loaded.tokenizer, max_text, None, fmt, delimiter,
                                cfg.data.loss_on)  # fmt: skip
    for row in rows:
        gold = torch.tensor([t for t in row.labels if t != IGNORE_INDEX])
        row.soft = one_hot_targets(gold, k)
    return rows


def one_hot_targets(gold: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """Teacher-table rows putting all the probability on ``gold`` (n,): ids (n, k), the gold
    id first and k-1 other ids after it, and log-probabilities (n, k+1): 0, then -inf."""
    others = torch.arange(k).expand(len(gold), k)
    others = others + (others >= gold[:, None]).long()  # k ids that skip the gold one
    ids = torch.cat([gold[:, None], others[:, : k - 1]], dim=1)
    logp = torch.full((len(gold), k + 1), -math.inf)
    logp[:, 0] = 0.0
    return ids, logp


# Passes over the teacher's answers when neither --epochs nor --max-steps is given, whatever
# their number (train's decoder rule, kinds.epochs_for, gives 10 only up to 128 rows at batch
# 8): on trec the distilled prompt kept gaining up to 10 (0.23, 0.34, 0.38 at 3, 6, 10 against
# the teacher's 0.49), on cr from 3 to 6 (0.83, 0.87 against 0.89); the best epoch by
# validation KL is kept (docs/measurements.md, section 8).
EPOCHS = 10


def distill(cfg: DistillConfig, loaded: LoadedModel | None = None,
            progress: bool = True) -> TrainResult:  # fmt: skip
    """Train ``cfg.prompt.num_virtual_tokens`` virtual tokens to stand in for the teacher's
    context, save them as an ordinary prompt folder, and compare them with the teacher on
    held-out inputs (``OUTPUT/teacher-agreement.json``)."""
    source = DistillSource(cfg)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        raise ConfigError("distill runs in one process for now; run it without torchrun")
    source.examples(cfg)  # bad data or flags fail before the model loads
    loaded = loaded or load_model(cfg.model)
    if cfg.prompt.init == "auto":  # the context's own first tokens
        words = _context_words(source.teacher, source.fmt, loaded.tokenizer,
                               cfg.prompt.num_virtual_tokens)  # fmt: skip
        cfg = dataclasses.replace(cfg, prompt=dataclasses.replace(
            cfg.prompt, init="text", init_text=words))  # fmt: skip
        say(f"--init auto: the teacher's context's first {cfg.prompt.num_virtual_tokens} "
            f"tokens ({words!r})")  # fmt: skip
    # --method: train's default for the model's kind (a deep prompt for decoders; on the
    # distillation benchmark it matches the teacher closer: docs/measurements.md, section 8)
    if cfg.epochs is None and cfg.max_steps is None:
        cfg = dataclasses.replace(cfg, epochs=EPOCHS)
        say(f"{EPOCHS} epochs: distill's default (docs/measurements.md, section 8; --epochs to "
            "change)")  # fmt: skip
    result = train(cfg, loaded, progress, source)
    held_out = source.inputs[1][: cfg.agreement_inputs]
    if held_out:
        gen = GenerateConfig(max_new_tokens=cfg.teacher_max_new_tokens, seed=cfg.seed)
        report = agreement(loaded, result.prompt, source.fmt, source.teacher, held_out, gen,
                           cfg.batch_size, cfg.teacher_top_k)  # fmt: skip
        write_json(Path(result.output) / "teacher-agreement.json", report)
        report.pop("answers")
        say(describe(report))
        result.summary["agreement"] = report
    return result


def _context_words(teacher: Teacher, fmt: PromptFormat, tokenizer, n: int) -> str:
    """The words a distilled prompt starts from: the first ``n`` tokens of the teacher's
    context (a template's with its fields left out)."""
    text = context_text(teacher, fmt)
    if teacher.mode == "template":
        for name in template_fields(text, "--teacher-template"):
            text = text.replace("{" + name + "}", " ")
    ids = tokenizer(" ".join(text.split()), add_special_tokens=False)["input_ids"][:n]
    return tokenizer.decode(ids).strip() or "context"


# --- against the teacher ----------------------------------------------------------------------


def _normal(text: str) -> str:
    """An answer as compared: its first line, stripped, lower case, no final full stop."""
    lines = text.strip().splitlines()
    return (lines[0] if lines else "").strip().rstrip(".").strip().lower()


@torch.no_grad()
def _first_token_s(loaded, ids, prompt, heads, fmt, batch_size: int, context=None) -> float:
    """Seconds per input to the first new token, in batches (a prompt or shared context from
    its compiled prefix, compiled before the clock starts, as a server holds it)."""
    gen = GenerateConfig(max_new_tokens=1)
    warm = ids[:1], prompt, heads[:1] if heads else None
    answers(loaded, fmt, *warm, gen, 1, context=context)
    started = time.perf_counter()
    answers(loaded, fmt, ids, prompt, heads, gen, batch_size, context=context)
    return (time.perf_counter() - started) / len(ids)


@dataclass
class TeacherSide:
    """What the teacher says and costs on some inputs, computed once for many students."""

    ids: list[list[int]]  # its input tokens
    answers: list[list[int]]  # its greedy answers
    texts: list[str]
    targets: Targets  # its distributions over its answers
    first_token_s: float  # per input, every token run (no prefix cache)
    cached_first_token_s: float | None  # per input, its shared context compiled once


@torch.no_grad()
def teacher_side(loaded: LoadedModel, fmt: PromptFormat, teacher: Teacher, inputs: list[Input],
                 gen: GenerateConfig, batch_size: int = 8,
                 top_k: int = 32) -> TeacherSide:  # fmt: skip
    """The teacher's greedy answers, distributions and time to first token on ``inputs``."""
    tok, model = loaded.tokenizer, loaded.model
    t_ids = [teacher_ids(teacher, tok, fmt, x) for x in inputs]
    context = shared_context(model, t_ids)
    greedy = dataclasses.replace(gen, temperature=0.0)
    t_ans = answers(loaded, fmt, t_ids, None, None, greedy, batch_size, context=context)
    ids, logp = _distributions(model, t_ids, t_ans, top_k, batch_size)
    targets = Targets(list(range(len(inputs))), t_ans, ids, logp, [len(t) for t in t_ids])
    plain = _first_token_s(loaded, t_ids, None, None, fmt, batch_size)
    cached = None
    if context[1] is not None:
        cached = _first_token_s(loaded, t_ids, None, None, fmt, batch_size, context)
    texts = [tok.decode(a, skip_special_tokens=True) for a in t_ans]
    return TeacherSide(t_ids, t_ans, texts, targets, plain, cached)


@torch.no_grad()
def agreement(loaded: LoadedModel, prompt, fmt: PromptFormat, teacher: Teacher,
              inputs: list[Input], gen: GenerateConfig, batch_size: int = 8,
              top_k: int = 32, side: TeacherSide | None = None,
              labels: list[str] | None = None) -> dict:  # fmt: skip
    """A prompt (None: the bare model) against its teacher on ``inputs``: how often their
    greedy answers agree (``answer_match``: the first line, case and final full stop aside),
    the share of the teacher's answer tokens the student's greedy answer reproduces before
    it first differs (``token_match``), the mean KL divergence per teacher answer token
    (teacher-forced), the task metric of both where the inputs have gold answers, and the
    prefill tokens and time to first token of both (the teacher's also with its shared
    context compiled once, as a server with a prefix cache holds it). ``side``: the teacher's
    part, computed once (``teacher_side``) for several prompts on the same inputs. ``labels``:
    the labels a prompt trained in classification mode answers with (``trained_choices``)."""
    tok, model = loaded.tokenizer, loaded.model
    side = side or teacher_side(loaded, fmt, teacher, inputs, gen, batch_size, top_k)
    t_ids, t_ans, t_txt = side.ids, side.answers, side.texts
    encoded = [encode_example(tok, fmt, student_example(fmt, x)) for x in inputs]
    if prompt is None:  # the bare model with the student's input (a baseline)
        s_ids, heads = [(h or []) + b for h, b in encoded], None
    else:
        s_ids, heads = [b for _, b in encoded], [h for h, _ in encoded]
    greedy = dataclasses.replace(gen, temperature=0.0)
    s_ans = answers(loaded, fmt, s_ids, prompt, heads, greedy, batch_size, labels=labels)
    s_txt = [tok.decode(a, skip_special_tokens=True) for a in s_ans]
    match = [_normal(a) == _normal(b) for a, b in zip(t_txt, s_txt)]
    common = [next((j for j, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
              for a, b in zip(t_ans, s_ans)]  # fmt: skip
    rows = student_rows(tok, fmt, inputs, side.targets, 1 << 30, encoded)
    kl = evaluate_loss(model, prompt, rows, batch_size, tok.pad_token_id)
    n = 0 if prompt is None else prompt.num_virtual_tokens
    report = {
        "inputs": len(inputs),
        "answer_match": sum(match) / len(match),
        "token_match": statistics.mean(c / len(a) for c, a in zip(common, t_ans)),
        "kl_per_token": kl["loss"],
        "teacher_prefill_tokens": statistics.mean(map(len, t_ids)),
        "student_prefill_tokens": statistics.mean(len(h or []) + len(b) + n for h, b in encoded),
        "examples": [{"teacher": a, "student": b} for a, b in zip(t_txt[:5], s_txt[:5])],
        "answers": [
            {"input": x.value, "teacher": a, "student": b, "agree": m}
            for x, a, b, m in zip(inputs, t_txt, s_txt, match)
        ],  # fmt: skip
    }
    report["prefill_ratio"] = report["teacher_prefill_tokens"] / report["student_prefill_tokens"]
    gold = [x.target for x in inputs]
    if all(g is not None for g in gold):
        for who, said in (("teacher", t_txt), ("student", s_txt)):
            report[f"{who}_metric"] = statistics.mean(
                _normal(a) == _normal(g) for a, g in zip(said, gold)
            )
        report["metric"] = "exact match of the first line"
    t_s, s_s = side.first_token_s, _first_token_s(loaded, s_ids, prompt, heads, fmt, batch_size)
    report.update(
        teacher_first_token_ms=1000 * t_s,
        student_first_token_ms=1000 * s_s,
        first_token_speedup=t_s / s_s if s_s > 0 else None,
    )
    if side.cached_first_token_s is not None:
        report["teacher_cached_first_token_ms"] = 1000 * side.cached_first_token_s
        report["cached_first_token_speedup"] = side.cached_first_token_s / s_s if s_s > 0 else None
    return report


def describe(r: dict) -> str:
    """One line for a person: the agreement report's main numbers."""
    metric = (f"; task metric teacher {r['teacher_metric']:.3f}, this prompt "
              f"{r['student_metric']:.3f}" if "teacher_metric" in r else "")  # fmt: skip
    inputs = f"{r['inputs']} held-out input" + ("s" if r["inputs"] != 1 else "")
    return (
        f"against the teacher on {inputs}: answers agree "
        f"{r['answer_match']:.1%}, tokens {r['token_match']:.1%}, KL {r['kl_per_token']:.3f}"
        f"/token{metric}; prefill {r['teacher_prefill_tokens']:.0f} -> "
        f"{r['student_prefill_tokens']:.0f} tokens ({r['prefill_ratio']:.1f}x fewer), first "
        f"token {r['teacher_first_token_ms']:.0f} -> {r['student_first_token_ms']:.0f} ms"
    )
