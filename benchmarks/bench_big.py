"""Big base models: sharded loading, activation checkpointing, a quantized base.

One command, every measurement in its own process (so each peak memory is its own):

    python benchmarks/bench_big.py                # the embedded Gemma 3 270M, ~15 min on 2 cores
    python benchmarks/bench_big.py --quick --model DIR --data-root DIR   # a smoke test

1. ``--shard-model``: the peak RSS of each of 2 processes (torchrun, gloo) against one
   process training the same steps (target: <= 0.6x). The peak covers the whole run, model
   loading included: the point of sharded loading is that no process ever holds it all.
2. ``--gradient-checkpointing``: the peak RSS of one forward and backward over rows of
   ``--length`` tokens (1,024) with and without it, and the part of it above the loaded
   model (the activations; target: <= 0.5x). The peak is reset after loading
   (``/proc/self/clear_refs``), so loading's own peak does not hide the step's.
3. ``--quantize int8`` vs a bfloat16 and a float32 base: peak RSS, mean step time and the
   held-out accuracy of a prompt trained for ``--steps`` steps on a task of the public suite
   (``--task``, from ``../shared/data``; skipped, saying why, where it is absent).

Run it alone on the machine: timings taken beside other jobs mean nothing.
"""

from __future__ import annotations

import argparse
import atexit
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MARK = "bench_big: "
TEMPLATE = "Review: {text}\nSentiment:"


def peak_mb() -> float:
    """This process's peak resident memory (VmHWM), in MB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def reset_peak() -> None:
    """Start the peak over from the current RSS (Linux: clear_refs 5)."""
    Path("/proc/self/clear_refs").write_text("5")


def rss_mb() -> float:
    import psutil

    return psutil.Process().memory_info().rss / 2**20


def sample_pss(every_s: float = 0.25) -> list[float]:
    """This process's proportional set size (PSS: memory shared with other processes, such
    as the pages of a weights file both map, split between them), sampled in a thread; the
    list holds the highest seen. The kernel keeps no peak of it, so a brief high between
    samples can be missed."""
    import threading

    import psutil

    seen = [0.0]

    def run() -> None:
        proc = psutil.Process()
        while True:
            seen[0] = max(seen[0], proc.memory_full_info().pss / 2**20)
            time.sleep(every_s)

    threading.Thread(target=run, daemon=True).start()
    return seen


def child(argv: list[str], launcher: list[str] | None = None) -> list[dict]:
    """Run ``bench_big.py --child ...`` (under ``launcher``, e.g. torchrun) and return the
    result lines it printed, one per process."""
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "2"))
    env.setdefault("PYTHONPATH", str(ROOT / "src"))
    cmd = [*(launcher or [sys.executable]), __file__, "--child", *argv]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    rows = [json.loads(x[len(MARK) :]) for x in proc.stdout.splitlines() if x.startswith(MARK)]
    if proc.returncode != 0 or not rows:
        tail = (proc.stderr.strip().splitlines() or ["(no message)"])[-1]
        raise SystemExit(f"bench_big: {' '.join(argv[:2])} failed: {tail}")
    return rows


# --- children ----------------------------------------------------------------------------


def say_atomically(row: dict) -> None:
    """The result line in one write: under torchrun every process shares the stdout pipe,
    and a write of less than PIPE_BUF bytes is never interleaved with another's."""
    sys.stdout.flush()
    os.write(sys.stdout.fileno(), (MARK + json.dumps(row) + "\n").encode())


def run_cli(args: list[str]) -> None:
    """`softprompt ARGS`, printing this process's peak RSS when it exits."""
    from softprompt.cli import main

    rank = int(os.environ.get("RANK", "0"))
    pss = sample_pss()
    atexit.register(lambda: say_atomically({"rank": rank, "peak_mb": peak_mb(),
                                            "peak_pss_mb": max(pss)}))  # fmt: skip
    code = main(args)
    if code:
        raise SystemExit(code)


def run_step(spec: dict) -> None:
    """One forward and backward over ``rows`` rows of ``length`` tokens, checkpointed or
    not: the peak above the loaded model."""
    import torch

    from softprompt.loading import load_model
    from softprompt.loss import lm_loss
    from softprompt.prompt import PromptSet, SoftPrompt
    from softprompt.rows import IGNORE_INDEX
    from softprompt.training.recompute import recomputing

    torch.manual_seed(0)
    loaded = load_model(model=spec["model"], dtype=spec["dtype"])
    tok, model = loaded.tokenizer, loaded.model
    text = " ".join(r["text"] for r in read_jsonl(Path(spec["data"])))
    ids = tok(text, add_special_tokens=False)["input_ids"]
    ids = (ids * (spec["length"] // max(len(ids), 1) + 1))[: spec["length"]]
    input_ids = torch.tensor([ids] * spec["rows"])
    labels = input_ids.clone()
    labels[:, : spec["length"] // 2] = IGNORE_INDEX  # the loss on the second half
    batch = {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids),
             "labels": labels, "task": torch.zeros(spec["rows"], dtype=torch.long)}  # fmt: skip
    prompts = PromptSet([""], [SoftPrompt(torch.randn(20, loaded.hidden_size) * 0.02)])
    loaded_mb = rss_mb()
    reset_peak()
    start = time.perf_counter()
    with recomputing(model, spec["checkpointing"]):
        loss, n = lm_loss(model, prompts, batch)
        (loss / n).backward()
    seconds = time.perf_counter() - start
    grad = next(prompts.parameters()).grad
    print(MARK + json.dumps({"loaded_mb": loaded_mb, "peak_mb": peak_mb(), "step_s": seconds,
                             "grad_norm": float(grad.norm())}))  # fmt: skip


def run_quant(spec: dict) -> None:
    """Train a prompt on a base in one precision, then its held-out accuracy."""
    from softprompt.config import DataConfig, EvalConfig, ModelConfig, PromptConfig, TrainConfig
    from softprompt.data import load_examples
    from softprompt.loading import load_model
    from softprompt.measure.evaluate import evaluate_examples
    from softprompt.training import train

    model = ModelConfig(model=spec["model"], dtype=spec["dtype"], quantize=spec["quantize"])
    data = DataConfig(data=spec["train"], validation=spec["validation"], input_field="text",
                      target_field="label", template=TEMPLATE)  # fmt: skip
    out = Path(spec["out"])
    cfg = TrainConfig(
        model=model,
        data=data,
        prompt=PromptConfig(num_virtual_tokens=20),
        output=str(out),
        max_steps=spec["steps"],
        batch_size=8,
        choices="negative,positive",
        overwrite=True,
        method="prompt",
    )  # the method the saved output measured
    loaded = load_model(model)
    result = train(cfg, loaded, progress=False)
    steps = [r["step_s"] for r in map(json.loads, (out / "metrics.jsonl").open())
             if r.get("kind") == "train"]  # fmt: skip
    ecfg = EvalConfig(data=data, batch_size=8, choices="negative,positive")
    tests = load_examples(spec["test"], data)
    scores, _ = evaluate_examples(loaded, result.prompt, tests, ecfg, ["negative", "positive"])
    print(MARK + json.dumps({"peak_mb": peak_mb(), "step_s": statistics.median(steps[1:] or steps),
                             "accuracy": scores["accuracy"]}))  # fmt: skip


def read_jsonl(path: Path, limit: int | None = None) -> list[dict]:
    rows = [json.loads(x) for x in path.read_text(encoding="utf-8").splitlines() if x.strip()]
    return rows[:limit]


def run_floor(spec: dict) -> None:
    """The peak RSS of a process that has imported what a training run imports (torch,
    transformers, accelerate, softprompt's training) and holds no model."""
    import softprompt.cli  # noqa: F401
    import softprompt.training.run  # noqa: F401

    print(MARK + json.dumps({"peak_mb": peak_mb()}))


# --- the three measurements --------------------------------------------------------------


def sharded(args, data: Path, tmp: Path) -> None:
    train = ["train", "--model", args.model, "--data", str(data), "--input-field", "text",
             "--target-field", "label", "--template", TEMPLATE, "--max-steps",
             str(args.shard_steps), "--batch-size", "4", "--val-fraction", "0", "--choices",
             "negative,positive", "--method", "prompt"]  # fmt: skip
    one = child(["cli", "--", *train, "--output", str(tmp / "one")])[0]
    torchrun = [str(Path(sys.executable).parent / "torchrun"), "--nproc_per_node", "2",
                "--master_port", str(29650 + os.getpid() % 300)]  # fmt: skip
    two = child(["cli", "--", *train, "--shard-model", "--output", str(tmp / "two")], torchrun)
    worst = max(r["peak_mb"] for r in two)
    print(f"\n## 1. --shard-model: peak RSS per process ({args.shard_steps} steps, model loading "
          "included)\n")  # fmt: skip
    print("| run | peak RSS per process (MB) | peak PSS, sampled (MB) |\n|---|---|---|")
    print(f"| 1 process | {one['peak_mb']:.0f} | {one['peak_pss_mb']:.0f} |")
    for r in sorted(two, key=lambda r: r["rank"]):
        print(f"| 2 processes --shard-model, rank {r['rank']} | {r['peak_mb']:.0f} | "
              f"{r['peak_pss_mb']:.0f} |")  # fmt: skip
    print(
        f"\nsharded / one process = {worst / one['peak_mb']:.2f}x (target <= 0.6x); in PSS "
        f"{max(r['peak_pss_mb'] for r in two) / one['peak_pss_mb']:.2f}x (RSS counts the "
        "pages of the weights file that both processes map in each; PSS splits them)"
    )
    layers, total = layer_share(args.model)
    mb = 4 / 2**20  # float32 weights
    held = (total - layers / 2) * mb  # what a sharded process holds: half the layers, the rest
    rest = worst - held
    best = rest + total * mb / 2
    print(f"the decoder layers hold {layers / total:.0%} of the {total / 1e6:.0f}M parameters; "
          "the embeddings and head stay whole on each process, so the weights alone can fall "
          f"to {1 - layers / total / 2:.2f}x at best with 2 processes")  # fmt: skip
    floor = child(["floor", "{}"])[0]["peak_mb"]
    print(f"a sharded process holds {held:.0f} MB of weights; the other {rest:.0f} MB of its "
          "peak (torch and transformers, the tokenizer, the process group, data, activations) "
          f"is not weights: with every weight split in two ({total * mb / 2:.0f} MB each) it "
          f"would peak near {best:.0f} MB, {best / one['peak_mb']:.2f}x. 2 processes reach "
          f"0.6x only where what is not weights fits in a quarter of the weights "
          f"({total * mb / 4:.0f} MB); a process that has only imported torch, transformers "
          f"and softprompt holds {floor:.0f} MB")  # fmt: skip


def layer_share(name: str) -> tuple[int, int]:
    """(parameters in the decoder layers, all parameters), counted on the meta device."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    from softprompt.config import ModelConfig
    from softprompt.loading import decoder_layers, model_source

    config = AutoConfig.from_pretrained(model_source(ModelConfig(model=name))[0])
    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(config)
    model.tie_weights()  # a tied head is the embedding matrix: counted once
    total = sum(p.numel() for p in model.parameters())
    return sum(p.numel() for p in decoder_layers(model).parameters()), total


def checkpointing(args, data: Path) -> None:
    res = {}
    for on in (False, True):
        spec = {"model": args.model, "dtype": args.dtype, "data": str(data), "rows": args.rows,
                "length": args.length, "checkpointing": on}  # fmt: skip
        res[on] = child(["step", json.dumps(spec)])[0]
    print(f"\n## 2. --gradient-checkpointing: one step over {args.rows} rows of {args.length} "
          f"tokens ({args.dtype})\n")  # fmt: skip
    print("| run | RSS loaded (MB) | peak RSS (MB) | above the loaded model (MB) | step (s) |")
    print("|---|---|---|---|---|")
    for on, r in res.items():
        name = "--gradient-checkpointing" if on else "plain"
        print(f"| {name} | {r['loaded_mb']:.0f} | {r['peak_mb']:.0f} | "
              f"{r['peak_mb'] - r['loaded_mb']:.0f} | {r['step_s']:.2f} |")  # fmt: skip
    act = [max(res[on]["peak_mb"] - res[on]["loaded_mb"], 1e-9) for on in (False, True)]
    same = abs(res[True]["grad_norm"] - res[False]["grad_norm"]) <= 1e-4 * res[False]["grad_norm"]
    print(f"\ncheckpointed / plain, above the model = {act[1] / act[0]:.2f}x (target <= 0.5x); "
          f"peak {res[True]['peak_mb'] / res[False]['peak_mb']:.2f}x; "
          f"the same gradient norm: {same}")  # fmt: skip


def quantized(args, tmp: Path) -> None:
    folder = Path(args.data_root) / args.task
    print(
        f"\n## 3. --quantize int8 vs bfloat16 vs float32 base ({args.task}, {args.steps} steps)\n"
    )
    if not (folder / "train.jsonl").is_file() or not (folder / "test.jsonl").is_file():
        print(f"skipped: no {folder}/train.jsonl and test.jsonl (the public suite's data lives "
              "in ../shared/data beside the repository; give --data-root)")  # fmt: skip
        return
    files = {}
    for split, limit in (("train", args.train_examples), ("validation", args.test_examples),
                         ("test", args.test_examples)):  # fmt: skip
        source = folder / f"{split}.jsonl"
        source = source if source.is_file() else folder / "test.jsonl"
        files[split] = tmp / f"{split}.jsonl"
        rows = read_jsonl(source, limit)
        files[split].write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    from softprompt.loading import resolve_dtype

    wanted = list(BASES) if args.bases == "all" else args.bases.split(",")
    unknown = set(wanted) - set(BASES)
    if unknown:
        names = ", ".join(sorted(unknown))
        raise SystemExit(f"--bases: no base named {names} (of {', '.join(BASES)})")
    bases = [BASES[b] for b in wanted]
    if args.bases == "all" and resolve_dtype("auto") != "bfloat16":
        bases = [b for b in bases if b[1] != "bfloat16"]
        print(
            "(the bfloat16 bases are left out: this machine has no native bf16 arithmetic, so "
            "bf16 is emulated, many times slower than float32; --bases to run them anyway)\n"
        )
    print("| base | peak RSS (MB) | step (s, median) | test accuracy |\n|---|---|---|---|")
    for name, dtype, quantize in bases:
        spec = {"model": args.model, "dtype": dtype, "quantize": quantize, "steps": args.steps,
                "out": str(tmp / f"q-{dtype}-{quantize}"),
                **{k: str(v) for k, v in files.items()}}  # fmt: skip
        r = child(["quant", json.dumps(spec)])[0]
        print(f"| {name} | {r['peak_mb']:.0f} | {r['step_s']:.3f} | {r['accuracy']:.3f} |",
              flush=True)  # fmt: skip


# --bases' names: (the table's name, the base's dtype, --quantize)
BASES = {"float32": ("float32", "float32", "none"), "bfloat16": ("bfloat16", "bfloat16", "none"),
         "int8": ("int8 (float32 activations)", "float32", "int8"),
         "int8-bf16": ("int8 (bfloat16 activations)", "bfloat16", "int8")}  # fmt: skip


def main() -> None:
    if len(sys.argv) > 2 and sys.argv[1] == "--child":
        what, rest = sys.argv[2], sys.argv[3:]
        if what == "cli":
            return run_cli(rest[1:] if rest[:1] == ["--"] else rest)
        return {"step": run_step, "quant": run_quant, "floor": run_floor}[what](json.loads(rest[0]))
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="embedded")
    p.add_argument("--dtype", default="float32", help="the checkpointing step's weights")
    p.add_argument("--quick", action="store_true", help="a smoke test: tiny sizes")
    p.add_argument("--task", default="cr")
    p.add_argument("--data-root", default=str(ROOT.parent / "shared" / "data"))
    p.add_argument("--rows", type=int, default=2, help="rows of the checkpointing step")
    p.add_argument("--length", type=int, default=1024, help="tokens per row of that step")
    p.add_argument("--steps", type=int, default=60, help="training steps per base precision")
    p.add_argument("--shard-steps", type=int, default=3)
    p.add_argument("--train-examples", type=int, default=480)
    p.add_argument("--test-examples", type=int, default=200)
    p.add_argument("--bases", default="all", help="part 3's bases, comma-separated, of "
                   f"{','.join(BASES)}; all: every one the hardware computes natively")  # fmt: skip
    args = p.parse_args()
    if args.quick:
        args.length, args.steps, args.shard_steps = 64, 2, 1
        args.train_examples, args.test_examples = 16, 8
    command = " ".join(["python benchmarks/bench_big.py", *sys.argv[1:]])
    print(
        f"# bench_big: {args.model}, {os.cpu_count()} CPUs, load average "
        f"{os.getloadavg()[0]:.2f} at the start (run it alone: timings beside other jobs mean "
        f"nothing), {time.strftime('%Y-%m-%d %H:%M')}: `{command}`"
    )
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(args.data_root) / args.task / "train.jsonl"
        if not data.is_file():  # the sentiment examples the project ships, for parts 1 and 2
            rows = read_jsonl(ROOT / "examples" / "sentiment" / "train.jsonl")
            data = Path(tmp) / "sentiment.jsonl"
            data.write_text("".join(json.dumps({"text": r["review"], "label": r["label"]}) + "\n"
                                    for r in rows), encoding="utf-8")  # fmt: skip
        sharded(args, data, Path(tmp))
        checkpointing(args, data)
        quantized(args, Path(tmp))


if __name__ == "__main__":
    main()
