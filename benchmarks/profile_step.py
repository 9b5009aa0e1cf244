"""Where a training step's time goes, and how fast its matmuls run on this machine.

Profiles softprompt's fp32 training step (shared prefix, head at labelled positions) on
8-row batches of sentiment reviews with the embedded Gemma 3 270M, prints the share of the
time in each kind of op, then times Gemma 3 270M's GEMM shapes at that batch size (one
projection per matmul, and q/k/v and gate/up fused) against a 2048 x 2048 square matmul:

    python benchmarks/profile_step.py                    # float32
    python benchmarks/profile_step.py --dtype bfloat16   # the frozen weights in bf16
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from softprompt.config import PromptConfig
from softprompt.data import Example
from softprompt.loading import load_model
from softprompt.loss import lm_loss
from softprompt.prompt import init_prompt
from softprompt.rows import batch_order, collate, tokenize

DATA = Path(__file__).resolve().parents[1] / "examples" / "sentiment" / "train.jsonl"


def seconds(fn, repeats: int = 20) -> float:
    fn()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - start) / repeats


def profile_step(dtype: str = "float32", batch_size: int = 8) -> int:
    """Print the op breakdown of four steps; return the mean positions per batch."""
    loaded = load_model(dtype=dtype)
    model, tok = loaded.model, loaded.tokenizer
    records = [json.loads(x) for x in DATA.read_text().splitlines()][:40]
    examples = [Example(f"Review: {r['review']}\nSentiment:", r["label"], "") for r in records]
    rows = tokenize(examples, tok, 236)
    order = batch_order([len(r.input_ids) for r in rows], batch_size, 0, 0)
    batches = [collate([rows[i] for i in b], tok.pad_token_id) for b in order]
    prompt = init_prompt(model, tok, PromptConfig(num_virtual_tokens=20))

    def step(batch: dict) -> None:
        loss, _ = lm_loss(model, prompt, batch)
        loss.backward()
        prompt.embedding.grad = None

    step(batches[0])  # warm up
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for batch in batches[1:5]:
            step(batch)
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events)
    print("share of the step's time by op (self time, 4 steps):")
    for e in sorted(events, key=lambda e: -e.self_cpu_time_total)[:12]:
        print(f"  {e.key[:50]:50s} {e.self_cpu_time_total / total:6.1%}")
    return round(sum(b["input_ids"].numel() for b in batches[1:5]) / 4) + 20


def gemm_speed(m: int, dtype: torch.dtype = torch.float32) -> None:
    """Gemma 3 270M's per-layer GEMMs for ``m`` positions, one by one and fused."""
    x, h = torch.randn(m, 640, dtype=dtype), torch.randn(m, 2048, dtype=dtype)
    qkv = [torch.randn(n, 640, dtype=dtype) for n in (1024, 256, 256)]
    gate_up = [torch.randn(2048, 640, dtype=dtype) for _ in range(2)]
    down = torch.randn(640, 2048, dtype=dtype)
    fused_qkv, fused_gate_up = torch.cat(qkv), torch.cat(gate_up)
    flops = 2 * m * 640 * (1536 + 4096 + 2048)
    apart = seconds(lambda: [x @ w.T for w in qkv + gate_up]) + seconds(lambda: h @ down.T)
    fused = seconds(lambda: (x @ fused_qkv.T, x @ fused_gate_up.T)) + seconds(lambda: h @ down.T)
    a, b = torch.randn(2048, 2048, dtype=dtype), torch.randn(2048, 2048, dtype=dtype)
    peak = 2 * 2048**3 / seconds(lambda: a @ b, repeats=5) / 1e9
    print(
        f"GEMMs at {m} positions: one by one {flops / apart / 1e9:.0f} GFLOP/s, fused "
        f"{flops / fused / 1e9:.0f} GFLOP/s; square 2048 matmul {peak:.0f} GFLOP/s "
        f"(one by one = {flops / apart / 1e9 / peak:.0%} of it)"
    )


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--batch-size", type=int, default=8)
    args = p.parse_args()
    positions = profile_step(args.dtype, args.batch_size)
    gemm_speed(positions, getattr(torch, args.dtype))
