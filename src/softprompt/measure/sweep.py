"""`softprompt sweep`: try a small grid of prompt-tuning recipes (learning rate, initialisation,
prompt length) on the user's data and rank them on validation data.

Prompt tuning is known to be fragile: PEFT's own benchmark moved from 5.7% to 34.3% on one
task from the learning rate and initialisation alone. A few short runs find the region
that works before a long run is spent.
"""

from __future__ import annotations

import itertools
from pathlib import Path

from softprompt.config import GenerateConfig, PromptConfig, SweepConfig, TrainConfig
from softprompt.data import Example, load_examples, split_validation
from softprompt.errors import ConfigError
from softprompt.generation import generate
from softprompt.loading import LoadedModel
from softprompt.measure.metrics import accuracy, generation_metrics
from softprompt.scoring import classify
from softprompt.training import train


def recipes(cfg: SweepConfig) -> list[dict]:
    """Every ([method,] prompt length, init, lr[, reparam][, choice loss]) of the grid, named
    for its run folder (the optional ones only when --methods / --reparams / --choice-losses
    are given)."""
    reparams = getattr(cfg, "reparams", None) and cfg.reparam_list
    losses = getattr(cfg, "choice_losses", None) and cfg.choice_loss_list
    methods = getattr(cfg, "methods", None) and cfg.method_list
    out = []
    grid = itertools.product(methods or [None], cfg.length_list, cfg.init_list, cfg.lr_list,
                             reparams or [None], losses or [None])  # fmt: skip
    for method, n, init, lr, reparam, loss in grid:
        if method == "prefix" and reparam not in (None, "none"):
            continue  # a deep prefix has no input vectors to map
        recipe = {"name": f"n{n}-{init.replace('/', '_')}-lr{lr:g}", "length": n, "init": init,
                  "lr": lr}  # fmt: skip
        if method is not None:
            recipe["name"] = f"{method}-{recipe['name']}"
            recipe["method"] = method
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
    extra = {k: recipe[k] for k in ("method", "reparam", "choice_loss") if k in recipe}
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
