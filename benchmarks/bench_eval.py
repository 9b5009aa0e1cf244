"""Evaluation speed: one pass per input vs a pass per choice, on a 2-way and a 5-way task.

Three ways to score a C-way classification (each choice's summed log-likelihood after the
input, plus the loss of the gold answer), same model, prompt, examples and batch size:

- ``harness``: lm-evaluation-harness's way, the whole sequence (prompt, input, choice)
  once per choice: C passes over the input (``measure.evaluate.classify_per_choice``);
- ``before``: softprompt's eval before this change: ``harness`` plus one more pass for
  the loss (``loss.evaluate_loss``): C + 1 passes;
- ``one-pass``: ``softprompt eval`` now: the input once behind the compiled prompt, every
  choice and the gold answer's loss read from its cache (``measure.evaluate.classify``).

The unit, "one forward pass of the input", is the time of the one-pass scorer with a
single one-token continuation per input (the input and nothing else). Predictions of
``one-pass`` and ``harness`` are compared (they should agree; scores within float noise).

    python benchmarks/bench_eval.py              # 100 examples per task, about 5 min
    python benchmarks/bench_eval.py --quick      # 16 examples
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def tasks(limit: int) -> dict[str, tuple[list[str], list[str], list[str]]]:
    """name -> (inputs after the template, gold labels, choices)."""
    out = {}
    rows = [json.loads(x) for x in (ROOT / "examples/sentiment/test.jsonl").open()][:limit]
    out["sentiment (2-way)"] = (
        [f"Review: {r['review']}\nSentiment:" for r in rows],
        [r["label"] for r in rows],
        ["positive", "negative"],
    )
    rows = [json.loads(x)["messages"] for x in (ROOT / "examples/support/test.jsonl").open()]
    rows += [json.loads(x)["messages"] for x in (ROOT / "examples/support/train.jsonl").open()]
    rows = rows[:limit]
    out["topic (5-way)"] = (
        [f"Message: {m[0]['content']}\nTopic:" for m in rows],
        [json.loads(m[1]["content"])["topic"] for m in rows],
        ["battery", "screen", "delivery", "price", "support"],
    )
    return out


def timed(fn, *args, **kwargs):
    start = time.perf_counter()
    out = fn(*args, **kwargs)
    return out, time.perf_counter() - start


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="embedded")
    p.add_argument("--examples", type=int, default=100)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--virtual-tokens", type=int, default=20)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--quick", action="store_true", help="16 examples per task")
    args = p.parse_args()
    if args.quick:
        args.examples = 16

    from softprompt import load_model
    from softprompt.data import Example
    from softprompt.prompt import SoftPrompt
    from softprompt.rows import tokenize
    from softprompt.scoring import (
        Scoring,
        classify,
        classify_per_choice,
        evaluate_loss,
        loss_scoring,
        score_after,
    )

    torch.set_grad_enabled(False)
    loaded = load_model(model=args.model, dtype=args.dtype)
    model, tok = loaded.model, loaded.tokenizer
    hidden = model.get_input_embeddings().weight.shape[1]
    gen = torch.Generator().manual_seed(0)
    prompt = SoftPrompt(torch.randn(args.virtual_tokens, hidden, generator=gen) * 0.5)
    bs = args.batch_size
    print(f"model {loaded.name} ({args.dtype}), {args.virtual_tokens} virtual tokens, batch {bs}")
    print("| task | harness s/ex | before s/ex | one-pass s/ex | passes of the input per "
          "example (one-pass) | speed-up vs before | predictions equal |")  # fmt: skip
    print("|---|---|---|---|---|---|---|")
    for name, (sources, golds, choices) in tasks(args.examples).items():
        n = len(sources)
        examples = [Example(s, g, f"{name}:{i}") for i, (s, g) in enumerate(zip(sources, golds))]
        rows = tokenize(examples, tok, 1024, " ")
        for fn in (classify, classify_per_choice):  # warm up (first calls allocate)
            fn(model, tok, prompt, sources[:bs], choices, batch_size=bs)
        bare = [Scoring(None, tok(s)["input_ids"], [[tok.eos_token_id]]) for s in sources]
        _, unit = timed(score_after, model, prompt, bare, bs)
        (h_preds, h_scores), harness = timed(
            classify_per_choice, model, tok, prompt, sources, choices, batch_size=bs
        )
        _, loss_s = timed(evaluate_loss, model, prompt, rows, bs, tok.pad_token_id)
        extra = [loss_scoring(r) for r in rows]
        (preds, scores), one = timed(
            classify, model, tok, prompt, sources, choices, batch_size=bs, extra=extra
        )
        diff = max(abs(a - b) for x, y in zip(scores, h_scores) for a, b in zip(x, y))
        before = harness + loss_s
        print(f"| {name} | {harness / n:.3f} | {before / n:.3f} | {one / n:.3f} | "
              f"{one / unit:.2f} | {before / one:.2f}x | {preds == h_preds} "
              f"(max score diff {diff:.1e}) |")  # fmt: skip
    sys.stdout.flush()


if __name__ == "__main__":
    main()
