"""`softprompt sweep` on a tiny model: the grid, one row per recipe, ranking, sweep.md."""

from __future__ import annotations

import json
import re

import pytest

from softprompt.cli import main
from softprompt.commands.sweep import rank
from softprompt.config import SweepConfig
from softprompt.measure.sweep import recipes


def test_recipes_cover_the_grid():
    cfg = SweepConfig.__new__(SweepConfig)  # no validation needed to expand a grid
    cfg.lrs, cfg.inits, cfg.lengths = "0.01,0.1", "vocab,random", "4,8"
    grid = recipes(cfg)
    assert len(grid) == 8 and grid[0] == {
        "name": "n4-vocab-lr0.01",
        "length": 4,
        "init": "vocab",
        "lr": 0.01,
    }


def test_rank_prefers_accuracy_then_loss():
    rows = [
        {"val_accuracy": 0.7, "val_loss": 0.2},
        {"val_accuracy": 0.9, "val_loss": 0.5},
        {"val_accuracy": 0.9, "val_loss": 0.4},
    ]
    assert [r["val_loss"] for r in rank(rows)] == [0.4, 0.5, 0.2]
    assert [r["val_loss"] for r in rank([{"val_loss": 2.0}, {"val_loss": 1.0}])] == [1.0, 2.0]


def test_sweep_cli_runs_each_recipe_and_writes_the_table(tiny_dir, pairs_file, tmp_path, capsys):
    out = tmp_path / "sweep"
    code = main(
        [
            "sweep",
            "--model",
            str(tiny_dir),
            "--data",
            str(pairs_file),
            "--input-field",
            "review",
            "--target-field",
            "label",
            "--val-fraction",
            "0.25",
            "--choices",
            "negative,positive",
            "--generate",
            "--lrs",
            "0.01,0.3",
            "--inits",
            "vocab",
            "--lengths",
            "4",
            "--methods",
            "prompt,prefix",
            "--steps",
            "2",
            "--batch-size",
            "4",
            "--output",
            str(out),
        ]
    )
    captured = capsys.readouterr()
    printed = captured.out
    assert code == 0
    # a progress line per recipe: its place, the time so far, then an estimate of the rest
    lines = re.findall(r"sweep (\d)/4: .*, seed 0, \S+ elapsed(.*)", captured.err)
    assert [n for n, _ in lines] == ["1", "2", "3", "4"]
    assert lines[0][1] == "" and all(re.match(r", about \S+ left$", e) for _, e in lines[1:])
    rows = [json.loads(x) for x in (out / "sweep.jsonl").read_text().splitlines()]
    recipes_run = [r for r in rows if r["kind"] == "recipe"]
    assert [(r["method"], r["lr"]) for r in recipes_run] == [
        ("prompt", 0.01), ("prompt", 0.3), ("prefix", 0.01), ("prefix", 0.3)]  # fmt: skip
    for r in recipes_run:
        assert 0 <= r["val_accuracy"] <= 1 and r["val_loss"] > 0 and "chrf" in r
    table = (out / "sweep.md").read_text()
    assert table.splitlines()[0].startswith("| rank | prompt length | init | lr | val loss")
    assert len(table.splitlines()) == 6 and table.strip() in printed and "| method |" in table
    assert (out / "prompt-n4-vocab-lr0.3" / "adapter_model.safetensors").is_file()
    deep = json.loads((out / "prefix-n4-vocab-lr0.3" / "adapter_config.json").read_text())
    assert deep["peft_type"] == "PREFIX_TUNING"


@pytest.mark.parametrize(
    "flags,message",
    [(["--lrs", "fast"], "--lrs takes numbers"), (["--inits", "magic"], "--init must be one of")],
)
def test_sweep_errors_are_one_line(pairs_file, tmp_path, capsys, flags, message):
    code = main(["sweep", "--data", str(pairs_file), "--output", str(tmp_path / "s"), *flags])
    assert code == 2 and message in capsys.readouterr().err
