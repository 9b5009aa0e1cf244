"""`softprompt sweep`: try a small grid of prompt-tuning recipes (learning rate, initialisation,
prompt length) on the user's data and rank them on validation data.

Prompt tuning is known to be fragile: PEFT's own benchmark moved from 5.7% to 34.3% on one
task from the learning rate and initialisation alone. A few short runs find the region
that works before a long run is spent.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
from pathlib import Path

from softprompt.config import GenerateConfig, PromptConfig, SweepConfig, TrainConfig
from softprompt.console import say
from softprompt.data import Example, load_examples, split_validation
from softprompt.errors import ConfigError
from softprompt.generation import generate
from softprompt.loading import LoadedModel, load_model
from softprompt.measure.metrics import accuracy, generation_metrics
from softprompt.outputs import claim_output, write_text
from softprompt.scoring import classify
from softprompt.tracking import MetricsLog
from softprompt.training import train


def recipes(cfg: SweepConfig) -> list[dict]:
    """Every (prompt length, init, lr[, reparam][, choice loss]) of the grid, named for its
    run folder (the last two only when --reparams / --choice-losses are given)."""
    reparams = getattr(cfg, "reparams", None) and cfg.reparam_list
    losses = getattr(cfg, "choice_losses", None) and cfg.choice_loss_list
    out = []
    grid = itertools.product(
        cfg.length_list, cfg.init_list, cfg.lr_list, reparams or [None], losses or [None]
    )
    for n, init, lr, reparam, loss in grid:
        recipe = {"name": f"n{n}-{init.replace('/', '_')}-lr{lr:g}", "length": n, "init": init,
                  "lr": lr}  # fmt: skip
        if reparam is not None:
            recipe["name"] += f"-{reparam}"
            recipe["reparam"] = reparam
        if loss is not None:
            recipe["name"] += f"-{loss}"
            recipe["choice_loss"] = loss
        out.append(recipe)
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


def run_recipe(
    cfg: SweepConfig,
    recipe: dict,
    loaded: LoadedModel,
    val: list[Example],
    seed: int | None = None,
    test: list[Example] | None = None,
) -> dict:
    """Train one recipe for ``cfg.steps`` steps (with ``seed``, default --seed) and score it
    on the validation examples (and ``test``)."""
    seed = cfg.seed if seed is None else seed
    several = len(getattr(cfg, "seeds", None) and cfg.seed_list or [seed]) > 1
    folder = recipe["name"] + (f"-s{seed}" if several else "")
    extra = {k: recipe[k] for k in ("reparam", "choice_loss") if k in recipe}
    tcfg = TrainConfig(
        model=cfg.model,
        data=cfg.data,
        prompt=PromptConfig(num_virtual_tokens=recipe["length"], init=recipe["init"]),
        output=str(Path(cfg.output) / folder),
        max_steps=cfg.steps,
        batch_size=cfg.batch_size,
        lr=recipe["lr"],
        choices=cfg.choices or "none",  # the sweep's own --choices, never detected
        eval_every=cfg.steps,  # one validation, at the end
        seed=seed,
        overwrite=True,
        **extra,
    )
    result = train(tcfg, loaded=loaded, progress=False)
    row = {
        **recipe,
        "seed": seed,
        "val_loss": result.summary["best_val_loss"],
        "train_seconds": result.summary["train_seconds"],
    }
    row.update(_scores(cfg, loaded, result.prompt, val, "val_"))
    if test:
        row.update(_scores(cfg, loaded, result.prompt, test, "test_"))
    return row


def _scores(cfg: SweepConfig, loaded: LoadedModel, prompt, examples: list[Example], prefix: str):
    """Accuracy (with --choices) and generation metrics (with --generate), keys prefixed;
    the validation ones keep their old names (val_accuracy, exact_match, chrf)."""
    out = {}
    sources = [ex.source for ex in examples]
    golds = [ex.target for ex in examples]
    if cfg.choice_list:
        preds, _ = classify(
            loaded.model,
            loaded.tokenizer,
            prompt,
            sources,
            cfg.choice_list,
            delimiter=cfg.data.target_delimiter,
            batch_size=cfg.batch_size,
        )
        out[prefix + "accuracy"] = accuracy(golds, preds)
    if cfg.generate:
        gen = GenerateConfig(max_new_tokens=16, batch_size=cfg.batch_size)
        outputs = generate(loaded, sources, prompt, gen, None)
        metrics = generation_metrics(outputs, golds)
        out.update(metrics if prefix == "val_" else {prefix + k: v for k, v in metrics.items()})
    return out


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
    options = [k for k in ("reparam", "choice_loss") if rows and k in rows[0]]
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
    for i, (recipe, seed) in enumerate(grid, 1):
        say(f"sweep {i}/{len(grid)}: {recipe['name']}, seed {seed}")
        rows.append(run_recipe(cfg, recipe, loaded, val, seed, test))
        log.write(kind="recipe", **rows[-1])
    table = format_sweep(rows)
    write_text(output / "sweep.md", table + "\n")
    return rank(over_seeds(rows))
