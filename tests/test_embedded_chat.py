"""Slow: the bundled instruct model (SmolLM2-135M-Instruct) on the shipped support task. Its
system prompt alone does not make it answer in the required JSON; a tuned soft prompt does."""

from __future__ import annotations

from pathlib import Path

import pytest

from softprompt.commands.eval import run_eval
from softprompt.config import DataConfig, EvalConfig, ModelConfig, PromptConfig, TrainConfig
from softprompt.loading import load_model
from softprompt.training import train

pytestmark = pytest.mark.slow
DATA = Path(__file__).resolve().parents[1] / "examples" / "support"
SYSTEM = (
    'Reply with one line of JSON and nothing else: {"topic": T, "sentiment": S} where T is one '
    "of battery, screen, delivery, price, support and S is positive or negative."
)


@pytest.fixture(scope="module")
def smol():
    return load_model(model="embedded-chat")


def test_tuned_prompt_beats_the_system_prompt(smol, tmp_path):
    data = DataConfig(
        data=str(DATA / "train.jsonl"),
        validation=str(DATA / "validation.jsonl"),
        system=SYSTEM,
        prompt_position="before-user",
    )
    cfg = TrainConfig(model=ModelConfig(model="embedded-chat"), data=data,
                      prompt=PromptConfig(num_virtual_tokens=20), epochs=2,
                      output=str(tmp_path / "run"))  # fmt: skip
    train(cfg, loaded=smol, progress=False)
    test = DataConfig(data=str(DATA / "test.jsonl"), system=SYSTEM)
    common = dict(model=ModelConfig(model="embedded-chat"), generate=True, max_new_tokens=20,
                  limit=30)  # fmt: skip
    system = run_eval(EvalConfig(data=test, **common), loaded=smol)["metrics"]
    tuned = run_eval(EvalConfig(data=test, prompt=str(tmp_path / "run"), **common), loaded=smol)
    tuned = tuned["metrics"]
    assert system["json_valid"] < 0.5 and tuned["json_valid"] > 0.9
    assert tuned["exact_match"] > system["exact_match"] + 0.3
    assert tuned["loss"] < system["loss"] / 3
