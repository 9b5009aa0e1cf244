"""Training speed, memory and accuracy: PEFT's documented prompt-tuning recipe vs softprompt.

One command runs everything on the same machine, model, data, epochs, batch size and
number of virtual tokens, one variant after the other, each in its own process (so each
peak RSS is its own), and prints the ratios:

    python benchmarks/bench_train.py                 # full run, about 15 min on 2 cores
    python benchmarks/bench_train.py --quick         # 32 train / 32 test examples, 1 epoch

Variants:
- ``peft``: PEFT's causal-LM prompt-tuning recipe as documented (PromptTuningConfig with
  TEXT init, rows left-padded to max_length=64, labels -100 on the input, AdamW lr 3e-2,
  linear schedule, model(**batch).loss, evaluation each epoch).
- ``softprompt``: ``softprompt.train`` with its defaults (float32).
- ``softprompt-bf16``: the same with the frozen weights in bfloat16.
- ``softprompt-choices`` (and ``-bf16``): with ``--choices positive,negative``, softprompt's
  classification mode (loss over the label words at the answer position), which is what
  softprompt does by default when it is told the task has labels.
- ``softprompt-text``: softprompt's defaults but PEFT's own initialisation (the recipe's
  init text): the same recipe as ``peft``, so the ratio isolates the implementation.

Throughput is reported twice: over the whole training wall time (validation passes,
checkpoints and logging included) and over the optimizer steps alone (the sum of the
``step_s`` that metrics.jsonl records), which is what the matmul-peak target is about.
Memory: RSS before loading, after loading the model and tokenizer, and at the peak, next
to the bytes of the fp32 weights.

Test accuracy: for each test review, the label whose tokens get the higher log-likelihood
after the template. Every prompt is scored by the same function in float32 (softprompt
and PEFT give identical logits for the same prompt: tests/test_artifacts.py).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from levers import DATA, read  # benchmarks/levers.py (this folder is the script's path)
from tables import run_facts  # benchmarks/tables.py

ROOT = Path(__file__).resolve().parents[1]
TEMPLATE = "Review: {input}\nSentiment:"
INIT_TEXT = "Classify if the review is positive or negative:"
CHOICES = ["positive", "negative"]
PEFT_MAX_LENGTH = 64


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def rss_mb() -> float:
    """Resident memory now (the weights are memory-mapped: they count once touched)."""
    import psutil

    return psutil.Process().memory_info().rss / 2**20


# --- scoring (shared by every variant) ----------------------------------------------------


@torch.no_grad()
def accuracy(model, tok, prompt_embedding: torch.Tensor, test: list[dict]) -> float:
    """Share of test reviews whose true label has the higher summed log-likelihood, scored
    by softprompt's own `classify` (the one `softprompt eval` uses) in float32."""
    from softprompt.prompt import SoftPrompt
    from softprompt.scoring import classify

    sources = [TEMPLATE.format(input=r["review"]) for r in test]
    pred, _ = classify(
        model.float(), tok, SoftPrompt(prompt_embedding.float()), sources, CHOICES, batch_size=16
    )
    return sum(p == r["label"] for p, r in zip(pred, test)) / len(test)


# --- variant: PEFT's documented recipe ------------------------------------------------------


def peft_rows(tok, rows: list[dict]) -> dict[str, torch.Tensor]:
    """The PEFT docs' preprocessing: input + target ids, left-padded to max_length."""
    ids, masks, labels = [], [], []
    for r in rows:
        src = tok(TEMPLATE.format(input=r["review"]))["input_ids"]
        tgt = tok(" " + r["label"], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        x, y = (src + tgt)[:PEFT_MAX_LENGTH], ([-100] * len(src) + tgt)[:PEFT_MAX_LENGTH]
        pad = PEFT_MAX_LENGTH - len(x)
        ids.append([tok.pad_token_id] * pad + x)
        masks.append([0] * pad + [1] * len(x))
        labels.append([-100] * pad + y)
    return {
        k: torch.tensor(v)
        for k, v in {"input_ids": ids, "attention_mask": masks, "labels": labels}.items()
    }


def run_peft(args, loaded, train_rows, val_rows) -> dict:
    from peft import PromptTuningConfig, PromptTuningInit, TaskType, get_peft_model
    from transformers import get_linear_schedule_with_warmup

    tok_path = loaded.model.name_or_path  # the folder the model (and tokenizer) came from
    cfg = PromptTuningConfig(
        task_type=TaskType.CAUSAL_LM,
        prompt_tuning_init=PromptTuningInit.TEXT,
        num_virtual_tokens=args.virtual_tokens,
        prompt_tuning_init_text=INIT_TEXT,
        tokenizer_name_or_path=tok_path,
    )
    model = get_peft_model(loaded.model, cfg)
    data, val = peft_rows(loaded.tokenizer, train_rows), peft_rows(loaded.tokenizer, val_rows)
    n = len(train_rows)
    steps = math.ceil(n / args.batch_size) * args.epochs
    opt = torch.optim.AdamW(model.parameters(), lr=3e-2)
    sched = get_linear_schedule_with_warmup(opt, 0, steps)
    gen = torch.Generator().manual_seed(0)
    start, tokens, first = time.perf_counter(), 0, None
    for _ in range(args.epochs):
        model.train()
        for idx in torch.randperm(n, generator=gen).split(args.batch_size):
            batch = {k: v[idx] for k, v in data.items()}
            loss = model(**batch).loss
            loss.backward()
            opt.step()
            sched.step()
            opt.zero_grad()
            tokens += batch["input_ids"].numel() + len(idx) * args.virtual_tokens
            first = first or time.perf_counter() - start
        model.eval()
        with torch.no_grad():  # the docs' per-epoch evaluation
            for idx in torch.arange(len(val_rows)).split(args.batch_size):
                model(**{k: v[idx] for k, v in val.items()})
    wall = time.perf_counter() - start
    embedding = model.prompt_encoder["default"].embedding.weight.detach().clone()
    return {"wall_s": wall, "tokens": tokens, "prompt": embedding, "steps": steps}


# --- variant: softprompt ----------------------------------------------------------------------


def run_softprompt(args, loaded, train_rows, val_rows, dtype: str) -> dict:
    from softprompt import DataConfig, ModelConfig, TrainConfig, train

    tmp = Path(tempfile.mkdtemp(prefix="bench-sp-"))
    for name, rows in (("train", train_rows), ("val", val_rows)):
        (tmp / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = TrainConfig(
        model=ModelConfig(model=args.model, dtype=dtype),
        data=DataConfig(
            data=str(tmp / "train.jsonl"),
            validation=str(tmp / "val.jsonl"),
            input_field="review",
            target_field="label",
            template=TEMPLATE,
        ),
        output=str(tmp / "run"),
        epochs=args.epochs,
        batch_size=args.batch_size,
        method="prompt",  # PEFT's recipe is an input-layer prompt: the same method on both sides
    )
    cfg.prompt.num_virtual_tokens = args.virtual_tokens
    if "text" in args.run:  # the PEFT recipe's initialisation
        cfg.prompt.init, cfg.prompt.init_text = "text", INIT_TEXT
    if "choices" in args.run:  # softprompt's classification mode (its default for labels)
        cfg.choices = ",".join(CHOICES)
    result = train(cfg, loaded=loaded, progress=False)
    records = [json.loads(x) for x in (tmp / "run" / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if r["kind"] == "train"]
    return {
        "wall_s": result.summary["train_seconds"],
        "step_s": sum(r["step_s"] for r in steps),
        "rss_first_step_mb": steps[0]["rss_mb"],  # weights touched, tokenizer, first batch
        "tokens": result.summary["tokens"],
        "prompt": result.prompt.embedding.detach().clone(),
        "steps": len(steps),
    }


def run_variant(args) -> None:
    """Child process: train one variant, score it, print one JSON line."""
    from softprompt import load_model

    torch.manual_seed(0)
    t0 = time.perf_counter()
    dtype = "bfloat16" if args.run.endswith("bf16") else "float32"
    rss_start = rss_mb()
    loaded = load_model(model=args.model, dtype=dtype)
    rss_loaded = rss_mb()
    train_rows, test_rows = read("train", args.train_examples), read("test", args.test_examples)
    val_rows = read("validation", args.val_examples)
    if args.run == "peft":
        out = run_peft(args, loaded, train_rows, val_rows)
    else:
        out = run_softprompt(args, loaded, train_rows, val_rows, dtype)
    rss = peak_rss_mb()  # before scoring, which is the same for every variant
    from levers import nonembedding_params

    out["nonembedding_params"] = nonembedding_params(loaded.model)
    acc = accuracy(loaded.model, loaded.tokenizer, out.pop("prompt"), test_rows)
    weights = sum(p.numel() for p in loaded.model.parameters()) * 4 / 2**20  # fp32 bytes
    out.update(
        variant=args.run,
        rss_start_mb=rss_start,
        rss_loaded_mb=rss_loaded,
        fp32_weights_mb=weights,
        peak_rss_mb=rss,
        test_accuracy=acc,
        total_s=time.perf_counter() - t0,
        tokens_per_s=out["tokens"] / out["wall_s"],
    )
    print("RESULT " + json.dumps(out), flush=True)


# --- the parent: peak, levers, variants, ratios ----------------------------------------------


def matmul_peak(dtype: torch.dtype, n: int = 2048, seconds: float = 2.0) -> float:
    """GFLOP/s of a large square matmul: this machine's practical peak for ``dtype``."""
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    a @ b
    count, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        a @ b
        count += 1
    return 2 * n**3 * count / (time.perf_counter() - start) / 1e9


def _peaks() -> dict[str, float]:
    """The matmul peak of float32 and bfloat16. Where bf16 is emulated (no AVX-512 BF16 or
    AMX: --dtype auto picks float32) one 2048-wide bf16 matmul takes tens of seconds, so
    its peak is measured 512 wide."""
    from softprompt.loading import resolve_dtype

    native = resolve_dtype("auto") == "bfloat16"
    return {"float32": matmul_peak(torch.float32),
            "bfloat16": matmul_peak(torch.bfloat16, n=2048 if native else 512)}  # fmt: skip


def child(args, what: list[str]) -> dict | None:
    cmd = [
        sys.executable,
        __file__,
        *what,
        "--model",
        args.model,
        "--train-examples",
        str(args.train_examples),
        "--test-examples",
        str(args.test_examples),
        "--val-examples",
        str(args.val_examples),
        "--epochs",
        str(args.epochs),
        "--batch-size",
        str(args.batch_size),
        "--virtual-tokens",
        str(args.virtual_tokens),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=os.environ)
    lines = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
    for line in proc.stdout.splitlines():
        if not line.startswith("RESULT "):
            print(line, flush=True)
    if proc.returncode or not lines:
        print(proc.stdout[-3000:], proc.stderr[-3000:], file=sys.stderr)
        return None
    return json.loads(lines[-1][len("RESULT ") :])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="embedded")
    p.add_argument("--train-examples", type=int, default=250)
    p.add_argument("--test-examples", type=int, default=200)
    p.add_argument("--val-examples", type=int, default=50)
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--virtual-tokens", type=int, default=20)
    p.add_argument(
        "--variants",
        default="peft,softprompt,softprompt-text,softprompt-choices,softprompt-bf16,softprompt-choices-bf16",
    )
    p.add_argument("--skip-levers", action="store_true")
    p.add_argument("--skip-cold-start", action="store_true")
    p.add_argument("--quick", action="store_true", help="32/32 examples, 1 epoch: a smoke run")
    p.add_argument("--json", help="also write all results to this file")
    p.add_argument("--peaks", action="store_true",
                   help="only print this machine's float32 and bfloat16 matmul peaks")  # fmt: skip
    p.add_argument("--run", help=argparse.SUPPRESS)
    p.add_argument("--levers", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.quick:
        args.train_examples, args.test_examples, args.val_examples, args.epochs = 32, 32, 8, 1
    if args.run:
        return run_variant(args)
    if args.levers:
        from levers import run_levers  # benchmarks/levers.py

        return print(run_levers(args) or "", end="")
    report(args)


def cold_start(args) -> dict:
    """Seconds from `softprompt train` to its first finished step: with an empty model cache
    (the GGUF is converted first) and then with the cache warm."""
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        for label, cache in (("empty cache", str(Path(tmp) / "cache")), ("warm cache", None)):
            env = dict(os.environ)
            if cache:
                env["SOFTPROMPT_CACHE"] = cache
            run_dir = Path(tmp) / label.replace(" ", "-")
            cmd = [
                sys.executable,
                "-m",
                "softprompt",
                "train",
                "--data",
                str(DATA / "train.jsonl"),
                "--input-field",
                "review",
                "--target-field",
                "label",
                "--template",
                TEMPLATE,
                "--max-steps",
                "1",
                "--val-fraction",
                "0",
                "--model",
                args.model,
                "--output",
                str(run_dir),
            ]
            start = time.perf_counter()
            subprocess.run(cmd, env=env, capture_output=True, check=True)
            meta = json.loads((run_dir / "softprompt.json").read_text())
            out[label] = {
                "first_step_s": meta["metrics"]["first_step_s"],
                "command_s": time.perf_counter() - start,
            }
            print(
                f"  cold start, {label}: first step after {out[label]['first_step_s']:.1f} s",
                flush=True,
            )
    return out


def report(args) -> None:
    print(
        f"machine: {os.cpu_count()} cores, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads",
        flush=True,
    )
    peaks = _peaks()
    print("matmul peak: " + ", ".join(f"{k} {v:.0f} GFLOP/s" for k, v in peaks.items()),
          flush=True)  # fmt: skip
    if args.peaks:
        return
    results = {"peaks_gflops": peaks, "config": vars(args), "run": run_facts()}
    if not args.skip_levers:
        results["levers"] = child(args, ["--levers"])
    if not (args.quick or args.skip_cold_start):
        results["cold_start"] = cold_start(args)
    for variant in args.variants.split(","):
        print(f"running {variant} ...", flush=True)
        results[variant] = child(args, ["--run", variant])
        r = results[variant]  # every value is in --json; the table below has the rest
        print(f"  {variant}: {r['wall_s']:.1f} s, peak {r.get('peak_rss_mb', 0):.0f} MB, test "
              f"accuracy {r.get('test_accuracy', float('nan')):.3f}", flush=True)  # fmt: skip
    # The machine's speed drifts (shared hosts): measure the peak again and keep the higher
    # one, so the %-of-peak figures are never flattered by a slow moment at the start.
    end = _peaks()
    print("matmul peak at the end: " + ", ".join(f"{k} {v:.0f} GFLOP/s" for k, v in end.items())
          + " (the higher of start and end is used)", flush=True)  # fmt: skip
    results["peaks_gflops_end"] = end
    peaks = {k: max(v, end[k]) for k, v in peaks.items()}
    print_table(results, peaks)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))


def print_table(results: dict, peaks: dict) -> None:
    rows = [(k, v) for k, v in results.items() if isinstance(v, dict) and "variant" in v]
    print("\n| variant | train wall s | steps s | tokens/s | peak RSS MB | test accuracy |")
    print("| --- | --- | --- | --- | --- | --- |")
    for name, r in rows:
        steps = f"{r['step_s']:.1f}" if "step_s" in r else "-"
        print(
            f"| {name} | {r['wall_s']:.1f} | {steps} | {r['tokens_per_s']:.0f} | "
            f"{r['peak_rss_mb']:.0f} | {r['test_accuracy']:.3f} |"
        )
    base = results.get("peft")
    for name, r in rows:
        if base and name != "peft":
            print(
                f"{name}: PEFT recipe / {name} wall time = {base['wall_s'] / r['wall_s']:.2f}x; "
                f"accuracy {r['test_accuracy']:.3f} vs PEFT {base['test_accuracy']:.3f}"
            )
    for name, r in rows:
        params = r["nonembedding_params"]
        dtype = "bfloat16" if name.endswith("bf16") else "float32"
        work = 4 * params * r["tokens"] / 1e9  # GFLOP of body work, 4N per processed token
        line = (
            f"{name}: {work / r['wall_s']:.0f} GFLOP/s over the wall time = "
            f"{work / r['wall_s'] / peaks[dtype]:.0%} of the {dtype} matmul peak"
        )
        if "step_s" in r:
            line += (
                f"; over the optimizer steps alone {work / r['step_s']:.0f} GFLOP/s = "
                f"{work / r['step_s'] / peaks[dtype]:.0%}"
            )
        print(line + f" (4 x {params / 1e6:.0f}M FLOPs per processed token)")
    for name, r in rows:
        first = r.get("rss_first_step_mb")
        at_first = f", {first:.0f} MB after the first step" if first else ""
        print(
            f"{name} memory: {r['rss_start_mb']:.0f} MB before loading, "
            f"{r['rss_loaded_mb']:.0f} MB with model and tokenizer loaded (weights mapped, "
            f"not yet read){at_first}, peak {r['peak_rss_mb']:.0f} MB; fp32 weights "
            f"{r['fp32_weights_mb']:.0f} MB (peak = {r['peak_rss_mb'] / r['fp32_weights_mb']:.2f}x "
            "the weights)"
        )


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).parent))
    main()
