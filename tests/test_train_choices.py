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


def _kept_by_rule(vals: list[dict]) -> dict:
    """The validation ``--select accuracy`` keeps: the most accurate, ties to the lower loss,
    exact ties to the earlier (the first record, the initial prompt, is not a candidate)."""
    kept = vals[1]
    for r in vals[2:]:
        same = r["accuracy"] == kept["accuracy"]
        if r["accuracy"] > kept["accuracy"] or (same and r["loss"] < kept["loss"] - 1e-6):
            kept = r
    return kept


def test_select_accuracy_keeps_the_most_accurate_validation(tiny_dir, pairs_file, tmp_path):
    """Each validation logs its accuracy; the saved prompt is the one the rule picks, and
    scoring it again gives that validation's loss and accuracy."""
    from softprompt.loading import load_model
    from softprompt.training.setup import DataSource

    out = tmp_path / "acc"
    cfg = train_config(tiny_dir, pairs_file, out, epochs=6, choices="negative,positive",
                       choice_loss="restricted", select="accuracy", lr=1.0)  # fmt: skip
    result = train(cfg, progress=False)
    vals = [r for r in _records(out) if r["kind"] == "val"]
    assert all(r["accuracy"] * 3 == round(r["accuracy"] * 3) for r in vals)  # 3 rows
    kept = _kept_by_rule(vals)
    summary = result.summary
    assert summary["select"] == "accuracy"
    assert (summary["kept_step"], summary["kept_val_accuracy"]) == (kept["step"], kept["accuracy"])
    assert summary["kept_val_loss"] == pytest.approx(kept["loss"])
    # the saved prompt is that validation's: its loss and accuracy again
    loaded = load_model(model=str(tiny_dir))
    source = DataSource()
    data = source.prepare(cfg, *source.examples(cfg), loaded, out, "cpu")
    prompt, _ = load_prompt(out, loaded.model)
    again = loaded.kind.evaluate_loss(loaded.model, prompt, data.val_by_task[0], 3,
                                      loaded.tokenizer.pad_token_id, data.choice_ids)  # fmt: skip
    assert again["accuracy"] == kept["accuracy"]
    assert again["loss"] == pytest.approx(kept["loss"], rel=1e-4)


def test_select_last_keeps_the_last_validation(tiny_dir, pairs_file, tmp_path):
    out = tmp_path / "last"
    cfg = train_config(tiny_dir, pairs_file, out, epochs=3, choices="negative,positive",
                       select="last")  # fmt: skip
    summary = train(cfg, progress=False).summary
    vals = [r for r in _records(out) if r["kind"] == "val"]
    assert summary["kept_step"] == summary["steps"] == vals[-1]["step"]
    assert summary["kept_val_loss"] == pytest.approx(vals[-1]["loss"])


def test_select_accuracy_needs_labels(tiny_dir, pairs_file, tmp_path):
    """Refused before anything is measured (no validation logged) where validation counts
    no right answers: no labels, or the full loss over the whole vocabulary."""
    cfg = train_config(tiny_dir, pairs_file, tmp_path / "x", select="accuracy")
    with pytest.raises(ConfigError, match="select accuracy needs labels.*give (--)?choices"):
        train(cfg, progress=False)
    full = train_config(tiny_dir, pairs_file, tmp_path / "f", select="accuracy",
                        choices="negative,positive", choice_loss="full")  # fmt: skip
    with pytest.raises(ConfigError, match="choice.loss full scores the whole vocabulary"):
        train(full, progress=False)
    for out in ("x", "f"):
        log = tmp_path / out / "metrics.jsonl"
        assert not log.exists() or '"val"' not in log.read_text()
    with pytest.raises(ConfigError, match="select must be one of"):
        train_config(tiny_dir, pairs_file, tmp_path / "y", select="best")


def test_a_decoder_keeps_its_last_prompt_by_default(tiny_dir, pairs_file, tmp_path, capsys):
    """Without --select a decoder keeps the last validated prompt (the kind's default, said
    on the console); the saved prompt is the last checkpoint's."""
    from safetensors.torch import load_file

    out = tmp_path / "default"
    cfg = train_config(tiny_dir, pairs_file, out, epochs=3, choices="negative,positive",
                       select=None, keep_checkpoints=10)  # fmt: skip
    summary = train(cfg, progress=False).summary
    assert "--select last" in capsys.readouterr().err
    assert summary["select"] == "last" and summary["kept_step"] == summary["steps"]
    last = sorted((out / "checkpoints").glob("step-*"))[-1]
    saved = load_file(str(out / "adapter_model.safetensors"))[PROMPT_KEY]
    assert torch.equal(saved, load_file(str(last / "tensors.safetensors"))["prompt"][0])
    assert len(list((out / "checkpoints").glob("step-*"))) == 3  # one per epoch, all kept
    meta = json.loads((out / "softprompt.json").read_text())
    assert meta["training"]["select"] == "last"


def test_a_decoder_generating_text_keeps_the_lowest_loss_by_default(tiny_dir, pairs_file,
                                                                    tmp_path, capsys):  # fmt: skip
    """Without labels (generation) a decoder's default stays the lowest validation loss."""
    cfg = train_config(tiny_dir, pairs_file, tmp_path / "gen", epochs=2, select=None)
    summary = train(cfg, progress=False).summary
    assert "--select loss" in capsys.readouterr().err
    assert summary["select"] == "loss" and summary["kept_step"] == summary["best_step"]


def test_a_classifier_keeps_its_most_accurate_prompt_by_default(kind_dirs, pairs_file,
                                                                tmp_path, capsys):  # fmt: skip
    """Without --select a classifier keeps the validation that labels the most rows right,
    ties to the lower loss (its kind's default, said on the console and recorded)."""
    out = tmp_path / "enc"
    cfg = train_config(kind_dirs["bert"], pairs_file, out, epochs=4, select=None, lr=0.3)
    summary = train(cfg, progress=False).summary
    assert "--select accuracy" in capsys.readouterr().err
    assert summary["select"] == "accuracy"
    vals = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    vals = [v for v in vals if v.get("kind") == "val" and v["step"] > 0]
    best = max(vals, key=lambda v: (v["accuracy"], -v["loss"]))
    assert summary["kept_step"] == best["step"]
    assert json.loads((out / "softprompt.json").read_text())["training"]["select"] == "accuracy"
