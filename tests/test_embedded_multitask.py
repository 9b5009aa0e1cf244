"""Slow: multi-task training on the embedded Gemma 3 270M; each prompt does its own task."""

from __future__ import annotations

import json

import pytest

from softprompt.config import DataConfig, PromptConfig, TrainConfig
from softprompt.data import Example
from softprompt.loading import load_model
from softprompt.rows import tokenize
from softprompt.scoring import classify, evaluate_loss
from softprompt.training import train

pytestmark = pytest.mark.slow
DATA = "examples/multitask"


def _read(path: str) -> list[dict]:
    with open(path, encoding="utf-8") as fh:
        return [json.loads(line) for line in fh]


def test_two_tasks_one_run_each_prompt_does_its_task(tmp_path):
    """One run trains a sentiment prompt and an antonyms prompt, mixed in batches: each
    prompt is better at its own task than the other task's prompt, and the sentiment one
    classifies held-out reviews."""
    loaded = load_model()
    cfg = TrainConfig(
        data=DataConfig(data=f"{DATA}/train.jsonl", validation=f"{DATA}/validation.jsonl"),
        prompt=PromptConfig(num_virtual_tokens=8),
        output=str(tmp_path / "run"),
        batch_size=8,
        max_steps=32,
        lr=0.3,
        task_field="task",
    )
    result = train(cfg, loaded=loaded, progress=False)
    assert sorted(result.prompts) == ["antonyms", "sentiment"]
    val = _read(f"{DATA}/validation.jsonl")
    tok = loaded.tokenizer

    def loss(prompt_task: str, data_task: str) -> float:
        exs = [Example(r["input"], r["target"], "v") for r in val if r["task"] == data_task]
        rows = tokenize(exs, tok, 128)
        prompt = result.prompts[prompt_task]
        return evaluate_loss(loaded.model, prompt, rows, 8, tok.pad_token_id)["loss"]

    assert loss("sentiment", "sentiment") < loss("antonyms", "sentiment")
    assert loss("antonyms", "antonyms") < loss("sentiment", "antonyms")
    test = [r for r in _read(f"{DATA}/test.jsonl") if r["task"] == "sentiment"][:40]

    def accuracy(task: str) -> float:
        sources, labels = [r["input"] for r in test], ["positive", "negative"]
        pred, _ = classify(loaded.model, tok, result.prompts[task], sources, labels)
        return sum(p == r["target"] for p, r in zip(pred, test)) / len(test)

    # 32 steps of the full-vocabulary loss: well above chance, and above the other prompt
    assert accuracy("sentiment") >= 0.7
    assert accuracy("sentiment") > accuracy("antonyms")
