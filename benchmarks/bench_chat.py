"""Training on conversations: the constant head (system turn) and the virtual tokens run once
per batch as a shared prefix, against the plain path that runs them in every row.

Same model, data, batches and prompt, one process; prints seconds per step (forward and
backward of the prompt's loss) and the ratio, and checks the two losses agree.

    python benchmarks/bench_chat.py                       # embedded-chat, examples/support
    python benchmarks/bench_chat.py --quick --model DIR   # a smoke run
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
SYSTEM = (
    'Reply with one line of JSON and nothing else: {"topic": T, "sentiment": S} where T is one '
    "of battery, screen, delivery, price, support and S is positive or negative."
)


def main() -> None:
    from softprompt import PromptConfig, init_prompt, load_model
    from softprompt.config import DataConfig
    from softprompt.data import load_examples
    from softprompt.loss import lm_loss
    from softprompt.rows import batch_order, collate, tokenize

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="embedded-chat")
    p.add_argument("--data", default=str(ROOT / "examples" / "support" / "train.jsonl"))
    p.add_argument("--position", default="before-user")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--virtual-tokens", type=int, default=20)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--quick", action="store_true", help="2 steps, for a smoke test")
    args = p.parse_args()
    steps = 2 if args.quick else args.steps
    loaded = load_model(model=args.model, dtype=args.dtype)
    model, tok = loaded.model, loaded.tokenizer
    data = DataConfig(data=args.data, system=SYSTEM, prompt_position=args.position)
    fmt = data.prompt_format(chat=True)
    rows = tokenize(load_examples(args.data, data), tok, 512, "", None, fmt)
    order = batch_order([len(r.input_ids) for r in rows], args.batch_size, 0, 0)
    batches = [collate([rows[i] for i in b], tok.pad_token_id) for b in order[: steps + 1]]
    prompt = init_prompt(model, tok, PromptConfig(num_virtual_tokens=args.virtual_tokens))
    head = rows[0].prompt_at
    width = sum(b["input_ids"].shape[1] for b in batches) / len(batches)
    print(
        f"model {loaded.name}, {args.dtype}; placement {args.position}: head of {head} tokens "
        f"+ {args.virtual_tokens} virtual tokens; batch {args.batch_size}, mean width {width:.0f}"
    )
    results = {}
    for name, shared in (("shared prefix (head + prompt once per batch)", True),
                         ("plain (head + prompt in every row)", False)):  # fmt: skip
        losses = []
        for i, batch in enumerate(batches):
            if i == 1:
                start = time.perf_counter()  # batch 0 warms up
            loss, n = lm_loss(model, prompt, batch, shared_prefix=shared)
            (loss / n).backward()
            prompt.embedding.grad = None
            losses.append(float(loss.detach()) / n)
        results[name] = ((time.perf_counter() - start) / steps, losses)
        print(f"  {name:<48s} {results[name][0]:.3f} s/step", flush=True)
    (shared_s, a), (plain_s, b) = results.values()
    same = torch.allclose(torch.tensor(a), torch.tensor(b), rtol=1e-3, atol=1e-4)
    print(f"shared prefix: {plain_s / shared_s:.2f}x the plain path's speed; losses agree: {same}")


if __name__ == "__main__":
    main()
