"""Slow: evaluation on the embedded Gemma 3 270M (a few reviews, seconds)."""

from __future__ import annotations

import json

import pytest

from softprompt.commands.eval import run_eval
from softprompt.config import DataConfig, EvalConfig
from softprompt.scoring import choice_first_ids

pytestmark = pytest.mark.slow


def test_sentiment_labels_start_with_different_tokens(gemma):
    """The restricted classification loss needs distinct first tokens; Gemma gives them."""
    ids = choice_first_ids(gemma.tokenizer, ["negative", "positive"])
    assert len(set(ids)) == 2


def test_zero_shot_eval_on_embedded(gemma, tmp_path):
    cfg = EvalConfig(
        data=DataConfig(
            data="examples/sentiment/test.jsonl",
            input_field="review",
            target_field="label",
            template="Review: {input}\nSentiment:",
        ),
        choices="negative,positive",
        limit=8,
        output=str(tmp_path / "ev"),
    )
    results = run_eval(cfg, loaded=gemma)
    m = results["metrics"]
    assert m["examples"] == 8 and 0 <= m["accuracy"] <= 1 and 0 < m["loss"] < 20
    saved = json.loads((tmp_path / "ev" / "results.json").read_text())
    assert saved["model"] == "embedded" and saved["versions"]["torch"]
