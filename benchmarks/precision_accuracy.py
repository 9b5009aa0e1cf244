"""bfloat16's accuracy cost: the same training in float32 and bfloat16, 3 seeds each, on the
shipped tasks; every prompt scored in float32 on the test split.

- sentiment (examples/sentiment): 64 steps of batch 8, accuracy over the two labels;
- antonyms (examples/antonyms): 64 steps of batch 8, exact match of greedy generations.

    python benchmarks/precision_accuracy.py             # 12 runs, about 15 min on 2 cores
    python benchmarks/precision_accuracy.py --quick     # 1 seed, 8 steps: a smoke run

Prints one line per run and a mean (min-max) table; `--dtype auto` picks bfloat16 only
where this shows no accuracy cost (see docs/measurements.md).
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TASKS = {
    "sentiment": dict(
        input_field="review", target_field="label", template="Review: {input}\nSentiment:"
    ),  # fmt: skip
    "antonyms": dict(
        input_field="word", target_field="opposite", template="Word: {input}\nOpposite:"
    ),  # fmt: skip
}


def run(task: str, dtype: str, seed: int, steps: int, scorer) -> dict:
    from softprompt import DataConfig, EvalConfig, ModelConfig, TrainConfig, train
    from softprompt.commands.eval import run_eval

    folder = ROOT / "examples" / task
    out = Path(tempfile.mkdtemp(prefix=f"prec-{task}-")) / "run"
    fields = TASKS[task]
    cfg = TrainConfig(
        method="prompt",  # what section 5 measured
        model=ModelConfig(model=scorer.name, dtype=dtype),
        data=DataConfig(
            data=str(folder / "train.jsonl"), validation=str(folder / "validation.jsonl"), **fields
        ),  # fmt: skip
        output=str(out),
        max_steps=steps,
        batch_size=8,
        seed=seed,
    )
    start = time.perf_counter()
    train(cfg, progress=False)
    seconds = time.perf_counter() - start
    data = DataConfig(data=str(folder / "test.jsonl"), **fields)
    choices = "positive,negative" if task == "sentiment" else None
    ecfg = EvalConfig(data=data, prompt=str(out), generate=task == "antonyms", choices=choices)
    result = run_eval(ecfg, loaded=scorer)  # float32 scorer for every prompt
    metrics = result["metrics"]
    score = metrics.get("accuracy", metrics.get("exact_match"))
    return {"task": task, "dtype": dtype, "seed": seed, "score": score, "train_s": seconds}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="embedded")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--steps", type=int, default=64)
    p.add_argument("--tasks", default="sentiment,antonyms")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--json", help="also write the runs to this file")
    args = p.parse_args()
    if args.quick:
        args.seeds, args.steps = 1, 8
    from softprompt import load_model

    scorer = load_model(model=args.model, dtype="float32")
    runs = []
    for task in args.tasks.split(","):
        for seed in range(args.seeds):
            for dtype in ("float32", "bfloat16"):
                r = run(task, dtype, seed, args.steps, scorer)
                print(json.dumps(r), flush=True)
                runs.append(r)
    print("| task | dtype | score mean (min-max) | train s mean |")
    print("|---|---|---|---|")
    for task in args.tasks.split(","):
        for dtype in ("float32", "bfloat16"):
            xs = [r for r in runs if r["task"] == task and r["dtype"] == dtype]
            s = [r["score"] for r in xs]
            t = statistics.mean(r["train_s"] for r in xs)
            print(f"| {task} | {dtype} | {statistics.mean(s):.3f} ({min(s):.3f}-{max(s):.3f}) "
                  f"| {t:.0f} |")  # fmt: skip
    if args.json:
        Path(args.json).write_text(json.dumps(runs, indent=1))


if __name__ == "__main__":
    main()
