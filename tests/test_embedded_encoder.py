"""Slow: the bundled encoder (all-MiniLM-L6-v2) on the shipped sentiment data with bare
defaults (a deep prompt + head, lr 0.03, 10 epochs: the kind's defaults; about two minutes):
training learns the task with a margin (0.820 test accuracy at seed 0 on 2026-12-05 with the
head on the mean of the text's states, the checkpoint's declared pooling; the lowest
validation loss 0.45), eval reports the classification numbers, and PEFT loads the folder
with identical logits on the real model where the head reads [CLS], as PEFT's does."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from softprompt.artifacts import load_prompt
from softprompt.commands.eval import run_eval
from softprompt.config import DataConfig, EvalConfig, ModelConfig, TrainConfig
from softprompt.kinds.classify import collate, logits
from softprompt.loading import load_model
from softprompt.rows import Row
from softprompt.training import train

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "examples" / "sentiment"
LABELS = ["negative", "positive"]


def test_prompt_and_head_on_minilm(tmp_path):
    data = DataConfig(
        data=str(DATA / "train.jsonl"),
        validation=str(DATA / "validation.jsonl"),
        input_field="review",
        target_field="label",
    )
    cfg = TrainConfig(
        model=ModelConfig(model="embedded-encoder"),
        data=data,
        output=str(tmp_path / "run"),
    )
    result = train(cfg, progress=False)
    assert result.summary["steps"] == 320  # the kind's 10 epochs of 250 rows at batch 8
    assert result.prompt.layout == (6, 12, 32)  # a deep prompt: MiniLM's 6 layers
    # ln 2 = 0.693 is chance: a real drop, not noise (0.450 measured)
    assert result.summary["best_val_loss"] < 0.55

    ev = EvalConfig(
        data=DataConfig(data=str(DATA / "test.jsonl"), input_field="review", target_field="label"),
        prompt=str(result.output),
    )
    m = run_eval(ev)["metrics"]
    assert m["confusion"]["labels"] == LABELS and sum(map(sum, m["confusion"]["matrix"])) == 200
    assert m["accuracy"] >= 0.7 and m["macro_f1"] >= 0.7  # chance 0.5; 0.820 measured (step 192)

    from peft import PeftModel

    from softprompt.kinds.classify import POOLING, pooling

    loaded = load_model(model="embedded-encoder", labels=LABELS)
    assert pooling(loaded.model) == "mean"  # the checkpoint's declared pooling
    prompt, meta = load_prompt(result.output, loaded.model)
    assert meta["pooling"] == "mean"
    # PEFT's SEQ_CLS model reads [CLS]: the saved files load there with our [CLS] logits
    setattr(loaded.model.config, POOLING, "cls")
    texts = ["Broke on the first day.", "Lovely staff and a quiet room, would stay again."]
    rows = [Row(loaded.tokenizer(t)["input_ids"], [0]) for t in texts]
    batch = collate(rows, loaded.tokenizer.pad_token_id)
    with torch.no_grad():
        ours = logits(loaded.model, prompt, batch)
        base = load_model(model="embedded-encoder", labels=LABELS).model
        peft = PeftModel.from_pretrained(base, str(result.output)).eval()
        theirs = peft(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                      token_type_ids=torch.zeros_like(batch["input_ids"])).logits  # fmt: skip
    assert torch.allclose(ours, theirs, atol=1e-5)
