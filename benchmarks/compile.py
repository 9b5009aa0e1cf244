"""Does torch.compile pay for prompt tuning on this machine?

Runs the training step softprompt uses (shared prefix, head at labelled positions, fp32)
on 12 bucketed batches of 8 sentiment reviews with the embedded Gemma 3 270M, eager, then
with every decoder layer compiled (``torch.compile(layer, dynamic=True)``: the batch widths
vary), and prints the compile time and seconds per step:

    python benchmarks/compile.py                    # float32
    python benchmarks/compile.py --dtype bfloat16   # bf16, where non-matmul work dominates
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from softprompt.config import PromptConfig
from softprompt.data import Example
from softprompt.loading import load_model
from softprompt.loss import lm_loss
from softprompt.prompt import init_prompt
from softprompt.rows import batch_order, collate, tokenize

DATA = Path(__file__).resolve().parents[1] / "examples" / "sentiment" / "train.jsonl"


def timed_steps(model, prompt, batches: list[dict]) -> tuple[float, float]:
    """(seconds of the first step, mean seconds of the others)."""

    def step(batch: dict) -> None:
        loss, _ = lm_loss(model, prompt, batch)
        loss.backward()
        prompt.embedding.grad = None

    start = time.perf_counter()
    step(batches[0])
    first = time.perf_counter() - start
    start = time.perf_counter()
    for batch in batches[1:]:
        step(batch)
    return first, (time.perf_counter() - start) / (len(batches) - 1)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    args = p.parse_args()
    loaded = load_model(dtype=args.dtype)
    model, tok = loaded.model, loaded.tokenizer
    records = [json.loads(x) for x in DATA.read_text().splitlines()][:96]
    examples = [Example(f"Review: {r['review']}\nSentiment:", r["label"], "") for r in records]
    rows = tokenize(examples, tok, 236)
    order = batch_order([len(r.input_ids) for r in rows], 8, 0, 0)
    batches = [collate([rows[i] for i in b], tok.pad_token_id) for b in order]
    prompt = init_prompt(model, tok, PromptConfig(num_virtual_tokens=20))
    timed_steps(model, prompt, batches[:2])  # warm up
    _, eager = timed_steps(model, prompt, batches)
    # Each layer reads its own cache slot, which dynamo guards on: one graph per layer.
    torch._dynamo.config.recompile_limit = 4 * len(model.model.layers)
    for i, layer in enumerate(model.model.layers):
        model.model.layers[i] = torch.compile(layer, dynamic=True)
    first, _ = timed_steps(model, prompt, batches)  # compiles on the first step
    _, compiled = timed_steps(model, prompt, batches)
    print(f"eager: {eager:.3f} s/step")
    print(f"compiled: {compiled:.3f} s/step ({eager / compiled:.2f}x), first step {first:.1f} s")
    saved = eager - compiled
    if saved > 0:
        print(f"compiling pays after about {first / saved:.0f} steps")
    else:
        print("compiling does not pay: the compiled step is not faster")


if __name__ == "__main__":
    main()
