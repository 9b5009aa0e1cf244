"""Step time and peak memory of a deep prompt (--method prefix) against the input-layer
prompt (--method prompt) and PEFT's prefix-tuning recipe, on the same model, rows, batch size
and number of virtual tokens, each variant in its own process (so each peak RSS is its own):

    python benchmarks/bench_prefix.py                  # embedded Gemma 3 270M, cr rows
    python benchmarks/bench_prefix.py --quick --model DIR   # a smoke run (tiny model)

Variants (one optimizer step = loss, backward, AdamW):
- ``prompt``: softprompt's training step with an input-layer prompt (the prompt runs once
  per batch as a shared prefix; the LM head only at the answer positions);
- ``prefix``: the same step with a deep prompt (keys/values per layer read from the cache:
  nothing of the prefix runs);
- ``peft-prefix``: PEFT's PrefixTuningConfig as documented (no projection), rows
  left-padded, labels -100 on the input, ``model(**batch).loss`` (the whole vocabulary at
  every position).

Rows: the first ``--rows`` training rows of ../shared/data/cr (the shipped sentiment set
where that is absent), template ``Review: {input}\\nSentiment:``, the label as target.
Prints the mean seconds per step over ``--steps`` steps after one warm-up step, peak RSS
above the loaded model, and the ratios to ``prefix``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

import torch  # noqa: E402

from softprompt.config import PromptConfig  # noqa: E402
from softprompt.data import Example  # noqa: E402
from softprompt.loading import load_model  # noqa: E402
from softprompt.prefix import deepen  # noqa: E402
from softprompt.prompt import PromptSet, init_prompt  # noqa: E402
from softprompt.rows import tokenize  # noqa: E402

DATA = ROOT.parent / "shared" / "data" / "cr" / "train.jsonl"
SHIPPED = ROOT / "examples" / "sentiment" / "train.jsonl"
TEMPLATE = "Review: {input}\nSentiment:"
VARIANTS = ["prompt", "prefix", "peft-prefix"]


def rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def read_rows(n: int) -> tuple[list[tuple[str, str]], str]:
    path = DATA if DATA.is_file() else SHIPPED
    fields = ("text", "label") if path == DATA else ("review", "label")
    out = []
    for line in path.read_text(encoding="utf-8").splitlines()[:n]:
        rec = json.loads(line)
        out.append((str(rec[fields[0]])[:600], str(rec[fields[1]])))
    return out, str(path)


def batches(pairs, batch_size: int):
    return [pairs[i : i + batch_size] for i in range(0, len(pairs), batch_size)]


def run_ours(args, method: str) -> dict:
    loaded = load_model(model=args.model)
    base = rss_mb()
    model, tok = loaded.model, loaded.tokenizer
    pairs, _ = read_rows(args.rows)
    start = init_prompt(model, tok, PromptConfig(args.tokens, init="vocab"), seed=0)
    prompt = deepen(model, start) if method == "prefix" else start
    prompts = PromptSet([""], [prompt])
    opt = torch.optim.AdamW(prompts.parameters(), lr=3e-2)
    examples = [Example(TEMPLATE.replace("{input}", s), t, "bench") for s, t in pairs]
    rows = tokenize(examples, tok, 256, " ")
    groups = batches(rows, args.batch_size)
    times = []
    for i in range(args.steps + 1):
        t0 = time.perf_counter()
        loss, n, _ = loaded.kind.rows_loss(model, prompts, groups[i % len(groups)],
                                           tok.pad_token_id, torch.device("cpu"))  # fmt: skip
        (loss / n).backward()
        opt.step()
        opt.zero_grad()
        if i:  # the first step warms up
            times.append(time.perf_counter() - t0)
    return {"step_s": sum(times) / len(times), "peak_above_model_mb": rss_mb() - base}


def run_peft(args) -> dict:
    from peft import PrefixTuningConfig, TaskType, get_peft_model

    loaded = load_model(model=args.model)
    base = rss_mb()
    model, tok = loaded.model, loaded.tokenizer
    pairs, _ = read_rows(args.rows)
    peft_model = get_peft_model(
        model, PrefixTuningConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=args.tokens)
    )
    opt = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=3e-2)
    pad = tok.pad_token_id
    times = []
    groups = batches(pairs, args.batch_size)
    for i in range(args.steps + 1):
        ids, labels = [], []
        for s, t in groups[i % len(groups)]:
            src = tok(TEMPLATE.replace("{input}", s))["input_ids"]
            tgt = tok(" " + t, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
            ids.append(src + tgt)
            labels.append([-100] * len(src) + tgt)
        width = max(len(x) for x in ids)  # left-padded, as PEFT's examples do
        batch = {
            "input_ids": torch.tensor([[pad] * (width - len(x)) + x for x in ids]),
            "attention_mask": torch.tensor([[0] * (width - len(x)) + [1] * len(x) for x in ids]),
            "labels": torch.tensor([[-100] * (width - len(x)) + y for x, y in zip(ids, labels)]),
        }
        t0 = time.perf_counter()
        peft_model(**batch).loss.backward()
        opt.step()
        opt.zero_grad()
        if i:
            times.append(time.perf_counter() - t0)
    return {"step_s": sum(times) / len(times), "peak_above_model_mb": rss_mb() - base}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="embedded")
    parser.add_argument("--rows", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=20, help="virtual tokens")
    parser.add_argument("--steps", type=int, default=6, help="timed steps after a warm-up")
    parser.add_argument("--quick", action="store_true", help="2 timed steps of 4 rows")
    parser.add_argument("--json", default=None, help="append the results here")
    parser.add_argument("--one", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.quick:
        args.rows, args.batch_size, args.steps = 8, 4, 2
    if args.one:
        result = run_peft(args) if args.one == "peft-prefix" else run_ours(args, args.one)
        print("BENCH-ROW " + json.dumps(result), flush=True)
        return
    _, source = read_rows(1)
    rows = {}
    for name in VARIANTS:
        cmd = [sys.executable, __file__, *(argv if argv is not None else sys.argv[1:]),
               "--one", name]  # fmt: skip
        proc = subprocess.run(cmd, capture_output=True, text=True)
        line = next((x for x in proc.stdout.splitlines() if x.startswith("BENCH-ROW ")), None)
        if line is None:
            print(f"{name}: failed\n{proc.stderr[-2000:]}", flush=True)
            continue
        rows[name] = json.loads(line[len("BENCH-ROW ") :])
        print(f"{name}: {rows[name]}", flush=True)
    ref = rows.get("prefix")
    print(f"\n{args.model}, {args.rows} rows of {source}, batch {args.batch_size}, "
          f"{args.tokens} virtual tokens, {args.steps} timed steps; load average "
          f"{os.getloadavg()[0]:.2f}, {platform.machine()} {os.cpu_count()} cores")  # fmt: skip
    print("| variant | s / step | x prefix | peak MB above model | x prefix |")
    print("| --- | --- | --- | --- | --- |")
    for name, r in rows.items():
        t = f"{r['step_s'] / ref['step_s']:.2f}" if ref else "-"
        m = f"{r['peak_above_model_mb'] / max(ref['peak_above_model_mb'], 1):.2f}" if ref else "-"
        print(f"| {name} | {r['step_s']:.3f} | {t} | {r['peak_above_model_mb']:.0f} | {m} |")
    if args.json:
        record = {"date": time.strftime("%Y-%m-%d %H:%M"), "model": args.model,
                  "load_average": os.getloadavg()[0], "rows": rows}  # fmt: skip
        with open(args.json, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(record) + "\n")


if __name__ == "__main__":
    main()
