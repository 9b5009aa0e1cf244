"""Measure a model, with or without a soft prompt: choice accuracy and generations.

Following lm-evaluation-harness, a model needs three things here: the loss of target
tokens and the log-likelihood of a continuation (both in ``softprompt.loss``; multiple
choice is the argmax over the choices' log-likelihoods), and generation. Every function
takes the model and tokenizer rather than a run folder, so `compare` can measure LoRA and
fine-tuned models the same way.
"""

from __future__ import annotations

import time

from torch import nn

from softprompt.loss import continuation_rows, row_logprobs
from softprompt.measure import metrics
from softprompt.prompt import SoftPrompt


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
) -> tuple[list[str], list[list[float]]]:
    """Predicted choice per source, and each choice's score (summed log-likelihood, or the
    mean per token with ``length_norm``). ``contexts``: the sources tokenized already, as
    (head, ids) with the prompt after the head (``generation.encode_example``)."""
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
