"""Generation latency with a soft prompt: compiled prefix vs base vs the plain path vs PEFT.

Same model (the embedded Gemma 3 270M unless --model), inputs, prompt and greedy settings
for every variant, timed one after the other in one process; prints medians and ratios:

    python benchmarks/bench_generate.py            # about 2 minutes on 2 idle cores
    python benchmarks/bench_generate.py --repeats 2 --num-virtual-tokens 50
    python benchmarks/bench_generate.py --dtype float32 --batch-sizes 1 8

Variants:
- ``base``: ``softprompt.generate`` without a prompt;
- ``prefix``: with the prompt compiled once (``compile_prefix``), as the server runs it;
- ``plain``: the virtual tokens run through the model again on every call;
- ``peft``: ``PeftModel.generate`` with the same prompt saved as a PEFT adapter (PEFT
  prepends the virtual tokens to every call, like ``plain``);
- ``strided``: ``prefix`` with the loader's LM-head hook taken off, so the head reads
  transformers' strided ``hidden[:, -1:]`` as it would without softprompt's loader (torch's
  CPU bfloat16 linear copies the head's weight once per row of such an input). The
  ``peft`` variant runs on the same loaded model, hook included.

``--dtype`` is the library's (``auto``: bfloat16 where the hardware computes it). Peak memory
is the resident set's growth over the loaded model during each variant's calls, read with
the suite's sampler (one variant at a time, so each peak is its own).

Target: prefix <= 1.05x base.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import tempfile
import time

import torch

from softprompt.artifacts import save_prompt
from softprompt.config import GenerateConfig, ModelConfig, PromptConfig
from softprompt.generation import generate
from softprompt.loading import contiguous_head, load_model
from softprompt.measure.compare import PeakMemory
from softprompt.prefix import compile_prefix
from softprompt.prompt import init_prompt

TEXTS = [
    "Review: The battery died after two days and support never answered.\nSentiment:",
    "Review: Lovely staff, clean room, and breakfast was excellent.\nSentiment:",
    "Review: It works, but the screen scratches far too easily.\nSentiment:",
    "Review: Best purchase of the year, I use it every single day.\nSentiment:",
    "Review: The hotel was noisy and the bed was hard as a board.\nSentiment:",
    "Review: Fast delivery and the fit is perfect, would buy again.\nSentiment:",
    "Review: The plot dragged on and the ending made no sense at all.\nSentiment:",
    "Review: A warm, funny film with a cast that clearly loved it.\nSentiment:",
]


def timed(variants: dict, repeats: int) -> tuple[dict[str, float], dict[str, float], dict]:
    """Median seconds per variant, its peak memory (MB above the level before each call,
    the highest of its calls) and its last result.

    After one warm-up call each, the variants take turns (round-robin), so a load spike on
    a shared machine hits them all alike instead of one variant's whole run.
    """
    peaks = dict.fromkeys(variants, 0.0)
    results = {}
    for name, fn in variants.items():
        with PeakMemory(torch.device("cpu")) as peak:
            results[name] = fn()
        peaks[name] = peak.peak_mb
    times: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(repeats):
        for name, fn in variants.items():
            with PeakMemory(torch.device("cpu")) as peak:
                start = time.perf_counter()
                results[name] = fn()
                times[name].append(time.perf_counter() - start)
            peaks[name] = max(peaks[name], peak.peak_mb)
    return {name: statistics.median(t) for name, t in times.items()}, peaks, results


@contextlib.contextmanager
def strided_head(loaded):
    """The loader's LM-head hook (``loading.contiguous_head``) off inside the block: the
    head then reads transformers' strided ``hidden[:, -1:]`` as it does in a model loaded
    without softprompt."""
    loaded.head_hook.remove()
    try:
        yield
    finally:
        loaded.head_hook = contiguous_head(loaded.model)


def without_hook(loaded, fn):
    def call():
        with strided_head(loaded):
            return fn()

    return call


def peft_generate(peft_model, tok, texts: list[str], max_new_tokens: int) -> list[str]:
    """PEFT's documented inference: tokenizer batch (left padding) -> PeftModel.generate."""
    tok.padding_side = "left"
    enc = tok(texts, return_tensors="pt", padding=True)
    out = peft_model.generate(
        **enc, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tok.pad_token_id
    )
    return tok.batch_decode(out[:, enc["input_ids"].shape[1] :], skip_special_tokens=True)


def run(args: argparse.Namespace) -> tuple[dict, dict]:
    """{variant: {batch: median seconds}} and {variant: {batch: peak MB}}."""
    from peft import PeftModel

    loaded = load_model(ModelConfig(model=args.model, dtype=args.dtype))
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
    peak_mb: dict[str, dict[int, float]] = {}
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
            "strided": without_hook(loaded, lambda t=texts, c=cfg: generate(loaded, t, prefix, c)),
        }
        seconds, peaks, outputs = timed(variants, args.repeats)
        for name, value in seconds.items():
            results.setdefault(name, {})[batch] = value
            peak_mb.setdefault(name, {})[batch] = peaks[name]
            print(f"batch {batch} {name:7s} {value * 1000:8.0f} ms  peak {peaks[name]:6.0f} MB",
                  flush=True)  # fmt: skip
        for other in ("plain", "strided"):
            same = outputs["prefix"] == outputs[other]
            print(f"batch {batch}: prefix output == {other} output: {same}", flush=True)
    return results, peak_mb


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="embedded")
    parser.add_argument("--num-virtual-tokens", type=int, default=20)
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--repeats", type=int, default=3, help="timed calls per variant")
    parser.add_argument("--dtype", default="auto", help="the library's --dtype (default auto)")
    args = parser.parse_args()
    if max(args.batch_sizes) > len(TEXTS):
        parser.error(f"--batch-sizes: at most {len(TEXTS)} (the benchmark's texts)")
    torch.manual_seed(0)
    results, peak_mb = run(args)
    names = ("prefix", "plain", "peft", "strided")
    print(f"\nmedian latency, {args.num_virtual_tokens} virtual tokens, "
          f"{args.max_new_tokens} new tokens, greedy; ratio to base")  # fmt: skip
    print(f"{'batch':>5} {'base ms':>9} " + " ".join(f"{v:>8}" for v in names))
    for batch in args.batch_sizes:
        base = results["base"][batch]
        ratios = [results[v][batch] / base for v in names]
        print(f"{batch:>5} {base * 1000:>9.0f} " + " ".join(f"{r:>7.3f}x" for r in ratios))
    print("\npeak memory above the loaded model, MB (the highest of each variant's calls)")
    print(f"{'batch':>5} {'base':>9} " + " ".join(f"{v:>8}" for v in names))
    for batch in args.batch_sizes:
        row = [peak_mb[v][batch] for v in ("base", *names)]
        print(f"{batch:>5} {row[0]:>9.0f} " + " ".join(f"{m:>8.0f}" for m in row[1:]))


if __name__ == "__main__":
    main()
