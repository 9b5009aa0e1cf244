"""Which validated step of a training run to keep, by each rule of ``train --select``: the
lowest validation loss (the default), the highest validation accuracy (ties to the lower
loss), or the last step. Each rule's prompt is scored on the same held-out test rows. A
question for the defaults: on small sets the validation loss can favour an early step that
generalizes worse than a later one.

    python benchmarks/suite.py --tasks cb --seeds 0 --methods study --runs runs/suite \\
        --variant study:keep_checkpoints=1000
    python benchmarks/bench_select.py runs/suite/cb-s0/study

Each RUN is the folder of a decoder's ``softprompt train`` run of
``benchmarks/suite.py`` (``--runs``): its test rows are the ``data-METHOD/test.jsonl``
beside it, its labels those of its training and validation rows (as the suite scores them).
The step each rule keeps is read from the run's validations (``metrics.jsonl``: the loss and,
for runs trained since validation counts right answers, the accuracy), and that step's
prompt from its checkpoint (``checkpoints/step-*``), so the run must keep the checkpoints of
every validated step (``--keep-checkpoints``; a rule whose step's checkpoint is gone is
shown as such). A classification run is scored as the suite scores it (accuracy and macro-F1
by the labels' likelihood), a generation run too (chrF and BLEU of greedy outputs; the
accuracy rule does not apply). Prints one row per run and rule (the step, the two scores,
the difference from the loss rule in points), then each rule's mean over the runs that
every rule scored.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from safetensors import safe_open  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402
from suite import (  # noqa: E402
    choices_config,
    generation_config,
    read_jsonl,
    score_choices,
    score_generation,
    task_seed,
)
from tables import run_facts  # noqa: E402

from softprompt.artifacts import ADAPTER_WEIGHTS, PROMPT_KEY, load_prompt  # noqa: E402
from softprompt.config import DataConfig, ModelConfig  # noqa: E402
from softprompt.data import load_examples  # noqa: E402
from softprompt.loading import load_model  # noqa: E402
from softprompt.training.checkpoint import TaskBest  # noqa: E402
from softprompt.training.run import keeps  # noqa: E402

RULES = ("loss", "accuracy", "last")


def kept_steps(run: Path) -> dict[str, int | None]:
    """The step each rule keeps, from the run's validations after the initial one, by the
    training loop's own rule (``keeps``); None where the run logged no accuracy."""
    vals = [r for r in read_jsonl(run / "metrics.jsonl") if r["kind"] == "val"][1:]
    out: dict[str, int | None] = {}
    for rule in RULES:
        if rule == "accuracy" and any("accuracy" not in r for r in vals):
            out[rule] = None
            continue
        kept = TaskBest()
        for r in vals:
            if keeps(rule, r["loss"], r.get("accuracy"), kept):
                kept = TaskBest(r["loss"], r["step"], r.get("accuracy"))
        out[rule] = kept.step
    return out


def check_prompt_only(run: Path) -> None:
    """Refuse a run whose adapter holds more than its prompt: a classifier's head would stay
    the one the run kept, whichever step's prompt is swapped in (the keys alone are read)."""
    with safe_open(str(run / ADAPTER_WEIGHTS), framework="pt") as f:
        keys = set(f.keys())
    if keys != {PROMPT_KEY}:
        raise SystemExit(
            f"bench_select: {run} saved more than a prompt ({', '.join(sorted(keys))}); "
            "only decoder runs, whose prompt is the whole adapter, are supported"
        )


def step_copy(run: Path, step: int, into: Path) -> Path | None:
    """A copy of ``run``'s prompt folder (``check_prompt_only``) holding the prompt of the
    checkpoint at ``step`` (None if that checkpoint was not kept)."""
    checkpoint = run / "checkpoints" / f"step-{step:08d}"
    if not checkpoint.is_dir():
        return None
    into.mkdir(parents=True)
    for f in run.glob("*.json"):
        shutil.copy(f, into)
    prompt = load_file(str(checkpoint / "tensors.safetensors"))["prompt"][0]
    save_file({PROMPT_KEY: prompt.contiguous()}, str(into / ADAPTER_WEIGHTS),
              metadata={"format": "pt"})  # fmt: skip
    return into


# what each kind of run is scored by: (the main score, the second, points per unit)
SCORES = {"classification": ("accuracy", "macro_f1", 100.0), "generation": ("chrf", "bleu", 1.0)}


def score_run(run: Path, tmp: Path, models: dict) -> tuple[str, dict[str, dict | None]]:
    """(the run's kind of task, each rule's step and test scores: None where the rule cannot
    be applied, the step alone where its checkpoint was not kept)."""
    check_prompt_only(run)
    logged = next(r for r in read_jsonl(run / "metrics.jsonl") if r["kind"] == "config")
    data = DataConfig(**{k: v for k, v in logged["config"]["data"].items()
                         if k in DataConfig.__dataclass_fields__})  # fmt: skip
    folder = run.parent / f"data-{run.name}"
    meta = json.loads((run / "softprompt.json").read_text())
    generation = not meta["training"].get("choices")  # no label words: a generation task
    seen = read_jsonl(folder / "train.jsonl") + read_jsonl(folder / "validation.jsonl")
    labels = None if generation else sorted({r[data.target_field] for r in seen})
    model = (meta.get("base_model") or {}).get("name") or "embedded"
    key = (model, tuple(labels or ()))  # a classifier's head is built for its labels
    if key not in models:
        models[key] = load_model(ModelConfig(model=model), labels=labels)
    loaded = models[key]
    examples = load_examples(str(folder / "test.jsonl"), data)
    if generation:
        ecfg = generation_config(data)
    else:
        ecfg = choices_config(data, labels)
    scored: dict[int, dict | None] = {}
    got: dict[str, dict | None] = {}
    for rule, step in kept_steps(run).items():
        if step is None:
            got[rule] = None
            continue
        if step not in scored:
            where = step_copy(run, step, tmp / f"{run.parent.name}-{run.name}-{step}")
            prompt = None if where is None else load_prompt(where, loaded.model)[0]
            scored[step] = (
                None if prompt is None
                else score_generation(loaded, prompt, examples, ecfg, folder / "test.jsonl")
                if generation else score_choices(loaded, prompt, examples, ecfg)
            )  # fmt: skip
        got[rule] = {"step": step, **(scored[step] or {})}
    return ("generation" if generation else "classification"), got


def saved_row(run: Path, rule: str, result: dict) -> dict:
    """One rule's scores as a suite row: the task and seed of the suite's folder (TASK-sSEED),
    the method named RUN-RULE (``study-last``: the method ``study``'s last step)."""
    task, seed = task_seed(run.parent)
    return {"task": task, "seed": seed, "method": f"{run.name}-{rule}", "rule": rule,
            "run": str(run), **result}  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", help="folders of suite training runs")
    parser.add_argument("--json", help="also append each run and rule's scores here, as suite "
                        "rows (method RUN-RULE) that suite.py --pivot reads")  # fmt: skip
    args = parser.parse_args(argv)
    models: dict[tuple, object] = {}
    out = [
        "| run | rule | step | accuracy or chrF | macro-F1 or BLEU | minus the loss rule |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    complete: dict[str, list[dict[str, float]]] = {kind: [] for kind in SCORES}
    if args.json:  # a header, then rows the suite's tables read (--pivot)
        header = {"kind": "run", **run_facts(), "command": " ".join(sys.argv)}
        with open(args.json, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(header) + "\n")
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.runs:
            family, got = score_run(Path(name), Path(tmp), models)
            main_key, second, unit = SCORES[family]
            base = (got.get("loss") or {}).get(main_key)
            for rule in RULES:
                result = got[rule]
                if result is None:
                    row = f"| {name} | {rule} | - | no accuracy logged | | |"
                elif main_key not in result:
                    row = f"| {name} | {rule} | {result['step']} | checkpoint not kept | | |"
                else:
                    gap = "" if base is None else f"{unit * (result[main_key] - base):+.1f}"
                    row = (f"| {name} | {rule} | {result['step']} | {result[main_key]:.3f} "
                           f"| {result[second]:.3f} | {gap} |")  # fmt: skip
                    if args.json:
                        with open(args.json, "a", encoding="utf-8") as fh:
                            fh.write(json.dumps(saved_row(Path(name), rule, result)) + "\n")
                out.append(row)
                print(row, file=sys.stderr, flush=True)  # progress: each run as it is scored
            rules = [r for r in RULES if family == "classification" or r != "accuracy"]
            values = {r: got[r][main_key] for r in rules if got[r] and main_key in got[r]}
            if len(values) == len(rules):
                complete[family].append(values)
    for family, runs in complete.items():
        if not runs:
            continue
        main_key, _, unit = SCORES[family]
        out += ["", f"{family.capitalize()}: over the {len(runs)} runs that every rule scored:",
                "", f"| rule | mean {main_key} | minus the loss rule | runs better / worse "
                "than it |", "| --- | --- | --- | --- |"]  # fmt: skip
        for rule in runs[0]:
            mean = statistics.mean(c[rule] for c in runs)
            gap = unit * (mean - statistics.mean(c["loss"] for c in runs))
            better = sum(c[rule] > c["loss"] for c in runs)
            worse = sum(c[rule] < c["loss"] for c in runs)
            out.append(f"| {rule} | {mean:.3f} | {gap:+.1f} | {better} / {worse} |")
    print("\n".join(out))


if __name__ == "__main__":
    main()
