"""Better prompts at the same budget (issue 14): vanilla prompt tuning vs the task-aware
defaults vs residual reparameterisation vs a 3-prompt ensemble, on the shipped
classification tasks, several seeds each, test accuracy and training time.

    python benchmarks/bench_prompts.py --json docs/bench-prompts.jsonl

Every run: the embedded Gemma 3 270M (``--dtype``), ``--steps`` optimizer steps of batch 8,
20 virtual tokens, lr 3e-2, validated once at the end; accuracy on the test split by the
argmax of the labels' log-likelihoods (the ensemble: majority vote of its members).
Results are appended one line per run, so a partial run still gives a table
(``--table FILE`` prints it from the JSONL alone).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

import tables  # noqa: E402  (benchmarks/tables.py)
from suite import run_folder  # noqa: E402  (benchmarks/suite.py: RUNS/TASK-sSEED)

from softprompt.config import DataConfig, ModelConfig, PromptConfig, TrainConfig  # noqa: E402
from softprompt.data import load_examples  # noqa: E402
from softprompt.loading import load_model  # noqa: E402
from softprompt.measure.ensemble import ensemble_classify  # noqa: E402
from softprompt.measure.metrics import accuracy  # noqa: E402
from softprompt.scoring import classify  # noqa: E402
from softprompt.training import train  # noqa: E402

TASKS = {  # name -> (folder, input field, target field, template)
    "sentiment": ("sentiment", "review", "label", "Review: {input}\nSentiment:"),
    "topics": ("topics", "message", "topic", "Message: {input}\nTopic:"),
}
VARIANTS = {  # name -> TrainConfig / PromptConfig settings
    "vanilla": {"init": "vocab", "choices": "none"},
    "defaults": {},
    "restricted": {"choice_loss": "restricted"},  # the defaults with the rest logit left out
    "residual": {"reparam": "residual"},
    "ensemble-3": {"ensemble": 3},
}


def run_one(loaded, task: str, variant: str, seed: int, args) -> dict:
    folder, field_in, field_out, template = TASKS[task]
    data = ROOT / "examples" / folder
    settings = dict(VARIANTS[variant])
    init = settings.pop("init", "auto")
    dcfg = DataConfig(
        data=str(data / "train.jsonl"),
        validation=str(data / "validation.jsonl"),
        input_field=field_in,
        target_field=field_out,
        template=template,
    )
    out = run_folder(args.runs, task, seed) / variant  # the suite's layout: RUNS/TASK-sSEED/METHOD
    cfg = TrainConfig(
        method="prompt",  # the variants change an input-layer prompt (init, ensemble, reparam)
        model=ModelConfig(model=args.model, dtype=args.dtype),
        data=dcfg,
        prompt=PromptConfig(num_virtual_tokens=20, init=init),
        output=str(out),
        max_steps=args.steps,
        batch_size=8,
        eval_every=args.steps,
        seed=seed,
        overwrite=True,
        **settings,
    )
    result = train(cfg, loaded=loaded, progress=False)
    test = load_examples(str(data / "test.jsonl"), dcfg)[: args.test_examples]
    labels = sorted({ex.target for ex in load_examples(dcfg.data, dcfg)})
    sources, gold = [ex.source for ex in test], [ex.target for ex in test]
    row = {"task": task, "variant": variant, "seed": seed, "steps": result.summary["steps"],
           "train_seconds": result.summary["train_seconds"],
           "best_val_loss": result.summary["best_val_loss"]}  # fmt: skip
    start = time.perf_counter()
    if result.prompts and variant.startswith("ensemble"):
        members = list(result.prompts.values())
        preds, _, each = ensemble_classify(
            loaded.model, loaded.tokenizer, members, sources, labels, batch_size=16
        )
        row["member_accuracy"] = [accuracy(gold, p) for p in each]
    else:
        preds, _ = classify(
            loaded.model, loaded.tokenizer, result.prompt, sources, labels, batch_size=16
        )
    row["test_accuracy"] = accuracy(gold, preds)
    row["test_seconds"] = round(time.perf_counter() - start, 1)
    return row


def table(rows: list[dict]) -> str:
    """Mean (min-max) over seeds per task and variant (benchmarks/tables.py)."""
    return tables.prompts_table(rows, list(TASKS), list(VARIANTS))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", default="docs/bench-prompts.jsonl", help="results, appended")
    parser.add_argument("--runs", default="runs/bench-prompts", help="folder for the runs")
    parser.add_argument("--model", default="embedded", help="base model")
    parser.add_argument("--dtype", default="bfloat16", help="float32 or bfloat16")
    parser.add_argument("--steps", type=int, default=64, help="optimizer steps per run")
    parser.add_argument("--seeds", default="0,1,2", help="comma-separated seeds")
    parser.add_argument("--tasks", default=",".join(TASKS), help="comma-separated tasks")
    parser.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated")
    parser.add_argument("--test-examples", type=int, default=None, help="first N test rows")
    parser.add_argument("--table", default=None, help="only print the table of this JSONL")
    args = parser.parse_args()
    if args.table:
        rows = [json.loads(x) for x in Path(args.table).read_text().splitlines() if x.strip()]
        print(table(rows))
        return
    loaded = load_model(ModelConfig(model=args.model, dtype=args.dtype))
    out = Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    rows = []
    for seed in [int(s) for s in args.seeds.split(",")]:  # every variant per seed first
        for task in args.tasks.split(","):
            for variant in args.variants.split(","):
                row = run_one(loaded, task, variant, seed, args)
                rows.append(row)
                with out.open("a", encoding="utf-8") as fh:
                    fh.write(json.dumps(row) + "\n")
                print(json.dumps(row), flush=True)
    print(table(rows))


if __name__ == "__main__":
    main()
