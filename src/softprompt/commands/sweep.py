"""`softprompt sweep`: one short run per recipe, ranked on validation data, in sweep.md."""

from __future__ import annotations

import dataclasses
import functools
import time
from pathlib import Path

from softprompt.config import SweepConfig
from softprompt.console import clock, say
from softprompt.data import load_examples
from softprompt.loading import LoadedModel, load_model
from softprompt.measure.sweep import recipes, run_recipe, validation_examples
from softprompt.outputs import claim_output, write_text
from softprompt.tracking import MetricsLog


def rank(rows: list[dict]) -> list[dict]:
    """Best first: by validation accuracy, else exact match then chrF, else validation loss."""
    if rows and "val_accuracy" in rows[0]:
        return sorted(rows, key=lambda r: (-r["val_accuracy"], r["val_loss"]))
    if rows and "exact_match" in rows[0]:
        return sorted(rows, key=lambda r: (-r["exact_match"], -r["chrf"], r["val_loss"]))
    return sorted(rows, key=lambda r: r["val_loss"])


METRIC_NAMES = {
    "val_accuracy": "val accuracy",
    "exact_match": "val exact match",
    "chrf": "val chrF",
    "test_accuracy": "test accuracy",
    "test_exact_match": "test exact match",
    "test_chrf": "test chrF",
}


def over_seeds(rows: list[dict]) -> list[dict]:
    """One row per recipe: each number the mean over its seeds, with ``spread`` holding the
    (min, max) of each and ``seeds`` their count (rows of one seed pass through)."""
    groups: dict[str, list[dict]] = {}
    for r in rows:
        groups.setdefault(r["name"], []).append(r)
    out = []
    for runs in groups.values():
        if len(runs) == 1:
            out.append(runs[0])
            continue
        merged = dict(runs[0])
        merged["seeds"], merged["spread"] = len(runs), {}
        for key, value in runs[0].items():
            if isinstance(value, float | int) and key not in ("length", "lr", "seed"):
                values = [float(r[key]) for r in runs]
                merged[key] = sum(values) / len(values)
                merged["spread"][key] = (min(values), max(values))
        out.append(merged)
    return out


def _number(row: dict, key: str, fmt: str) -> str:
    """``row[key]`` formatted, with its (min-max) over seeds when it has one."""
    text = f"{row[key]:{fmt}}"
    if key in row.get("spread", {}):
        low, high = row["spread"][key]
        text += f" ({low:{fmt}}-{high:{fmt}})"
    return text


def format_sweep(rows: list[dict]) -> str:
    """A markdown table of the ranked recipes (several seeds: mean (min-max))."""
    rows = over_seeds(rows)
    extra = [k for k in METRIC_NAMES if rows and k in rows[0]]
    options = [k for k in ("method", "reparam", "choice_loss") if rows and k in rows[0]]
    head = [
        "rank",
        "prompt length",
        "init",
        "lr",
        "val loss",
        *(METRIC_NAMES[k] for k in extra),
        *(k.replace("_", " ") for k in options),
        *(["seeds"] if rows and "seeds" in rows[0] else []),
        "train s",
    ]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for i, r in enumerate(rank(rows), 1):
        num = functools.partial(_number, r)
        cells = [str(i), str(r["length"]), r["init"], f"{r['lr']:g}", num("val_loss", ".4f")]
        cells += [num(k, ".1f" if k.endswith("chrf") else ".3f") for k in extra]
        cells += [str(r[k]) for k in options]
        cells += [str(r["seeds"])] if "seeds" in r else []
        lines.append("| " + " | ".join([*cells, num("train_seconds", ".0f")]) + " |")
    return "\n".join(lines)


def run_sweep(cfg: SweepConfig, loaded: LoadedModel | None = None) -> list[dict]:
    """Run every recipe; write sweep.jsonl and sweep.md in ``cfg.output``; ranked rows."""
    output = claim_output(Path(cfg.output), "a sweep", overwrite=cfg.overwrite)
    val = validation_examples(cfg)
    loaded = loaded or load_model(cfg.model)
    log = MetricsLog(output / "sweep.jsonl")
    log.write(kind="config", config=dataclasses.asdict(cfg))
    test = load_examples(cfg.test, cfg.data) if cfg.test else None
    rows = []
    grid = [(recipe, seed) for recipe in recipes(cfg) for seed in cfg.seed_list]
    start = time.perf_counter()
    for i, (recipe, seed) in enumerate(grid, 1):
        elapsed = time.perf_counter() - start
        eta = f", about {clock(elapsed / (i - 1) * (len(grid) - i + 1))} left" if i > 1 else ""
        say(f"sweep {i}/{len(grid)}: {recipe['name']}, seed {seed}, {clock(elapsed)} elapsed{eta}")
        rows.append(run_recipe(cfg, recipe, loaded, val, seed, test))
        log.write(kind="recipe", **rows[-1])
    table = format_sweep(rows)
    write_text(output / "sweep.md", table + "\n")
    return rank(over_seeds(rows))


def main(cfg: SweepConfig) -> None:
    """The command: run every recipe, then print the ranking."""
    print(format_sweep(run_sweep(cfg)))
