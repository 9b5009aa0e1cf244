"""Measure a model, with or without a soft prompt: loss, choice accuracy, generations.

Following lm-evaluation-harness, a model needs three things here: the loss of target
tokens, the log-likelihood of a continuation (multiple choice is the argmax over the
choices' log-likelihoods) and generation. Every function takes the model and tokenizer
rather than a run folder, so `compare` can measure LoRA and fine-tuned models the same way.
"""

from __future__ import annotations

import math
import time

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from softprompt.data import Example, Row, collate
from softprompt.errors import ConfigError
from softprompt.measure import metrics
from softprompt.prompt import (
    IGNORE_INDEX,
    SoftPrompt,
    embed_tokens,
    head_logits,
    lm_loss,
    uses_fast_head,
)


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

    With ``choice_ids`` the loss is the classification-mode one (see ``lm_loss``).
    """
    device = model.get_input_embeddings().weight.device
    order = sorted(range(len(rows)), key=lambda i: len(rows[i].input_ids))  # little padding
    total, count = 0.0, 0
    for start in range(0, len(order), batch_size):
        batch = collate([rows[i] for i in order[start : start + batch_size]], pad_id)
        batch = {k: v.to(device) for k, v in batch.items()}
        if choice_ids is None:
            loss, n = lm_loss(model, prompt, batch)
        else:
            loss, n = lm_loss(model, prompt, batch, choice_ids=choice_ids.to(device))
        total += float(loss)
        count += n
    mean = total / max(count, 1)
    return {"loss": mean, "ppl": math.exp(min(mean, 50.0)), "tokens": count}


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


# --- log-likelihood of continuations -----------------------------------------------------


def _logits_at(model: nn.Module, embeds: Tensor, mask: Tensor, keep: Tensor) -> Tensor:
    """(K, V) logits at the K positions where ``keep`` (B, T-1) is set."""
    if uses_fast_head(model):  # the head only where needed, as in lm_loss
        hidden = model.base_model(inputs_embeds=embeds, attention_mask=mask).last_hidden_state
        return head_logits(model, hidden[:, :-1][keep])
    return model(inputs_embeds=embeds, attention_mask=mask).logits[:, :-1][keep]


@torch.no_grad()
def row_logprobs(
    model: nn.Module, prompt: SoftPrompt | None, rows: list[Row], batch_size: int, pad_id: int
) -> list[tuple[float, int]]:
    """(summed log-probability, token count) of each row's labelled tokens, in row order."""
    device = model.get_input_embeddings().weight.device
    out: list[tuple[float, int]] = [(0.0, 0)] * len(rows)
    order = sorted(range(len(rows)), key=lambda i: len(rows[i].input_ids))
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        batch = {k: v.to(device) for k, v in collate([rows[i] for i in idx], pad_id).items()}
        embeds, mask, labels = (
            embed_tokens(model, batch["input_ids"]),
            batch["attention_mask"],
            batch["labels"],
        )
        if prompt is not None:
            embeds, mask, labels = prompt.prepend(embeds, mask, labels)
        targets = labels[:, 1:]
        keep = targets != IGNORE_INDEX  # (B, T-1)
        logp = F.log_softmax(_logits_at(model, embeds, mask, keep).float(), dim=-1)
        picked = logp.gather(1, targets[keep].unsqueeze(1)).squeeze(1)  # (K,)
        owner = keep.nonzero()[:, 0]  # which row each labelled position belongs to
        sums = torch.zeros(len(idx), device=device).index_add_(0, owner, picked)
        for j, i in enumerate(idx):
            out[i] = (float(sums[j]), int(keep[j].sum()))
    return out


def continuation_rows(
    tokenizer, sources: list[str], continuation: str, delimiter: str, max_tokens: int
) -> list[Row]:
    """Rows of ``source + delimiter + continuation`` labelled on the continuation (no EOS).

    Sources too long for ``max_tokens`` lose their start, as in training.
    """
    rows = []
    for source in sources:
        src = tokenizer(source, add_special_tokens=True)["input_ids"]
        sep = "" if not source or source[-1].isspace() else delimiter
        tgt = tokenizer(sep + continuation, add_special_tokens=False)["input_ids"]
        room = max(max_tokens - len(tgt), 1)
        if len(src) > room:
            keep_bos = int(bool(src) and src[0] == tokenizer.bos_token_id)
            src = src[:keep_bos] + src[len(src) - room + keep_bos :]
        rows.append(Row(src + tgt, [IGNORE_INDEX] * len(src) + tgt))
    return rows


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
) -> tuple[list[str], list[list[float]]]:
    """Predicted choice per source, and each choice's score (summed log-likelihood, or the
    mean per token with ``length_norm``)."""
    scores = [[0.0] * len(choices) for _ in sources]
    for c, choice in enumerate(choices):
        rows = continuation_rows(tokenizer, sources, choice, delimiter, max_tokens)
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
    """Exact match (0-1) and chrF (0-100) of the first line of each output."""
    answers = [metrics.first_line(p) for p in preds]
    return {"exact_match": metrics.exact_match(answers, refs), "chrf": metrics.chrf(answers, refs)}


def timed(fn, *args, **kwargs) -> tuple[object, float]:
    """``fn(*args, **kwargs)`` and the seconds it took."""
    start = time.perf_counter()
    result = fn(*args, **kwargs)
    return result, time.perf_counter() - start
