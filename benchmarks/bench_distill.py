"""A long prompt compiled into a few virtual tokens (``softprompt distill``), measured against
the long prompt itself, a prompt tuned on the labels, and the bare model, in one run:

    python benchmarks/bench_distill.py                       # cr and support, the bundled models
    python benchmarks/bench_distill.py --tasks cr --seeds 0,1,2
    python benchmarks/bench_distill.py --quick --model DIR   # a smoke run (tiny model)

Tasks:
- ``cr``, ``trec``, ``mpqa`` (../shared/data, public; skipped, saying why, where absent): the
  teacher is the embedded Gemma 3 270M with a 16-shot prompt (as many per label as fit, from
  the training set, in the task's template, e.g. ``Review: {input}\\nSentiment:``); inputs
  are further training rows, no labels used; held out: the first test rows;
- ``support`` (examples/support, shipped): the teacher is the bundled SmolLM2-135M-Instruct
  with the task's system message (its README); inputs are the training conversations'
  user turns; held out: the test conversations.

Rows per task and seed, all on the same held-out inputs: the bare model (the student's
input, no prompt), the teacher (the long prompt), a prompt tuned on the inputs' labels
(``softprompt train``, the same steps), and the distilled prompt (``softprompt distill``,
no labels). Columns: the task metric (exact match of the answer's first line with the gold
answer), agreement with the teacher (answers, tokens reproduced, KL per token), prefill
tokens and time to first token (ms per input, batches of 8, compiled prefix). Targets (the
issue): >= 90 % answer agreement, <= 1 point of the teacher's metric lost, >= 10x fewer
prefill tokens, >= 3x faster first token. Rows are appended to ``--json``. Run it alone:
time to first token is a timing.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import random
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "benchmarks"))

from tables import distill_table, run_facts  # noqa: E402

from softprompt import distill as d  # noqa: E402
from softprompt.artifacts import load_prompt, trained_choices  # noqa: E402
from softprompt.config import (  # noqa: E402
    EMBEDDED_CHAT_MODEL,
    EMBEDDED_MODEL,
    DataConfig,
    DistillConfig,
    GenerateConfig,
    ModelConfig,
    PromptConfig,
    TrainConfig,
)
from softprompt.loading import load_model  # noqa: E402
from softprompt.measure.evaluate import environment  # noqa: E402
from softprompt.training import train  # noqa: E402

DATA_ROOT = ROOT.parent / "shared" / "data"
SUPPORT = ROOT / "examples" / "support"
SYSTEM = (
    'Reply with one line of JSON and nothing else: {"topic": T, "sentiment": S} where T is one '
    "of battery, screen, delivery, price, support and S is positive or negative."
)
TEMPLATE = "Review: {input}\nSentiment:"
DISTILLED = {"prompt": "distilled", "prefix": "distilled (deep)"}  # the rows' names


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text(encoding="utf-8").splitlines() if x.strip()]


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


# classification sets of ../shared/data: the teacher's 16 shots and the template
SHOT_TASKS = {"cr": "Review: {input}\nSentiment:", "trec": "Question: {input}\nType:",
              "mpqa": "Phrase: {input}\nSentiment:"}  # fmt: skip


def shot_files(args, seed: int, folder: Path, name: str) -> dict:
    """16 shots (as many per label as fit, the rest drawn at random), the distillation
    inputs (further training rows, their labels unused) and the held-out test rows."""
    train = read_jsonl(Path(args.data_root) / name / "train.jsonl")
    random.Random(seed).shuffle(train)
    labels = sorted({r["label"] for r in train})
    shots = [
        r
        for label in labels
        for r in [x for x in train if x["label"] == label][: 16 // len(labels)]
    ]
    used = {id(r) for r in shots}
    shots += [r for r in train if id(r) not in used][: 16 - len(shots)]
    random.Random(seed + 1).shuffle(shots)
    used = {id(r) for r in shots}
    inputs = [r for r in train if id(r) not in used][: args.inputs]
    held = read_jsonl(Path(args.data_root) / name / "test.jsonl")[: args.held_out]
    return {
        "model": args.model or EMBEDDED_MODEL,
        "data": DataConfig(data=str(write_jsonl(folder / "inputs.jsonl", inputs)),
                           input_field="text", target_field="label", template=SHOT_TASKS[name]),
        "teacher": {"shots": str(write_jsonl(folder / "shots.jsonl", shots))},
        "held_out": write_jsonl(folder / "held.jsonl", held),
        "new_tokens": 3,
    }  # fmt: skip


def support_files(args, seed: int, folder: Path) -> dict:
    (folder / "system.txt").write_text(SYSTEM, encoding="utf-8")
    inputs = read_jsonl(SUPPORT / "train.jsonl")[: args.inputs]
    held = read_jsonl(SUPPORT / "test.jsonl")[: args.held_out]
    return {
        "model": args.model or EMBEDDED_CHAT_MODEL,
        "data": DataConfig(data=str(write_jsonl(folder / "inputs.jsonl", inputs)),
                           prompt_position="before-user"),
        "teacher": {"teacher_system": str(folder / "system.txt")},
        "held_out": write_jsonl(folder / "held.jsonl", held),
        "new_tokens": 24,
    }  # fmt: skip


TASKS = {**{name: lambda a, s, f, n=name: shot_files(a, s, f, n) for name in SHOT_TASKS},
         "support": support_files}  # fmt: skip


def run_task(args, name: str, seed: int) -> list[dict]:
    folder = Path(tempfile.mkdtemp(prefix=f"bench-distill-{name}-"))
    spec = TASKS[name](args, seed, folder)
    loaded = load_model(ModelConfig(model=spec["model"]))
    common = dict(model=ModelConfig(model=spec["model"]), seed=seed, batch_size=8,
                  prompt=PromptConfig(num_virtual_tokens=args.tokens),
                  max_steps=args.steps, lr=args.lr)  # fmt: skip
    cfg = DistillConfig(data=spec["data"], output=str(folder / "distilled"),
                        teacher_max_new_tokens=spec["new_tokens"], agreement_inputs=0,
                        **spec["teacher"], **common)  # fmt: skip
    distilled = {}  # method -> (result, seconds)
    for method in args.methods.split(","):
        started = time.perf_counter()
        out = str(folder / f"distilled-{method}")
        result = d.distill(dataclasses.replace(cfg, method=method, output=out), loaded,
                           progress=False)  # fmt: skip
        distilled[method] = result, time.perf_counter() - started
    started = time.perf_counter()
    tuned = train(
        TrainConfig(data=spec["data"], output=str(folder / "tuned"), method="prompt", **common),
        loaded,
        progress=False,
    )  # an input-layer prompt, as distilled
    tuned_s = time.perf_counter() - started
    teacher = d.teacher_from_config(cfg)
    held = d.read_inputs(str(spec["held_out"]), spec["data"], teacher)
    fmt = d.student_format(cfg, held)
    gen = GenerateConfig(max_new_tokens=spec["new_tokens"])
    side = d.teacher_side(loaded, fmt, teacher, held, gen, 8, cfg.teacher_top_k)
    rows = []
    tuned_prompt, tuned_meta = load_prompt(folder / "tuned", loaded.model)
    variants = [  # the tuned prompt answers as `generate` answers for it (with its labels)
        ("bare model", None, None, None),
        ("tuned on labels", tuned_prompt, tuned_s, trained_choices(tuned_meta)),
    ] + [
        (DISTILLED[method], load_prompt(result.output, loaded.model)[0], seconds, None)
        for method, (result, seconds) in distilled.items()
    ]
    for label, prompt, seconds, labels in variants:
        report = d.agreement(loaded, prompt, fmt, teacher, held, gen, 8, cfg.teacher_top_k, side,
                             labels)  # fmt: skip
        report.pop("answers")
        run = next((r for m, (r, _) in distilled.items() if DISTILLED[m] == label), tuned)
        rows.append({"task": name, "seed": seed, "variant": label, "train_s": seconds,
                     "steps": run.summary["steps"] if prompt is not None else 0,
                     **report})  # fmt: skip
        print(f"bench_distill {name} seed {seed} {label}: {d.describe(report)}", flush=True)
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None, help="base model (default: each task's)")
    parser.add_argument("--data-root", default=str(DATA_ROOT), help="the public data sets")
    parser.add_argument("--tasks", default="cr,support", help="comma-separated: cr, support")
    parser.add_argument("--seeds", default="0", help="comma-separated seeds")
    parser.add_argument("--inputs", type=int, default=128, help="distillation inputs")
    parser.add_argument("--held-out", type=int, default=100, help="held-out inputs")
    parser.add_argument("--methods", default="prompt,prefix",
                        help="distilled prompts, comma-separated: prompt (input layer), prefix "
                        "(deep: every layer)")  # fmt: skip
    parser.add_argument("--tokens", type=int, default=20, help="virtual tokens")
    parser.add_argument("--steps", type=int, default=None, help="steps (default: 3 epochs)")
    parser.add_argument("--lr", type=float, default=None, help="both prompts' (default: distill's)")
    parser.add_argument("--json", default="docs/distill/bench-distill.jsonl", help="appended")
    parser.add_argument("--quick", action="store_true", help="a smoke run: tiny budgets")
    parser.add_argument("--table", default=None, help="only print the table of this JSONL")
    args = parser.parse_args(argv)
    if args.table:
        rows = [json.loads(x) for x in Path(args.table).read_text().splitlines() if x.strip()]
        print(distill_table([r for r in rows if r.get("kind") != "run"]))
        return
    if set(args.methods.split(",")) - set(DISTILLED) or not args.methods:
        parser.error(f"--methods takes {', '.join(DISTILLED)}, comma-separated")
    if args.quick:
        args.inputs, args.held_out, args.steps, args.tokens = 16, 4, 2, 4
    tasks = [t for t in args.tasks.split(",") if t]
    for name in [t for t in tasks if t in SHOT_TASKS]:
        if not (Path(args.data_root) / name / "train.jsonl").is_file():
            where = Path(args.data_root) / name
            print(f"bench_distill: skipping {name}: no {where} (the public data sets live in "
                  "../shared/data beside the repository)", flush=True)  # fmt: skip
            tasks.remove(name)
    out = Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    header = {"kind": "run", **run_facts(), "command": " ".join(sys.argv),
              **environment()}  # fmt: skip
    rows = []
    with out.open("a", encoding="utf-8") as fh:
        fh.write(json.dumps(header) + "\n")
    for name in tasks:
        for seed in [int(s) for s in args.seeds.split(",")]:
            new = run_task(args, name, seed)
            rows += new
            with out.open("a", encoding="utf-8") as fh:
                fh.writelines(json.dumps(r) + "\n" for r in new)
    print(distill_table(rows))


if __name__ == "__main__":
    main()
