"""`softprompt compare`: every method on the same data, in report.md and report.html."""

from __future__ import annotations

import dataclasses
import gc
import time
from pathlib import Path

from softprompt.config import CompareConfig
from softprompt.console import clock, say
from softprompt.data import load_examples, split_validation
from softprompt.loading import LoadedModel, load_model
from softprompt.measure.compare import (
    RUNNERS,
    Context,
    PeakMemory,
)
from softprompt.measure.evaluate import environment
from softprompt.measure.inspection import inspect_prompt
from softprompt.measure.report import write_compare_report
from softprompt.outputs import claim_output
from softprompt.tracking import MetricsLog


def run_compare(cfg: CompareConfig, loaded: LoadedModel | None = None) -> Path:
    """Run every method of ``cfg`` and write the report; returns the output folder."""
    output = _prepare_output(cfg)
    examples = load_examples(cfg.data.data, cfg.data)
    if not cfg.data.validation:  # the same split prompt tuning makes, for every method
        examples, _ = split_validation(examples, cfg.data.val_fraction, cfg.seed)
    test = load_examples(cfg.test, cfg.data)[: cfg.limit]
    loaded = loaded or load_model(cfg.model)
    log = MetricsLog(output / "metrics.jsonl")
    log.write(kind="config", config=dataclasses.asdict(cfg), model=loaded.name, **environment())
    ctx = Context(cfg, loaded, examples, test, output, log, cfg.choice_list)
    device = loaded.model.get_input_embeddings().weight.device
    start, took = time.perf_counter(), {}
    methods = cfg.method_list
    for i, method in enumerate(methods, 1):
        elapsed = clock(time.perf_counter() - start)
        eta = _estimate(took, methods[i - 1 :])
        say(f"compare: {i}/{len(methods)} {method}, {elapsed} elapsed{eta}")
        began = time.perf_counter()
        gc.collect()
        with PeakMemory(device) as mem:
            row = RUNNERS[method](ctx)
        log.write(kind="result", method=method, peak_memory_mb=round(mem.peak_mb, 1), **row)
        if method == "prompt-tuning":  # outside the memory window: it copies the vocabulary
            info = inspect_prompt(loaded, output / "prompt-tuning")
            log.write(kind="inspect", method=method, **info)
        took[method] = time.perf_counter() - began
        say(f"compare: {method}: {_headline(row)} ({clock(took[method])})")
    write_compare_report(output)
    return output


def _prepare_output(cfg: CompareConfig) -> Path:
    return claim_output(Path(cfg.output), "a comparison", overwrite=cfg.overwrite)


TRAINED = ("prompt-tuning", "prefix-tuning", "lora", "full-ft")


def _estimate(took: dict[str, float], left: list[str]) -> str:
    """', about T left', from the methods done so far: each method left is assumed to take
    the mean of those of its sort (trained or not) already run; nothing before one has run.
    Full fine-tuning is slower than the others, so the estimate can be low before it."""
    total = 0.0
    for method in left:
        same = [t for m, t in took.items() if (m in TRAINED) == (method in TRAINED)]
        if not same:
            return ""
        total += sum(same) / len(same)
    return f", about {clock(total)} left (from the methods run so far)"


def _headline(row: dict) -> str:
    q = row["quality"]
    key = "accuracy" if "accuracy" in q else "loss"
    return f"{key} {q[key]:.4f}, {row['trainable_params']:,} trainable, {row['train_seconds']:.0f}s"


def main(cfg: CompareConfig) -> None:
    """The command: run every method, then print the report and where it is."""
    output = run_compare(cfg)
    print((output / "report.md").read_text(encoding="utf-8"))
    print(f"report: {output / 'report.html'}")
