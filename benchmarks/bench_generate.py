"""Generation latency with a soft prompt: compiled prefix vs base vs the plain path vs PEFT.

Same model (the embedded Gemma 3 270M unless --model), inputs, prompt and greedy settings
for every variant, timed one after the other in one process; prints medians and ratios:

    python benchmarks/bench_generate.py            # about 2 minutes on 2 idle cores
    python benchmarks/bench_generate.py --repeats 2 --num-virtual-tokens 50

Variants:
- ``base``: ``softprompt.generate`` without a prompt;
- ``prefix``: with the prompt compiled once (``compile_prefix``), as the server runs it;
- ``plain``: the virtual tokens run through the model again on every call;
- ``peft``: ``PeftModel.generate`` with the same prompt saved as a PEFT adapter (PEFT
  prepends the virtual tokens to every call, like ``plain``).

Target: prefix <= 1.05x base.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import torch

from softprompt.artifacts import save_prompt
from softprompt.config import GenerateConfig, ModelConfig, PromptConfig
from softprompt.generation import generate
from softprompt.loading import load_model
from softprompt.prefix import compile_prefix
from softprompt.prompt import init_prompt

TEXTS = [
    "Review: The battery died after two days and support never answered.\nSentiment:",
    "Review: Lovely staff, clean room, and breakfast was excellent.\nSentiment:",
    "Review: It works, but the screen scratches far too easily.\nSentiment:",
    "Review: Best purchase of the year, I use it every single day.\nSentiment:",
]


def timed(variants: dict, repeats: int) -> tuple[dict[str, float], dict[str, object]]:
    """Median seconds per variant and each one's last result.

    After one warm-up call each, the variants take turns (round-robin), so a load spike on
    a shared machine hits them all alike instead of one variant's whole run.
    """
    results = {name: fn() for name, fn in variants.items()}
    times: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(repeats):
        for name, fn in variants.items():
            start = time.perf_counter()
            results[name] = fn()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}, results


def peft_generate(peft_model, tok, texts: list[str], max_new_tokens: int) -> list[str]:
    """PEFT's documented inference: tokenizer batch (left padding) -> PeftModel.generate."""
    tok.padding_side = "left"
    enc = tok(texts, return_tensors="pt", padding=True)
    out = peft_model.generate(
        **enc, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tok.pad_token_id
    )
    return tok.batch_decode(out[:, enc["input_ids"].shape[1] :], skip_special_tokens=True)


def run(args: argparse.Namespace) -> dict[str, dict[int, float]]:
    from peft import PeftModel

    loaded = load_model(ModelConfig(model=args.model))
    prompt = init_prompt(
        loaded.model,
        loaded.tokenizer,
        PromptConfig(num_virtual_tokens=args.num_virtual_tokens, init="random"),
    )
    prefix = compile_prefix(loaded.model, prompt)
    folder = tempfile.mkdtemp(prefix="bench-generate-")
    save_prompt(folder, prompt, loaded.model, loaded.name)
    peft_model = PeftModel.from_pretrained(loaded.model, folder)  # adds no layers: base intact
    peft_model.eval()
    results: dict[str, dict[int, float]] = {}
    for batch in args.batch_sizes:
        texts = TEXTS[:batch]
        cfg = GenerateConfig(max_new_tokens=args.max_new_tokens, batch_size=batch)
        variants = {
            "base": lambda t=texts, c=cfg: generate(loaded, t, None, c),
            "prefix": lambda t=texts, c=cfg: generate(loaded, t, prefix, c),
            "plain": lambda t=texts, c=cfg: generate(loaded, t, prompt, c, prefix_cache=False),
            "peft": lambda t=texts: peft_generate(
                peft_model, loaded.tokenizer, t, args.max_new_tokens
            ),
        }
        seconds, outputs = timed(variants, args.repeats)
        for name, value in seconds.items():
            results.setdefault(name, {})[batch] = value
            print(f"batch {batch} {name:7s} {value * 1000:8.0f} ms", flush=True)
        same = outputs["prefix"] == outputs["plain"]
        print(f"batch {batch}: prefix output == plain output: {same}", flush=True)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="embedded")
    parser.add_argument("--num-virtual-tokens", type=int, default=20)
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--repeats", type=int, default=3, help="timed calls per variant")
    args = parser.parse_args()
    torch.manual_seed(0)
    results = run(args)
    print(f"\nmedian latency, {args.num_virtual_tokens} virtual tokens, "
          f"{args.max_new_tokens} new tokens, greedy; ratio to base")  # fmt: skip
    print(f"{'batch':>5} {'base ms':>9} {'prefix':>8} {'plain':>8} {'peft':>8}")
    for batch in args.batch_sizes:
        base = results["base"][batch]
        ratios = [results[v][batch] / base for v in ("prefix", "plain", "peft")]
        print(f"{batch:>5} {base * 1000:>9.0f} " + " ".join(f"{r:>7.3f}x" for r in ratios))


if __name__ == "__main__":
    main()
