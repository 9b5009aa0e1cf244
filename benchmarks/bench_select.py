"""Which step of a training run to keep: the prompt that validation chose (the step of the
best validation loss, what ``softprompt train`` keeps) against the prompt of the run's last
step, on the same held-out test rows. A question for the defaults: on small sets the
validation loss can favour an early step that generalizes worse than the last one.

    python benchmarks/bench_select.py runs/suite/cb-s2/defaults runs/suite/trec-s0/defaults

Each RUN is the folder of a decoder's classification ``softprompt train`` run of
``benchmarks/suite.py`` (``--runs``): its test rows are the ``data-METHOD/test.jsonl``
beside it, its labels those of its training and validation rows (as the suite scores them),
its last step's prompt the newest checkpoint's (``checkpoints/step-*``). Prints one row per
run: the chosen and the last step, test accuracy and macro-F1 of each, and the difference in
points.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from safetensors.torch import load_file, save_file  # noqa: E402

from softprompt.artifacts import ADAPTER_WEIGHTS, PROMPT_KEY, load_prompt  # noqa: E402
from softprompt.config import DataConfig, EvalConfig, ModelConfig  # noqa: E402
from softprompt.data import load_examples  # noqa: E402
from softprompt.loading import load_model  # noqa: E402
from softprompt.measure.evaluate import evaluate_examples  # noqa: E402


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text(encoding="utf-8").splitlines() if x.strip()]


def last_step_copy(run: Path, into: Path) -> tuple[Path, int, int]:
    """A copy of ``run``'s prompt folder holding its last checkpoint's prompt instead of the
    chosen one; (the copy, the chosen step, the last step)."""
    last = sorted((run / "checkpoints").glob("step-*"))[-1]
    state = json.loads((last / "state.json").read_text())["run"]
    into.mkdir(parents=True)
    for f in run.glob("*.json"):
        shutil.copy(f, into)
    tensors = load_file(str(run / ADAPTER_WEIGHTS))
    if set(tensors) != {PROMPT_KEY}:  # a classifier's head: the last step's is not read here
        raise SystemExit(
            f"bench_select: {run} saved more than a prompt ({', '.join(tensors)}); "
            "only decoder runs, whose prompt is the whole adapter, are supported"
        )
    tensors[PROMPT_KEY] = load_file(str(last / "tensors.safetensors"))["prompt"][0].contiguous()
    save_file(tensors, str(into / ADAPTER_WEIGHTS), metadata={"format": "pt"})
    return into, state["best_step"], state["step"]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", help="folders of suite training runs")
    args = parser.parse_args(argv)
    loaded_by_model: dict[str, object] = {}
    out = [
        "| run | chosen step | last step | accuracy chosen | accuracy last | macro-F1 chosen "
        "| macro-F1 last | last - chosen (accuracy) |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    with tempfile.TemporaryDirectory() as tmp:
        for n, name in enumerate(args.runs):
            run = Path(name)
            config = json.loads((run / "softprompt.json").read_text())
            logged = next(r for r in read_jsonl(run / "metrics.jsonl") if r["kind"] == "config")
            data = DataConfig(**{k: v for k, v in logged["config"]["data"].items()
                                 if k in DataConfig.__dataclass_fields__})  # fmt: skip
            folder = run.parent / f"data-{run.name}"
            seen = read_jsonl(folder / "train.jsonl") + read_jsonl(folder / "validation.jsonl")
            labels = sorted({r[data.target_field] for r in seen})
            model = (config.get("base_model") or {}).get("name") or "embedded"
            if model not in loaded_by_model:
                loaded_by_model[model] = load_model(ModelConfig(model=model), labels=labels)
            loaded = loaded_by_model[model]
            examples = load_examples(str(folder / "test.jsonl"), data)
            ecfg = EvalConfig(data=data, batch_size=8, choices=",".join(labels))
            copy, chosen_step, last_step = last_step_copy(run, Path(tmp) / str(n))
            got = []
            for where in (run, copy):
                prompt, _ = load_prompt(where, loaded.model)
                result, _ = evaluate_examples(loaded, prompt, examples, ecfg, labels)
                got.append(result)
            gap = 100 * (got[1]["accuracy"] - got[0]["accuracy"])
            row = (f"| {name} | {chosen_step} | {last_step} | {got[0]['accuracy']:.3f} "
                   f"| {got[1]['accuracy']:.3f} | {got[0]['macro_f1']:.3f} "
                   f"| {got[1]['macro_f1']:.3f} | {gap:+.1f} |")  # fmt: skip
            out.append(row)
            print(row, file=sys.stderr, flush=True)  # progress: each run as it is scored
    print("\n".join(out))


if __name__ == "__main__":
    main()
