"""Scores from predictions: pure functions of lists, so tests can check them by hand.

Classification: accuracy, macro-F1 and the confusion matrix over a fixed label list.
Generation: exact match after whitespace normalisation, and chrF (character n-gram F-score,
Popovic 2015) from sacrebleu, the reference implementation used by WMT.
"""

from __future__ import annotations

import time


def accuracy(gold: list[str], pred: list[str]) -> float:
    """Fraction of positions where the prediction equals the gold label."""
    if not gold:
        return 0.0
    return sum(g == p for g, p in zip(gold, pred)) / len(gold)


def confusion_matrix(gold: list[str], pred: list[str], labels: list[str]) -> list[list[int]]:
    """``matrix[i][j]``: how many examples of gold ``labels[i]`` were predicted ``labels[j]``.

    Gold labels outside ``labels`` are not counted (they cannot be predicted anyway).
    """
    index = {label: i for i, label in enumerate(labels)}
    matrix = [[0] * len(labels) for _ in labels]
    for g, p in zip(gold, pred):
        if g in index and p in index:
            matrix[index[g]][index[p]] += 1
    return matrix


def per_label_f1(gold: list[str], pred: list[str], labels: list[str]) -> dict[str, float]:
    """F1 = 2TP / (2TP + FP + FN) per label; 0 where the label is neither gold nor predicted."""
    out = {}
    for label in labels:
        tp = sum(g == label and p == label for g, p in zip(gold, pred))
        fp = sum(g != label and p == label for g, p in zip(gold, pred))
        fn = sum(g == label and p != label for g, p in zip(gold, pred))
        out[label] = 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 0.0
    return out


def macro_f1(gold: list[str], pred: list[str], labels: list[str]) -> float:
    """Unweighted mean of the per-label F1 scores: every class counts the same."""
    scores = per_label_f1(gold, pred, labels)
    return sum(scores.values()) / len(scores) if scores else 0.0


def normalise(text: str) -> str:
    """Whitespace collapsed and trimmed; case is kept (an answer's case can matter)."""
    return " ".join(text.split())


def exact_match(preds: list[str], refs: list[str]) -> float:
    """Fraction of predictions equal to their reference after ``normalise``."""
    if not refs:
        return 0.0
    return sum(normalise(p) == normalise(r) for p, r in zip(preds, refs)) / len(refs)


def chrf(preds: list[str], refs: list[str]) -> float:
    """Corpus-level chrF (0-100) with sacrebleu's defaults (character 6-grams, beta 2)."""
    from sacrebleu.metrics import CHRF

    if not refs:
        return 0.0
    return float(CHRF().corpus_score(preds, [refs]).score)


def first_line(text: str) -> str:
    """A generated answer up to its first newline: base models keep writing after it."""
    stripped = text.strip()
    return stripped.splitlines()[0].strip() if stripped else ""


def _json_object(text: str) -> dict | None:
    import json

    try:
        value = json.loads(text)
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


def all_json_objects(refs: list[str]) -> bool:
    """Whether every reference is a JSON object (the task asks for a JSON answer)."""
    return bool(refs) and all(_json_object(r) is not None for r in refs)


def json_valid(preds: list[str], refs: list[str]) -> float:
    """Share of predictions that are JSON objects with exactly the reference's keys."""
    ok = 0
    for p, r in zip(preds, refs):
        value = _json_object(p)
        ok += value is not None and set(value) == set(_json_object(r))
    return ok / len(refs) if refs else 0.0


def classification_metrics(gold: list[str], pred: list[str], labels: list[str]) -> dict:
    """Accuracy, macro-F1 and the confusion matrix (rows: gold, columns: predicted)."""
    return {
        "accuracy": accuracy(gold, pred),
        "macro_f1": macro_f1(gold, pred, labels),
        "confusion": {"labels": labels, "matrix": confusion_matrix(gold, pred, labels)},
    }


def generation_metrics(preds: list[str], refs: list[str]) -> dict:
    """Exact match (0-1) and chrF (0-100) of the first line of each output; when every
    reference is a JSON object, also the share of answers that are JSON objects with the
    same keys (format validity)."""
    answers = [first_line(p) for p in preds]
    out = {"exact_match": exact_match(answers, refs), "chrf": chrf(answers, refs)}
    if all_json_objects(refs):
        out["json_valid"] = json_valid(answers, refs)
    return out


def timed(fn, *args, **kwargs) -> tuple[object, float]:
    """``fn(*args, **kwargs)`` and the seconds it took."""
    start = time.perf_counter()
    result = fn(*args, **kwargs)
    return result, time.perf_counter() - start
