"""Scoring for evaluation: the loss over many rows, and the log-likelihood of continuations.

Following lm-evaluation-harness, a model needs three things: the loss of target tokens, the
log-likelihood of a continuation (multiple choice is the argmax over the choices'
log-likelihoods), and generation (``generation.py``). Unlike the harness, which runs the
whole sequence once per choice, ``score_after`` runs each input once (behind the compiled
prompt prefix) and scores every continuation from its cache: a single-token choice reads the
one distribution at the input's end, longer ones run only their own tokens. Functions take
the model and tokenizer, so `compare` measures LoRA and fine-tuned models the same way.

These are the causal LM's scores; the other kinds score in ``kinds/``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import DynamicCache

from softprompt.console import batch_starts
from softprompt.data import Example
from softprompt.errors import ConfigError
from softprompt.generation import GenerationRow, pack_rows
from softprompt.loss import head_logits, lm_loss, support, token_logprobs, token_scores
from softprompt.prefix import compile_all
from softprompt.prompt import SoftPrompt, embed_tokens
from softprompt.rows import IGNORE_INDEX, Row, collate


@torch.no_grad()
def evaluate_loss(
    model: nn.Module,
    prompt: SoftPrompt | None,
    rows: list[Row],
    batch_size: int,
    pad_id: int,
    choice_ids: Tensor | None = None,
) -> dict[str, float]:
    """Mean next-token loss over labelled tokens (targets only for pairs) and perplexity.

    With ``choice_ids`` the loss is the classification-mode one (see ``lm_loss``), and
    ``accuracy`` is the share of rows whose label scores highest among the choices.
    """
    device = model.get_input_embeddings().weight.device
    order = sorted(range(len(rows)), key=lambda i: len(rows[i].input_ids))  # little padding
    if choice_ids is not None:
        choice_ids = choice_ids.to(device)
    total, count, hits = 0.0, 0, []
    for start in batch_starts(range(0, len(order), batch_size)):
        batch = collate([rows[i] for i in order[start : start + batch_size]], pad_id)
        batch = {k: v.to(device) for k, v in batch.items()}
        loss, n = lm_loss(model, prompt, batch, choice_ids=choice_ids, hits=hits)
        total += float(loss)
        count += n
    mean = total / max(count, 1)
    result = {"loss": mean, "ppl": perplexity(mean), "tokens": count}
    if choice_ids is not None:  # one position per row: count is the number of rows scored
        result["accuracy"] = sum(hits) / max(count, 1)
    return result


def perplexity(loss: float) -> float:
    """exp(loss), kept finite for hopeless losses."""
    return math.exp(min(loss, 50.0))


def _gold_scores(
    model: nn.Module, embeds: Tensor, mask: Tensor, keep: Tensor, gold: Tensor
) -> tuple[Tensor, Tensor]:
    """log p(gold) (K,) at the K positions where ``keep`` (B, T-1) is set, and whether gold
    is the argmax there."""
    if support(model).fast_head:  # the head only where needed, in chunks, as in lm_loss
        hidden = model.base_model(inputs_embeds=embeds, attention_mask=mask).last_hidden_state
        return token_scores(model, hidden[:, :-1][keep], gold)
    logits = model(inputs_embeds=embeds, attention_mask=mask).logits[:, :-1][keep].float()
    logp = F.log_softmax(logits, dim=-1).gather(1, gold.unsqueeze(1)).squeeze(1)
    return logp, logits.argmax(dim=-1) == gold


def row_logprobs(
    model: nn.Module, prompt: SoftPrompt | None, rows: list[Row], batch_size: int, pad_id: int
) -> list[tuple[float, int]]:
    """(summed log-probability, token count) of each row's labelled tokens, in row order."""
    return [(logp, n) for logp, n, _ in row_scores(model, prompt, rows, batch_size, pad_id)]


@torch.no_grad()
def row_scores(
    model: nn.Module, prompt: SoftPrompt | None, rows: list[Row], batch_size: int, pad_id: int
) -> list[tuple[float, int, bool]]:
    """(summed log-probability, token count, greedy?) of each row's labelled tokens, in row
    order; greedy: every labelled token is the argmax of its distribution (the harness's
    ``is_greedy``)."""
    device = model.get_input_embeddings().weight.device
    out: list[tuple[float, int, bool]] = [(0.0, 0, True)] * len(rows)
    order = sorted(range(len(rows)), key=lambda i: len(rows[i].input_ids))
    for start in batch_starts(range(0, len(order), batch_size)):
        idx = order[start : start + batch_size]
        batch = {k: v.to(device) for k, v in collate([rows[i] for i in idx], pad_id).items()}
        embeds, mask, labels = (
            embed_tokens(model, batch["input_ids"]),
            batch["attention_mask"],
            batch["labels"],
        )
        if prompt is not None:
            embeds, mask, labels = prompt.prepend(embeds, mask, labels, batch.get("prompt_at"))
        targets = labels[:, 1:]
        keep = targets != IGNORE_INDEX  # (B, T-1)
        picked, top = _gold_scores(model, embeds, mask, keep, targets[keep])  # (K,)
        owner = keep.nonzero()[:, 0]  # which row each labelled position belongs to
        sums = torch.zeros(len(idx), device=device).index_add_(0, owner, picked)
        missed = (~top).float()  # (K,)
        misses = torch.zeros(len(idx), device=device).index_add_(0, owner, missed)
        for j, i in enumerate(idx):
            out[i] = (float(sums[j]), int(keep[j].sum()), not bool(misses[j]))
    return out


def continuation_rows(
    tokenizer,
    sources: list[str],
    continuation: str | list[str],
    delimiter: str,
    max_tokens: int,
    contexts: list[tuple[list[int] | None, list[int]]] | None = None,
) -> list[Row]:
    """Rows of ``source + delimiter + continuation`` labelled on the continuation (no EOS);
    ``continuation`` is one for every source or one per source. ``contexts`` gives the sources
    already tokenized as (head, ids), the prompt going after the head (see
    ``generation.encode_raw``); else they are tokenized here, the prompt first.

    Sources too long for ``max_tokens`` lose their start (never their head), as in training.
    """
    conts = [continuation] * len(sources) if isinstance(continuation, str) else continuation
    rows = []
    for i, (source, cont) in enumerate(zip(sources, conts)):
        if contexts is None:
            head, src = None, tokenizer(source, add_special_tokens=True)["input_ids"]
        else:
            head, src = contexts[i]
        sep = "" if not source or source[-1].isspace() else delimiter
        tgt = tokenizer(sep + cont, add_special_tokens=False)["input_ids"]
        room = max(max_tokens - len(tgt) - len(head or []), 1)
        if len(src) > room:
            keep_bos = int(head is None and bool(src) and src[0] == tokenizer.bos_token_id)
            src = src[:keep_bos] + src[len(src) - room + keep_bos :]
        head = head or []
        labels = [IGNORE_INDEX] * (len(head) + len(src)) + tgt
        rows.append(Row(head + src + tgt, labels, prompt_at=len(head)))
    return rows


def score_continuations(
    loaded,
    contexts: Sequence[str],
    continuations: Sequence[str],
    prompts: Sequence[SoftPrompt | None],
    batch_size: int = 8,
    max_tokens: int = 1 << 30,
) -> list[tuple[float, int]]:
    """Log-likelihood of each continuation right after its context (nothing put between),
    each row with its own prompt (or None): (summed log-probability, token count) per row."""
    model, tok = loaded.model, loaded.tokenizer
    rows = continuation_rows(tok, list(contexts), list(continuations), "", max_tokens)
    out: list[tuple[float, int]] = [(0.0, 0)] * len(rows)
    groups: dict[int, list[int]] = {}
    for i, prompt in enumerate(prompts):  # rows with the same prompt are scored together
        groups.setdefault(id(prompt), []).append(i)
    for idx in groups.values():
        scores = row_logprobs(
            model, prompts[idx[0]], [rows[i] for i in idx], batch_size, tok.pad_token_id
        )
        for i, score in zip(idx, scores):
            out[i] = score
    return out


def choice_first_ids(tokenizer, choices: list[str], delimiter: str = " ") -> list[int]:
    """The first token of each choice as it follows the input (after ``delimiter``).

    Classification-mode training needs these to differ: the restricted softmax at the
    answer position sees only first tokens.
    """
    ids = []
    for choice in choices:
        tokens = tokenizer(delimiter + choice, add_special_tokens=False)["input_ids"]
        if not tokens:
            raise ConfigError(f"--choices: {choice!r} gives no tokens")
        ids.append(tokens[0])
    if len(set(ids)) < len(ids):
        raise ConfigError(
            f"--choices {', '.join(choices)} start with the same token; the restricted loss "
            "needs different first tokens: reword the labels or use --choice-loss full"
        )
    return ids


def check_choice_targets(rows: list[Row], examples: list[Example], ids: list[int]) -> None:
    """Every target must begin with one of the choices' first tokens."""
    for row, ex in zip(rows, examples):
        first = next((t for t in row.labels if t != IGNORE_INDEX), None)
        if first not in ids:
            raise ConfigError(
                f"{ex.where}: target {ex.target!r} does not start like any of --choices; "
                "give the label words the data uses"
            )


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
    for start in batch_starts(range(0, len(order), batch_size)):
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


@torch.no_grad()
def mean_row_loss(rows_loss, model: nn.Module, prompt, rows: list[Row], batch_size: int,
                  pad_id: int, hits: list[int] | None = None) -> dict:  # fmt: skip
    """Mean loss per label of ``rows`` under a kind's ``rows_loss(model, prompt, rows, pad_id,
    device)`` (seq2seq: per target token; classify: per example), with perplexity. With
    ``hits``, a list that ``rows_loss`` appends each batch's correct predictions to (a
    classifier's), also their ``accuracy`` per row."""
    device = model.get_input_embeddings().weight.device
    order = sorted(range(len(rows)), key=lambda i: len(rows[i].input_ids))
    total, count = 0.0, 0
    for start in batch_starts(range(0, len(order), batch_size)):
        batch_rows = [rows[i] for i in order[start : start + batch_size]]
        loss, n, _ = rows_loss(model, prompt, batch_rows, pad_id, device)
        total, count = total + float(loss), count + n
    mean = total / max(count, 1)
    result = {"loss": mean, "ppl": perplexity(mean), "tokens": count}
    if hits is not None:
        result["accuracy"] = sum(hits) / max(len(rows), 1)
    return result


def pooled_loss(model, prompt, rows, scored, batch_size: int, tok) -> dict:
    """Mean loss over labelled tokens from the rows the choices' pass scored (their
    (log-probability, tokens)) and, for any whose input differed, a pass of their own."""
    apart = [r for r, s in zip(rows, scored) if not isinstance(s, tuple)]
    total = -sum(s[0] for s in scored if isinstance(s, tuple))
    count = sum(s[1] for s in scored if isinstance(s, tuple))
    if apart:
        more = evaluate_loss(model, prompt, apart, batch_size, tok.pad_token_id)
        total, count = total + more["loss"] * more["tokens"], count + more["tokens"]
    mean = total / max(count, 1)
    return {"loss": mean, "ppl": perplexity(mean), "tokens": count}
