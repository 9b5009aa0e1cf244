"""Prompt ensembles (Lester et al. 2021, section 7): K prompts on one frozen model, one vote.

``train --ensemble K`` saves ``OUTPUT/member-I/`` prompt folders and ``ensemble.json``;
``eval`` reads such a folder (or several prompt folders) as one model: classification is
the majority vote of the members' predictions (a tie goes to the tied label with the
highest mean log-likelihood), a loss is the members' mean.
"""

from __future__ import annotations

from torch import nn

from softprompt.prompt import SoftPrompt
from softprompt.scoring import classify


def vote(member_scores: list[list[list[float]]], choices: list[str]) -> list[str]:
    """Majority vote per example over the members' choice scores (members x examples x
    choices); a tie goes to the tied choice with the highest mean score."""
    out = []
    for i in range(len(member_scores[0])):
        counts = [0] * len(choices)
        means = [0.0] * len(choices)
        for scores in member_scores:
            row = scores[i]
            counts[max(range(len(choices)), key=row.__getitem__)] += 1
            for c, s in enumerate(row):
                means[c] += s / len(member_scores)
        out.append(choices[max(range(len(choices)), key=lambda c: (counts[c], means[c]))])
    return out


def ensemble_classify(
    model: nn.Module,
    tokenizer,
    prompts: list[SoftPrompt],
    sources: list[str],
    choices: list[str],
    **kwargs,
) -> tuple[list[str], list[list[float]], list[list[str]]]:
    """The ensemble's prediction per source, the members' mean scores, and each member's
    own predictions (members x sources). ``kwargs`` go to ``classify``."""
    member_preds, member_scores = [], []
    for prompt in prompts:
        preds, scores = classify(model, tokenizer, prompt, sources, choices, **kwargs)
        member_preds.append(preds)
        member_scores.append(scores)
    mean = [
        [sum(s[i][c] for s in member_scores) / len(prompts) for c in range(len(choices))]
        for i in range(len(sources))
    ]
    return vote(member_scores, choices), mean, member_preds
