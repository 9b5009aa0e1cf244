"""`train --choices`: the classification-mode loss, and a short run validated at its end."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import train_config

from softprompt.artifacts import INITIAL, PROMPT_KEY, load_prompt
from softprompt.errors import ConfigError
from softprompt.training import train


def _records(out) -> list[dict]:
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]


def test_restricted_choice_loss_trains_on_one_position_per_row(tiny_dir, pairs_file, tmp_path):
    out = tmp_path / "cls"
    train(
        train_config(
            tiny_dir, pairs_file, out, epochs=2, choices="negative,positive",
            choice_loss="restricted",
        ),
        progress=False,
    )  # fmt: skip
    base = next(r for r in _records(out) if r["kind"] == "base")
    assert base["tokens"] == 3  # 3 validation rows: one answer position each
    assert base["loss"] < 2.0  # a two-way softmax, not the whole vocabulary
    meta = json.loads((out / "softprompt.json").read_text())
    assert meta["training"]["choices"] == "negative,positive"
    assert meta["training"]["choice_loss"] == "restricted"


def test_full_choice_loss_keeps_every_target_token(tiny_dir, pairs_file, tmp_path):
    out = tmp_path / "full"
    cfg = train_config(
        tiny_dir, pairs_file, out, epochs=1, choices="negative,positive", choice_loss="full"
    )
    train(cfg, progress=False)
    base = next(r for r in _records(out) if r["kind"] == "base")
    assert base["tokens"] == 6  # label word + end-of-sequence per row


def test_targets_that_are_not_choices_are_refused(tiny_dir, pairs_file, tmp_path):
    cfg = train_config(tiny_dir, pairs_file, tmp_path / "x", choices="good,bad")
    with pytest.raises(ConfigError, match="does not start like any of choices"):
        train(cfg, progress=False)


def test_max_steps_inside_the_first_epoch_still_validates(tiny_dir, pairs_file, tmp_path):
    """A run shorter than an epoch is validated at its last step; the saved prompt is the
    trained one, not the initial value."""
    out = tmp_path / "short"
    train(train_config(tiny_dir, pairs_file, out, max_steps=2), progress=False)
    vals = [r["step"] for r in _records(out) if r["kind"] == "val"]
    assert vals == [0, 2]
    from safetensors.torch import load_file

    saved, _ = load_prompt(out)
    initial = load_file(str(out / INITIAL))[PROMPT_KEY]
    assert not torch.equal(saved.embedding.detach(), initial)
