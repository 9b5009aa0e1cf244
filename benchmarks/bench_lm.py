"""Plain-text prompt tuning (the tutorials' task): the tutorial recipe vs softprompt.

The task of PEFT's "prompt tuning for causal language modeling" tutorials: a soft prompt
trained on a file of texts with the loss on every token. Data: examples/instructions
(instruction-style documents built from the shipped support messages, about 150 tokens
each). Both variants use the same model, texts, epochs, batch size and virtual tokens, each
in its own process (so each peak RSS is its own), and their prompts are scored by the same
function (``softprompt.loss.evaluate_loss`` on the held-out texts, float32):

- ``recipe``: PEFT ``PromptTuningConfig`` (RANDOM init) + transformers ``Trainer`` +
  ``DataCollatorForLanguageModeling(mlm=False)``, float32, AdamW lr 3e-2, linear schedule;
- ``softprompt``: ``softprompt.train`` with its defaults (float32; the LM loss computed in
  chunks, the virtual tokens run once per batch);
- ``softprompt-bf16``: the same with the frozen weights in bfloat16.

    python benchmarks/bench_lm.py            # about 10 min on 2 cores
    python benchmarks/bench_lm.py --quick    # 16 texts, 1 epoch: a smoke run

Throughput: text tokens per second of training; the share of the matmul peak counts
4 x (body parameters + head columns x hidden) FLOPs per text token (forward and the
backward pass to the prompt; the virtual tokens' own work is left out, so it is a lower
bound), over the optimizer steps alone where the variant records them.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_train import matmul_peak, peak_rss_mb, rss_mb  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "examples" / "instructions"


def texts(split: str, limit: int) -> list[str]:
    lines = (DATA / f"{split}.jsonl").read_text().splitlines()
    return [json.loads(x)["text"] for x in lines if x][:limit]


def heldout_loss(loaded, embedding: torch.Tensor, test: list[str]) -> float:
    """Mean loss per held-out token with the prompt first: the same scorer for both."""
    from softprompt.data import Example
    from softprompt.prompt import SoftPrompt
    from softprompt.rows import tokenize
    from softprompt.scoring import evaluate_loss

    tok = loaded.tokenizer
    rows = tokenize([Example(t, None, f"test:{i}") for i, t in enumerate(test, 1)], tok, 512)
    prompt = SoftPrompt(embedding.float())
    return evaluate_loss(loaded.model, prompt, rows, 4, tok.pad_token_id)["loss"]


def run_recipe(args, loaded, train: list[str]) -> dict:
    from peft import PromptTuningConfig, PromptTuningInit, TaskType, get_peft_model
    from transformers import DataCollatorForLanguageModeling, Trainer, TrainingArguments

    tok = loaded.tokenizer
    config = PromptTuningConfig(
        task_type=TaskType.CAUSAL_LM,
        prompt_tuning_init=PromptTuningInit.RANDOM,
        num_virtual_tokens=args.virtual_tokens,
    )
    model = get_peft_model(loaded.model, config)
    data = [dict(tok(t, truncation=True, max_length=512)) for t in train]
    out = tempfile.mkdtemp(prefix="bench-lm-recipe-")
    targs = TrainingArguments(
        output_dir=out,
        per_device_train_batch_size=args.batch_size,
        num_train_epochs=args.epochs,
        learning_rate=3e-2,
        lr_scheduler_type="linear",
        save_strategy="no",
        report_to=[],
        logging_steps=1,
        use_cpu=True,
        disable_tqdm=True,
    )
    collator = DataCollatorForLanguageModeling(tok, mlm=False)
    trainer = Trainer(model=model, args=targs, train_dataset=data, data_collator=collator)
    start = time.perf_counter()
    trainer.train()
    wall = time.perf_counter() - start
    tokens = sum(len(x["input_ids"]) for x in data) * args.epochs
    prompt = model.get_prompt_embedding_to_save(adapter_name="default").detach().clone()
    return {"wall_s": wall, "step_s": None, "tokens": tokens, "prompt": prompt}


def run_softprompt(args, loaded, train: list[str], dtype: str) -> dict:
    from softprompt import DataConfig, ModelConfig, TrainConfig
    from softprompt import train as sp_train

    tmp = Path(tempfile.mkdtemp(prefix="bench-lm-sp-"))
    (tmp / "train.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in train))
    cfg = TrainConfig(
        method="prompt",  # the tutorial recipe's method: the same on both sides
        model=ModelConfig(model=args.model, dtype=dtype),
        data=DataConfig(data=str(tmp / "train.jsonl"), text_field="text"),
        output=str(tmp / "run"),
        epochs=args.epochs,
        batch_size=args.batch_size,
    )
    cfg.prompt.num_virtual_tokens = args.virtual_tokens
    result = sp_train(cfg, loaded=loaded, progress=False)
    records = [json.loads(x) for x in (tmp / "run" / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if r["kind"] == "train"]
    return {
        "wall_s": result.summary["train_seconds"],
        "step_s": sum(r["step_s"] for r in steps),
        "tokens": result.summary["tokens"],
        "prompt": result.prompt.embedding.detach().clone(),
    }


def run_variant(args) -> None:
    """Child process: train one variant, score it in float32, print one JSON line."""
    from softprompt import load_model

    torch.manual_seed(0)
    dtype = "bfloat16" if args.run.endswith("bf16") else "float32"
    rss_start = rss_mb()
    loaded = load_model(model=args.model, dtype=dtype)
    train, test = texts("train", args.train_texts), texts("test", args.test_texts)
    if args.run == "recipe":
        out = run_recipe(args, loaded, train)
    else:
        out = run_softprompt(args, loaded, train, dtype)
    peak = peak_rss_mb()  # before scoring, which is the same for every variant
    if dtype != "float32":
        loaded = load_model(model=args.model, dtype="float32")
    model = loaded.model
    head = model.get_output_embeddings().weight
    body = sum(p.numel() for p in model.parameters()) - model.get_input_embeddings().weight.numel()
    if head.data_ptr() != model.get_input_embeddings().weight.data_ptr():
        body -= head.numel()  # an untied head is counted apart, below
    out.update(
        variant=args.run,
        heldout_loss=heldout_loss(loaded, out.pop("prompt"), test),
        peak_rss_mb=peak,
        rss_start_mb=rss_start,
        flops_per_token=4 * (body + head.numel()),
        tokens_per_s=out["tokens"] / out["wall_s"],
    )
    print("RESULT " + json.dumps(out), flush=True)


def child(args, variant: str) -> dict | None:
    cmd = [sys.executable, __file__, "--run", variant, "--model", args.model,
           "--train-texts", str(args.train_texts), "--test-texts", str(args.test_texts),
           "--epochs", str(args.epochs), "--batch-size", str(args.batch_size),
           "--virtual-tokens", str(args.virtual_tokens)]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, env=os.environ)
    lines = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
    if proc.returncode or not lines:
        print(f"{variant} failed:\n{proc.stderr[-3000:]}", file=sys.stderr)
        return None
    return json.loads(lines[-1][len("RESULT ") :])


def report(args) -> None:
    peak = max(matmul_peak(torch.float32), 1e-9)
    peak_bf16 = max(matmul_peak(torch.bfloat16), 1e-9)
    print(f"matmul peak: float32 {peak:.0f} GFLOP/s, bfloat16 {peak_bf16:.0f} GFLOP/s")
    print(f"data: {args.train_texts} train / {args.test_texts} held-out texts, {args.epochs} "
          f"epochs, batch {args.batch_size}, {args.virtual_tokens} virtual tokens")  # fmt: skip
    results = {}
    for variant in args.variants.split(","):
        res = child(args, variant)
        if res is None:
            continue
        results[variant] = res
    print("| variant | train wall s | steps s | tokens/s | peak RSS MB | held-out loss |")
    print("|---|---|---|---|---|---|")
    for v, r in results.items():
        steps = f"{r['step_s']:.1f}" if r["step_s"] else "-"
        print(f"| {v} | {r['wall_s']:.1f} | {steps} | {r['tokens_per_s']:.0f} | "
              f"{r['peak_rss_mb']:.0f} | {r['heldout_loss']:.4f} |")  # fmt: skip
    base = results.get("recipe")
    for v, r in results.items():
        if v == "recipe":
            continue
        if base:
            print(f"{v}: recipe / {v} wall time = {base['wall_s'] / r['wall_s']:.2f}x; peak RSS "
                  f"{r['peak_rss_mb'] / base['peak_rss_mb']:.2f}x the recipe's; held-out loss "
                  f"{r['heldout_loss']:.4f} vs recipe {base['heldout_loss']:.4f}")  # fmt: skip
        ref = peak_bf16 if v.endswith("bf16") else peak
        seconds = r["step_s"] or r["wall_s"]
        rate = r["flops_per_token"] * r["tokens"] / seconds / 1e9
        print(f"{v}: {rate:.0f} GFLOP/s over the optimizer steps = {100 * rate / ref:.0f}% of the "
              f"{'bfloat16' if v.endswith('bf16') else 'float32'} matmul peak")  # fmt: skip
    if args.json:
        Path(args.json).write_text(json.dumps({"peak": peak, "peak_bf16": peak_bf16,
                                               "results": results}, indent=1))  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="embedded")
    p.add_argument("--train-texts", type=int, default=200)
    p.add_argument("--test-texts", type=int, default=20)
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--virtual-tokens", type=int, default=20)
    p.add_argument("--variants", default="recipe,softprompt,softprompt-bf16")
    p.add_argument("--quick", action="store_true", help="16 texts, 1 epoch: a smoke run")
    p.add_argument("--json", help="also write the results to this file")
    p.add_argument("--run", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.quick:
        args.train_texts, args.test_texts, args.epochs = 16, 4, 1
    if args.run:
        return run_variant(args)
    report(args)


if __name__ == "__main__":
    main()
