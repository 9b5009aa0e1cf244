"""Examples -> token rows (labels only where the loss belongs, the prompt's place marked) ->
padded, length-bucketed batches; and an input's tokens for generation and scoring, split where
the prompt goes."""

from __future__ import annotations

import random
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import Tensor

from softprompt.console import warn
from softprompt.data import Example
from softprompt.templates import PromptFormat

Fields = Mapping[str, object]  # a template's other fields


IGNORE_INDEX = -100  # the one label value that carries no loss


@dataclass
class Row:
    """One tokenized example: its ids and their labels (the loss's targets)."""

    input_ids: list[int]
    labels: list[int]  # IGNORE_INDEX where no loss
    task: int = 0  # index of the row's task (its prompt) in a multi-task run
    prompt_at: int = 0  # where the virtual tokens go: before input_ids[prompt_at]
    # distillation: the teacher's distribution at each labelled position, in order:
    # (top-k token ids (n, k), their log-probabilities and the rest's (n, k+1)); see ``collate``
    soft: tuple[Tensor, Tensor] | None = None


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
    warn_cut(cut, len(rows), max_text_tokens)
    return rows


def warn_cut(cut: int, total: int, limit: int) -> None:
    """Say how many rows --max-length cut, if any."""
    if cut:
        warn(
            f"{cut} of {total} rows were longer than {limit} text tokens and were cut; raise "
            "--max-length to keep them whole"
        )


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
        pieces = [(body, True)]
    else:
        pieces = [(body, False), (_target_ids(ex, tokenizer, delimiter), True)]
    head, head_cut = _cut_head(head, len(body), sum(len(p) for p, _ in pieces), limit, tokenizer)
    row, cut = _cut_row(head, pieces, limit)
    return row, cut or head_cut


def _cut_head(
    head: list[int], body: int, after: int, limit: int, tokenizer
) -> tuple[list[int], bool]:
    """A raw template's head (the text before {soft_prompt}, after its leading special
    tokens) that holds the input (``{premise} ... {soft_prompt}Answer:``, its text longer
    than the ``body`` tokens after the marker): when the row (``after`` tokens follow the
    head) is too long, its text is cut from the start, so that the end of the row, the
    answer, survives; a template whose input follows the marker is cut there instead
    (``_cut_row``), its head (an instruction) kept. Returns (head, whether cut)."""
    over = len(head) + after - limit
    if over <= 0:  # most rows: nothing to look at
        return head, False
    special = set(tokenizer.all_special_ids)
    lead = next((i for i, t in enumerate(head) if t not in special), len(head))
    drop = min(over, len(head) - lead)
    if len(head) - lead <= body or drop <= 0:
        return head, False
    return head[:lead] + head[lead + drop :], True


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
    if any(r.soft is not None for r in rows):
        _soft_targets(rows, batch)
    return batch


def _soft_targets(rows: list[Row], batch: dict[str, Tensor]) -> None:
    """Distillation rows: the teacher's distributions of the batch in one table (``soft_ids``
    (M, k), ``soft_logp`` (M, k+1)), and each labelled position's label replaced by its row
    of the table, so every path that moves labels about (prompt placement, shared prefixes)
    carries the teacher's targets with them; the loss reads them back (``loss.py``)."""
    if any(r.soft is None for r in rows):
        raise ValueError("a batch mixes rows with and without teacher targets")
    labels, start = batch["labels"], 0
    for i, r in enumerate(rows):
        where = (labels[i] != IGNORE_INDEX).nonzero().squeeze(1)
        if len(where) != len(r.soft[0]):
            raise ValueError(f"a row has {len(where)} labels but {len(r.soft[0])} teacher targets")
        labels[i, where] = torch.arange(start, start + len(where))
        start += len(where)
    batch["soft_ids"] = torch.cat([r.soft[0] for r in rows]).long()
    batch["soft_logp"] = torch.cat([r.soft[1] for r in rows]).float()


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
