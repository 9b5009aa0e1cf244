"""--report-to: the run's records reach the trackers (TensorBoard read back from its event
file, CSV), and a tracker that is not installed is a one-line error naming the install."""

from __future__ import annotations

import csv
import json

import pytest
from conftest import train_config

from softprompt.cli import main
from softprompt.errors import ConfigError
from softprompt.tracking import report_targets
from softprompt.training import train


def _records(out) -> list[dict]:
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]


def test_tensorboard_event_file_holds_every_loss(model_dirs, pairs_file, tmp_path):
    pytest.importorskip("tensorboard")  # the `track` extra
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "run"
    train(train_config(model_dirs["llama"], pairs_file, out, epochs=2, report_to="tensorboard"),
          progress=False)  # fmt: skip
    events = EventAccumulator(str(out / "tensorboard"), size_guidance={"scalars": 0, "images": 0})
    events.Reload()
    records = _records(out)
    train_rec = [r for r in records if r["kind"] == "train"]
    scalars = events.Scalars("train/loss")
    assert [s.step for s in scalars] == [r["step"] for r in train_rec]
    assert [s.value for s in scalars] == pytest.approx([r["loss"] for r in train_rec], rel=1e-6)
    val = [r for r in records if r["kind"] == "val"]
    assert [s.value for s in events.Scalars("val/loss")] == pytest.approx([r["loss"] for r in val])
    assert "train/lr" in events.Tags()["scalars"] and "base/loss" in events.Tags()["scalars"]
    assert events.Tags()["images"] == ["loss_plot"]  # the loss plot, at the end
    marker = json.loads((out / ".softprompt-output.json").read_text())
    assert "tensorboard" in marker["entries"]  # --overwrite may remove it


def test_csv_holds_every_value(model_dirs, pairs_file, tmp_path):
    out = tmp_path / "run"
    assert main(["train", "--model", str(model_dirs["llama"]), "--data", str(pairs_file),
                 "--input-field", "review", "--target-field", "label", "--max-steps", "3",
                 "--batch-size", "4", "--num-virtual-tokens", "2", "--report-to", "csv",
                 "--output", str(out)]) == 0  # fmt: skip
    rows = list(csv.DictReader((out / "metrics.csv").open()))
    losses = [(int(r["step"]), float(r["value"])) for r in rows
              if r["kind"] == "train" and r["name"] == "loss"]  # fmt: skip
    assert losses == [(r["step"], r["loss"]) for r in _records(out) if r["kind"] == "train"]
    assert {r["kind"] for r in rows} >= {"train", "val", "base"}


def test_report_to_errors(capsys, monkeypatch):
    assert report_targets("none") == [] and report_targets("csv,none") == ["csv"]
    with pytest.raises(ConfigError, match="report_to must name some of"):
        report_targets("neptune")
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "wandb" else real(name, *a))  # fmt: skip
    assert main(["train", "--data", "x.jsonl", "--report-to", "wandb", "--output", "o"]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err == "softprompt: error: --report-to wandb needs the wandb package: pip install wandb"
