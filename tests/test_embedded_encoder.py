"""Slow: prompt + head on the bundled encoder (all-MiniLM-L6-v2) and the shipped
sentiment data (3 epochs, under two minutes): training lowers the validation loss, eval
reports the classification numbers, and PEFT loads the folder with identical logits on the
real model."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from softprompt.artifacts import load_prompt
from softprompt.commands.eval import run_eval
from softprompt.config import DataConfig, EvalConfig, ModelConfig, PromptConfig, TrainConfig
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
        prompt=PromptConfig(num_virtual_tokens=20, init="vocab"),
        output=str(tmp_path / "run"),
        epochs=10,  # the README's MiniLM recipe: 3 epochs left the loss at ln 2 (issue 28)
        batch_size=16,
        lr=0.1,
    )
    result = train(cfg, progress=False)
    assert result.summary["best_val_loss"] < result.summary["initial_val_loss"]

    ev = EvalConfig(
        data=DataConfig(data=str(DATA / "test.jsonl"), input_field="review", target_field="label"),
        prompt=str(result.output),
        limit=40,
    )
    m = run_eval(ev)["metrics"]
    assert m["confusion"]["labels"] == LABELS and sum(map(sum, m["confusion"]["matrix"])) == 40
    assert 0 <= m["macro_f1"] <= 1 and 0 <= m["accuracy"] <= 1

    from peft import PeftModel

    loaded = load_model(model="embedded-encoder", labels=LABELS)
    prompt, _ = load_prompt(result.output, loaded.model)
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
