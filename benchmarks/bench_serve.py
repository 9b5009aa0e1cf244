"""Load run against `softprompt serve`: many clients over 4 prompts vs one prompt at a time.

Starts the server in this process on 127.0.0.1 (the embedded Gemma 3 270M unless --model,
four prompts of 8, 16, 24 and 32 virtual tokens), then sends the same fixed set of
requests twice with the official openai client from --clients threads:

- ``mixed``: all requests at once, the four prompts interleaved, so batches mix prompts;
- ``one prompt at a time``: the same requests, one prompt's share after the other;
- ``all on task0``: the same texts, all for the shortest prompt (batches of one prompt).

Prints throughput, p50/p99 latency, failed requests (must be 0), the mean batch size,
and the throughput ratios of the mixed run to the two others (target >= 0.9):

    python benchmarks/bench_serve.py                  # about 2 minutes on 2 idle cores
    python benchmarks/bench_serve.py --requests 256 --clients 64
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import openai
import torch

from softprompt.artifacts import save_prompt
from softprompt.config import ModelConfig, PromptConfig, ServeConfig
from softprompt.loading import load_model
from softprompt.prompt import init_prompt
from softprompt.serving.api import create_app
from softprompt.serving.server import BackgroundServer

LENGTHS = (8, 16, 24, 32)
TEXTS = [
    "The battery died after two days.",
    "Lovely staff and a clean room.",
    "It works, but the screen scratches easily.",
    "Best purchase of the year.",
    "The food was cold and the service slow.",
    "I would buy this again without a second thought.",
]


def make_prompts(loaded, folder: Path) -> list[str]:
    names = []
    for i, n in enumerate(LENGTHS):
        torch.manual_seed(i)
        cfg = PromptConfig(num_virtual_tokens=n, init="random")
        prompt = init_prompt(loaded.model, loaded.tokenizer, cfg, seed=i)
        save_prompt(folder / f"task{i}", prompt, loaded.model, loaded.name)
        names.append(f"task{i}")
    return names


def load_run(client: openai.OpenAI, jobs: list[tuple[str, str]], clients: int, max_tokens: int):
    """Send every job from ``clients`` threads; (wall seconds, latencies, errors, tokens)."""

    def one(job: tuple[str, str]) -> tuple[float, int, str | None]:
        start = time.perf_counter()
        try:
            out = client.completions.create(
                model=job[0], prompt=job[1], max_tokens=max_tokens, temperature=0
            )
            return time.perf_counter() - start, out.usage.completion_tokens, None
        except openai.OpenAIError as err:
            return time.perf_counter() - start, 0, f"{type(err).__name__}: {err}"

    start = time.perf_counter()
    with ThreadPoolExecutor(max_workers=clients) as pool:
        results = list(pool.map(one, jobs))
    wall = time.perf_counter() - start
    errors = [e for _, _, e in results if e]
    return wall, [r[0] for r in results], errors, sum(r[1] for r in results)


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


def report(label: str, runs: list[tuple], metrics_delta: tuple[int, int]) -> float:
    wall = sum(r[0] for r in runs)
    latencies = [x for r in runs for x in r[1]]
    errors = [e for r in runs for e in r[2]]
    tokens = sum(r[3] for r in runs)
    batches, rows = metrics_delta
    print(
        f"{label:22s} {len(latencies)} requests in {wall:6.1f}s: "
        f"{len(latencies) / wall:6.2f} req/s, "
        f"{tokens / wall:7.1f} tok/s, p50 {statistics.median(latencies):5.2f}s, "
        f"p99 {percentile(latencies, 0.99):5.2f}s, errors {len(errors)}, "
        f"mean batch {rows / max(batches, 1):4.1f}",
        flush=True,
    )
    for e in errors[:3]:
        print(f"  error: {e}")
    return len(latencies) / wall


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="embedded")
    parser.add_argument("--requests", type=int, default=64, help="requests per run")
    parser.add_argument("--clients", type=int, default=32, help="concurrent clients")
    parser.add_argument("--max-tokens", type=int, default=8)
    parser.add_argument("--max-batch-size", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=2, help="times each run is repeated")
    args = parser.parse_args()
    loaded = load_model(ModelConfig(model=args.model))
    folder = Path(tempfile.mkdtemp(prefix="bench-serve-"))
    names = make_prompts(loaded, folder)
    cfg = ServeConfig(prompts=str(folder), max_batch_size=args.max_batch_size,
                      max_queue=max(256, args.requests))  # fmt: skip
    app = create_app(loaded, cfg)
    app.state.softprompt.store.rescan()
    server = BackgroundServer(app)
    metrics = app.state.softprompt.batcher.metrics
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0,
                           timeout=600)  # fmt: skip
    jobs = [(names[i % 4], TEXTS[i % len(TEXTS)]) for i in range(args.requests)]
    plans = {
        "mixed (4 prompts)": [jobs],
        "one prompt at a time": [[j for j in jobs if j[0] == name] for name in names],
        f"all on {names[0]}": [[(names[0], text) for _, text in jobs]],  # shortest: no bonus
    }
    try:
        load_run(client, jobs[:8], 8, args.max_tokens)  # warm-up
        print(f"{args.clients} clients, {args.requests} requests, {args.max_tokens} new tokens "
              f"each, greedy, max batch {args.max_batch_size}", flush=True)  # fmt: skip
        rates: dict[str, list[float]] = {label: [] for label in plans}
        for round_ in range(args.rounds):  # plans take turns, so load spikes hit all alike
            print(f"round {round_ + 1}", flush=True)
            for label, parts in plans.items():
                before = (metrics.batches, metrics.batch_rows)
                runs = [load_run(client, part, args.clients, args.max_tokens) for part in parts]
                rates[label].append(report(label, runs, _delta(metrics, before)))
        mixed, serial, one = (statistics.median(r) for r in rates.values())
        print(f"median throughput ratio mixed / one prompt at a time: {mixed / serial:.3f}")
        print(f"median throughput ratio mixed / all on one prompt:    {mixed / one:.3f}")
    finally:
        server.stop()
        app.state.softprompt.batcher.close()


def _delta(metrics, before: tuple[int, int]) -> tuple[int, int]:
    return metrics.batches - before[0], metrics.batch_rows - before[1]


if __name__ == "__main__":
    main()
