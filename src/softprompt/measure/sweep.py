"""`softprompt sweep`: try a small grid of prompt-tuning recipes (learning rate, initialisation,
prompt length) on the user's data and rank them on validation data.

Prompt tuning is known to be fragile: PEFT's own benchmark moved from 5.7% to 34.3% on one
task from the learning rate and initialisation alone. A few short runs find the region
that works before a long run is spent.
"""

from __future__ import annotations

import dataclasses
import itertools
from pathlib import Path

from softprompt.config import GenerateConfig, PromptConfig, SweepConfig, TrainConfig
from softprompt.console import say
from softprompt.data import Example, load_examples, split_validation
from softprompt.errors import ConfigError
from softprompt.generation import generate
from softprompt.loading import LoadedModel, load_model
from softprompt.measure.evaluate import classify, generation_metrics
from softprompt.measure.metrics import accuracy
from softprompt.outputs import claim_output, write_text
from softprompt.tracking import MetricsLog
from softprompt.training import train


def recipes(cfg: SweepConfig) -> list[dict]:
    """Every (prompt length, init, lr) of the grid, named for its run folder."""
    out = []
    for n, init, lr in itertools.product(cfg.length_list, cfg.init_list, cfg.lr_list):
        out.append({"name": f"n{n}-{init}-lr{lr:g}", "length": n, "init": init, "lr": lr})
    return out


def validation_examples(cfg: SweepConfig) -> list[Example]:
    """The examples training validates on (the same split `train` makes)."""
    if cfg.data.validation:
        return load_examples(cfg.data.validation, cfg.data)
    _, val = split_validation(
        load_examples(cfg.data.data, cfg.data), cfg.data.val_fraction, cfg.seed
    )
    if not val:
        raise ConfigError("sweep needs validation data: give --validation or --val-fraction > 0")
    return val


def run_recipe(cfg: SweepConfig, recipe: dict, loaded: LoadedModel, val: list[Example]) -> dict:
    """Train one recipe for ``cfg.steps`` steps and score it on the validation examples."""
    tcfg = TrainConfig(
        model=cfg.model,
        data=cfg.data,
        prompt=PromptConfig(num_virtual_tokens=recipe["length"], init=recipe["init"]),
        output=str(Path(cfg.output) / recipe["name"]),
        max_steps=cfg.steps,
        batch_size=cfg.batch_size,
        lr=recipe["lr"],
        choices=cfg.choices,
        eval_every=cfg.steps,  # one validation, at the end
        seed=cfg.seed,
        overwrite=True,
    )
    result = train(tcfg, loaded=loaded, progress=False)
    row = {
        **recipe,
        "val_loss": result.summary["best_val_loss"],
        "train_seconds": result.summary["train_seconds"],
    }
    sources = [ex.source for ex in val]
    delimiter = cfg.data.target_delimiter
    if cfg.choice_list:
        preds, _ = classify(
            loaded.model,
            loaded.tokenizer,
            result.prompt,
            sources,
            cfg.choice_list,
            delimiter=delimiter,
            batch_size=cfg.batch_size,
        )
        row["val_accuracy"] = accuracy([ex.target for ex in val], preds)
    if cfg.generate:
        gen = GenerateConfig(max_new_tokens=16, batch_size=cfg.batch_size)
        outputs = generate(loaded, sources, result.prompt, gen, None)
        row.update(generation_metrics(outputs, [ex.target for ex in val]))
    return row


def rank(rows: list[dict]) -> list[dict]:
    """Best first: by validation accuracy, else exact match then chrF, else validation loss."""
    if rows and "val_accuracy" in rows[0]:
        return sorted(rows, key=lambda r: (-r["val_accuracy"], r["val_loss"]))
    if rows and "exact_match" in rows[0]:
        return sorted(rows, key=lambda r: (-r["exact_match"], -r["chrf"], r["val_loss"]))
    return sorted(rows, key=lambda r: r["val_loss"])


def format_sweep(rows: list[dict]) -> str:
    """A markdown table of the ranked recipes."""
    extra = [k for k in ("val_accuracy", "exact_match", "chrf") if rows and k in rows[0]]
    names = {"val_accuracy": "val accuracy", "exact_match": "val exact match", "chrf": "val chrF"}
    head = [
        "rank",
        "prompt length",
        "init",
        "lr",
        "val loss",
        *(names[k] for k in extra),
        "train s",
    ]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for i, r in enumerate(rank(rows), 1):
        cells = [str(i), str(r["length"]), r["init"], f"{r['lr']:g}", f"{r['val_loss']:.4f}"]
        cells += [f"{r[k]:.1f}" if k == "chrf" else f"{r[k]:.3f}" for k in extra]
        lines.append("| " + " | ".join([*cells, f"{r['train_seconds']:.0f}"]) + " |")
    return "\n".join(lines)


def run_sweep(cfg: SweepConfig, loaded: LoadedModel | None = None) -> list[dict]:
    """Run every recipe; write sweep.jsonl and sweep.md in ``cfg.output``; ranked rows."""
    output = claim_output(Path(cfg.output), "a sweep", overwrite=cfg.overwrite)
    val = validation_examples(cfg)
    loaded = loaded or load_model(cfg.model)
    log = MetricsLog(output / "sweep.jsonl")
    log.write(kind="config", config=dataclasses.asdict(cfg))
    rows = []
    grid = recipes(cfg)
    for i, recipe in enumerate(grid, 1):
        say(f"sweep {i}/{len(grid)}: {recipe['name']}")
        rows.append(run_recipe(cfg, recipe, loaded, val))
        log.write(kind="recipe", **rows[-1])
    table = format_sweep(rows)
    write_text(output / "sweep.md", table + "\n")
    return rank(rows)
