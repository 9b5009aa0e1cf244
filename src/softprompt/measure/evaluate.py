"""Measure a model, with or without a soft prompt: choice accuracy and generations.

Following lm-evaluation-harness, a model needs three things here: the loss of target
tokens and the log-likelihood of a continuation (multiple choice is the argmax over the
choices' log-likelihoods), and generation. Unlike the harness, which runs the whole
sequence once per choice, ``score_after`` runs each input once (behind the compiled prompt
prefix) and scores every continuation from its cache: a single-token choice reads the one
distribution at the input's end, longer ones run only their own tokens. Every function
takes the model and tokenizer rather than a run folder, so `compare` can measure LoRA and
fine-tuned models the same way.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn
from transformers import DynamicCache

from softprompt.data import IGNORE_INDEX, Row
from softprompt.generation import GenerationRow, pack_rows
from softprompt.loss import (
    continuation_rows,
    head_logits,
    row_logprobs,
    support,
    token_logprobs,
)
from softprompt.measure import metrics
from softprompt.prefix import compile_all
from softprompt.prompt import SoftPrompt, embed_tokens


@dataclass
class Scoring:
    """One input (its head before the prompt, if any, and its tokens) and the continuations
    to score after it; ``counted[j][t]``: whether token t of continuation j counts (default
    all)."""

    head: list[int] | None
    ids: list[int]
    continuations: list[list[int]]
    counted: list[list[bool]] | None = field(default=None)


@torch.no_grad()
def score_after(
    model: nn.Module,
    prompt: SoftPrompt | None,
    items: Sequence[Scoring],
    batch_size: int = 8,
) -> list[list[tuple[float, int]]]:
    """(summed log-probability, counted tokens) of every continuation of every item.

    Each input runs once, behind the prompt compiled once per distinct head; continuations
    run from a copy of the input's cache (rows as ``generation.pack_rows`` lays them out:
    left-padded, positions counted from the mask, so a row scores as it would alone).
    """
    prompts = compile_all(model, [prompt] * len(items), [it.head for it in items])
    order = sorted(range(len(items)), key=lambda i: len(items[i].ids) + len(items[i].head or []))
    out: list[list[tuple[float, int]]] = [[] for _ in items]
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        rows = [
            GenerationRow(
                items[i].ids if p is not None else (items[i].head or []) + items[i].ids, p
            )
            for i, p in ((i, prompts[i]) for i in idx)
        ]
        for i, scores in zip(idx, _score_batch(model, rows, [items[i] for i in idx])):
            out[i] = scores
    return out


def _score_batch(
    model: nn.Module, rows: list[GenerationRow], items: list[Scoring]
) -> list[list[tuple[float, int]]]:
    embeds, mask, cache = pack_rows(model, rows)
    c = 0 if cache is None else cache.get_seq_length()
    positions = (mask.cumsum(dim=1) - 1).clamp(min=0)
    cache = cache if cache is not None else DynamicCache()
    hidden = model.base_model(
        inputs_embeds=embeds[:, c:],
        attention_mask=mask,
        position_ids=positions[:, c:],
        past_key_values=cache,
        use_cache=True,
    ).last_hidden_state[:, -1]  # (B, H): predicts every continuation's first token
    first = torch.log_softmax(head_logits(model, hidden).float(), dim=-1)  # (B, V)
    rest = _continue(model, cache, mask, positions[:, -1], items)
    out = []
    for b, it in enumerate(items):
        scores = []
        for j, cont in enumerate(it.continuations):
            counted = it.counted[j] if it.counted else [True] * len(cont)
            logp = [float(first[b, cont[0]])] + rest.get((b, j), [])
            scores.append((sum(lp for lp, k in zip(logp, counted) if k), sum(counted)))
        out.append(scores)
    return out


def _continue(
    model: nn.Module, cache: DynamicCache, mask: Tensor, last: Tensor, items: list[Scoring]
) -> dict[tuple[int, int], list[float]]:
    """log p of tokens 2.. of every continuation longer than one token, keyed by (input,
    continuation): only those rows run, each from its input's cache (rows selected, not
    copied per continuation); continuations are right-padded (the padding is never read)."""
    pairs = [(b, j) for b, it in enumerate(items) for j, c in enumerate(it.continuations)
             if len(c) > 1]  # fmt: skip
    if not pairs:
        return {}
    device = mask.device
    longest = max(len(items[b].continuations[j]) for b, j in pairs)
    ids = torch.zeros(len(pairs), longest, dtype=torch.long, device=device)
    cont_mask = torch.zeros_like(ids)
    for r, (b, j) in enumerate(pairs):
        cont = items[b].continuations[j]
        ids[r, : len(cont)] = torch.tensor(cont, device=device)
        cont_mask[r, : len(cont)] = 1
    rows = torch.tensor([b for b, _ in pairs], device=device)
    cache.batch_select_indices(rows)
    full_mask = torch.cat([mask[rows], cont_mask[:, :-1]], dim=1)
    steps = torch.arange(1, longest, device=device)
    hidden = model.base_model(
        inputs_embeds=embed_tokens(model, ids[:, :-1]),
        attention_mask=full_mask,
        position_ids=last[rows][:, None] + steps,
        past_key_values=cache,
        use_cache=True,
    ).last_hidden_state  # (R, longest-1, H)
    gold = ids[:, 1:]
    keep = cont_mask[:, 1:].bool()
    logp = torch.zeros(gold.shape, dtype=torch.float32, device=device)
    logp[keep] = token_logprobs(model, hidden[keep], gold[keep])
    return {pair: logp[r, : int(keep[r].sum())].tolist() for r, pair in enumerate(pairs)}


def continuation_ids(tokenizer, source: str, choice: str, delimiter: str) -> list[int]:
    """A choice's tokens as they follow ``source`` (as ``loss.continuation_rows`` has them)."""
    sep = "" if not source or source[-1].isspace() else delimiter
    return tokenizer(sep + choice, add_special_tokens=False)["input_ids"]


def loss_scoring(row: Row) -> Scoring:
    """A labelled row as an input and one continuation (from its first label on) whose
    labelled tokens count: its loss from the same pass as the choices."""
    k = next(i for i, lab in enumerate(row.labels) if lab != IGNORE_INDEX)
    at = row.prompt_at or 0
    head = row.input_ids[:at] if at else None
    return Scoring(
        head,
        row.input_ids[at:k],
        [row.input_ids[k:]],
        [[lab != IGNORE_INDEX for lab in row.labels[k:]]],
    )


def classify(
    model: nn.Module,
    tokenizer,
    prompt: SoftPrompt | None,
    sources: list[str],
    choices: list[str],
    *,
    delimiter: str = " ",
    length_norm: bool = False,
    batch_size: int = 8,
    max_tokens: int = 1024,
    contexts: list | None = None,
    extra: list[Scoring | None] | None = None,
) -> tuple[list[str], list[list[float]]]:
    """Predicted choice per source, and each choice's score (summed log-likelihood, or the
    mean per token with ``length_norm``), in one pass per input (``score_after``).
    ``contexts``: the sources tokenized already, as (head, ids) with the prompt after the
    head (``generation.encode_example``). ``extra[i]``, when given, is scored in the same
    pass if it has source i's input (e.g. ``loss_scoring`` of its labelled row); its
    (log-probability, tokens) replaces ``extra[i]`` in the list.

    A model whose body and head or cache cannot be used apart (``loss.support``; e.g. a
    wrapped LoRA model) is scored by ``classify_per_choice``, and ``extra`` is left as is."""
    if not support(model).shared_prefix:
        return classify_per_choice(model, tokenizer, prompt, sources, choices,
                                   delimiter=delimiter, length_norm=length_norm,
                                   batch_size=batch_size, max_tokens=max_tokens,
                                   contexts=contexts)  # fmt: skip
    items = []
    for i, source in enumerate(sources):
        conts = [continuation_ids(tokenizer, source, c, delimiter) for c in choices]
        if contexts is None:
            head, ids = None, tokenizer(source, add_special_tokens=True)["input_ids"]
        else:
            head, ids = contexts[i]
        room = max(max_tokens - max(map(len, conts)) - len(head or []), 1)
        if len(ids) > room:  # cut the start, never the head (as continuation_rows does)
            keep_bos = int(head is None and bool(ids) and ids[0] == tokenizer.bos_token_id)
            ids = ids[:keep_bos] + ids[len(ids) - room + keep_bos :]
        item = Scoring(head, ids, conts)
        more = extra[i] if extra else None
        if more is not None and (more.head or None, more.ids) == (head or None, ids):
            item.counted = [[True] * len(c) for c in conts] + more.counted
            item.continuations = conts + more.continuations
            extra[i] = None
        items.append(item)
    results = score_after(model, prompt, items, batch_size)
    scores = []
    for i, res in enumerate(results):
        scores.append([lp / max(n, 1) if length_norm else lp for lp, n in res[: len(choices)]])
        if extra and len(res) > len(choices):
            extra[i] = res[len(choices)]
    preds = [choices[max(range(len(choices)), key=row.__getitem__)] for row in scores]
    return preds, scores


def classify_per_choice(
    model: nn.Module,
    tokenizer,
    prompt: SoftPrompt | None,
    sources: list[str],
    choices: list[str],
    *,
    delimiter: str = " ",
    length_norm: bool = False,
    batch_size: int = 8,
    max_tokens: int = 1024,
    contexts: list | None = None,
) -> tuple[list[str], list[list[float]]]:
    """``classify`` the way lm-evaluation-harness does it: the whole sequence (prompt, input
    and choice) once per choice. The reference for tests and benchmarks/bench_eval.py."""
    scores = [[0.0] * len(choices) for _ in sources]
    for c, choice in enumerate(choices):
        rows = continuation_rows(tokenizer, sources, choice, delimiter, max_tokens, contexts)
        for i, (logp, n) in enumerate(
            row_logprobs(model, prompt, rows, batch_size, tokenizer.pad_token_id)
        ):
            scores[i][c] = logp / max(n, 1) if length_norm else logp
    preds = [choices[max(range(len(choices)), key=row.__getitem__)] for row in scores]
    return preds, scores


def classification_metrics(gold: list[str], pred: list[str], labels: list[str]) -> dict:
    """Accuracy, macro-F1 and the confusion matrix (rows: gold, columns: predicted)."""
    return {
        "accuracy": metrics.accuracy(gold, pred),
        "macro_f1": metrics.macro_f1(gold, pred, labels),
        "confusion": {"labels": labels, "matrix": metrics.confusion_matrix(gold, pred, labels)},
    }


def generation_metrics(preds: list[str], refs: list[str]) -> dict:
    """Exact match (0-1) and chrF (0-100) of the first line of each output; when every
    reference is a JSON object, also the share of answers that are JSON objects with the
    same keys (format validity)."""
    answers = [metrics.first_line(p) for p in preds]
    out = {"exact_match": metrics.exact_match(answers, refs), "chrf": metrics.chrf(answers, refs)}
    if metrics.all_json_objects(refs):
        out["json_valid"] = metrics.json_valid(answers, refs)
    return out


def timed(fn, *args, **kwargs) -> tuple[object, float]:
    """``fn(*args, **kwargs)`` and the seconds it took."""
    start = time.perf_counter()
    result = fn(*args, **kwargs)
    return result, time.perf_counter() - start
