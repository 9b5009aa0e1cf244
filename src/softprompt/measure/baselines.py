"""Prompt-engineering baselines: zero-shot (the template alone) and few-shot (k solved
examples from the training set written into the hard prompt before each input)."""

from __future__ import annotations

import random
from dataclasses import replace

from softprompt.data import Example
from softprompt.errors import ConfigError

DEMO_SEPARATOR = "\n\n"


def pick_demonstrations(examples: list[Example], k: int, seed: int = 0) -> list[Example]:
    """``k`` training examples chosen with ``seed``. When the targets look like labels (few
    distinct values) they are taken round-robin per label, so every label is shown."""
    pool = [ex for ex in examples if ex.target is not None]
    if not pool:
        raise ConfigError("few-shot needs input/target pairs in --shots-data")
    rng = random.Random(seed)
    rng.shuffle(pool)
    labels = sorted({ex.target for ex in pool})
    if len(labels) > max(2, len(pool) // 4):  # free-form targets: a plain random sample
        return pool[:k]
    by_label = {label: [ex for ex in pool if ex.target == label] for label in labels}
    picked: list[Example] = []
    while len(picked) < min(k, len(pool)):
        for label in labels:
            if by_label[label] and len(picked) < k:
                picked.append(by_label[label].pop())
    rng.shuffle(picked)  # no fixed label order for the model to copy
    return picked


def demonstration(ex: Example, delimiter: str) -> str:
    """One solved example, joined to the input as training joins input and target."""
    sep = "" if ex.source[-1:].isspace() else delimiter
    return f"{ex.source}{sep}{ex.target}{DEMO_SEPARATOR}"


def fit_prefix(
    demos: list[Example], tokenizer, delimiter: str, budget_tokens: int
) -> tuple[str, int]:
    """The longest run of ``demos`` whose text fits ``budget_tokens``; (prefix, k used)."""
    prefix, used = "", 0
    for ex in demos:
        candidate = prefix + demonstration(ex, delimiter)
        if len(tokenizer(candidate, add_special_tokens=False)["input_ids"]) > budget_tokens:
            break
        prefix, used = candidate, used + 1
    return prefix, used


def few_shot(
    queries: list[Example],
    train: list[Example],
    tokenizer,
    k: int,
    context: int,
    delimiter: str = " ",
    seed: int = 0,
) -> tuple[list[Example], int]:
    """``queries`` with up to ``k`` demonstrations before each; k shrinks until the longest
    query, its answer and the demonstrations fit ``context`` tokens. Returns (examples, k)."""
    if k == 0:
        return queries, 0
    if queries[0].messages is not None:
        return _few_shot_turns(queries, train, tokenizer, k, context, seed)

    def length(text: str) -> int:
        return len(tokenizer(text, add_special_tokens=True)["input_ids"])

    longest = max(length(q.source) + length(q.target or "") + 1 for q in queries)
    budget = context - longest
    prefix, used = fit_prefix(pick_demonstrations(train, k, seed), tokenizer, delimiter, budget)
    return [replace(q, source=prefix + q.source) for q in queries], used


def _few_shot_turns(
    queries: list[Example], train: list[Example], tokenizer, k: int, context: int, seed: int
) -> tuple[list[Example], int]:
    """Conversations: the demonstrations are earlier (user, assistant) turns, after the
    system message; k shrinks until the longest conversation fits ``context`` tokens (counted
    on the messages' text, without the template's markup)."""

    def length(messages: list[dict]) -> int:
        text = "\n".join(m["content"] for m in messages)
        return len(tokenizer(text, add_special_tokens=False)["input_ids"]) + 8 * len(messages)

    demos = pick_demonstrations(train, k, seed)
    turns: list[dict] = []
    for ex in demos:
        pair = [m for m in ex.messages if m["role"] != "system"][-2:]  # its last user + answer
        if max(length(turns + pair + q.messages) for q in queries) > context:
            break
        turns += pair
    out = []
    for q in queries:
        system = [m for m in q.messages if m["role"] == "system"]
        rest = [m for m in q.messages if m["role"] != "system"]
        out.append(replace(q, messages=system + turns + rest))
    return out, len(turns) // 2
