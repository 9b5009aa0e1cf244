"""Encoder classification: prompt + head vs head alone vs full fine-tuning, on one model.

The bundled all-MiniLM-L6-v2 (a 6-layer BERT) on examples/sentiment by default. Three ways
to train, the same batches, epochs and validation (the best epoch by validation loss is
kept), then accuracy and macro-F1 on the test file:

- prompt + head: ``softprompt train`` (a soft prompt and the classification head; PEFT's
  SEQ_CLS prompt tuning);
- deep prompt + head: the same with ``--method prefix`` (keys/values in every layer; PEFT's
  SEQ_CLS prefix tuning);
- head alone: the classification head on the frozen encoder (no prompt);
- full fine-tuning: every weight of the encoder and the head.

    python benchmarks/bench_classify.py                      # embedded-encoder, sentiment
    python benchmarks/bench_classify.py --quick --model DIR  # a smoke run
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "examples" / "sentiment"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="embedded-encoder")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "auto"],
                   help="every method's weights (float32: as recorded, full fine-tuning of "
                   "float32 weights)")  # fmt: skip
    p.add_argument("--data", default=str(DATA / "train.jsonl"))
    p.add_argument("--validation", default=str(DATA / "validation.jsonl"))
    p.add_argument("--test", default=str(DATA / "test.jsonl"))
    p.add_argument("--input-field", default="review")
    p.add_argument("--target-field", default="label")
    p.add_argument("--epochs", type=int, default=10, help="every method (classify's default)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--virtual-tokens", type=int, default=20)
    p.add_argument("--lr", type=float, default=0.1, help="prompt + head, and head alone")
    p.add_argument(
        "--prefix-lr",
        type=float,
        default=0.03,
        help="deep prompt + head (classify's default: docs/measurements.md, 7)",
    )
    p.add_argument("--full-lr", type=float, default=5e-5, help="full fine-tuning")
    p.add_argument(
        "--pooling", default="cls", choices=["auto", "cls", "mean"],
        help="what every method's head reads (train --pooling); cls, the model's own head, is "
        "the saved record's (the classifier's default is auto: MiniLM's declared mean)",
    )  # fmt: skip
    p.add_argument("--limit", type=int, default=None, help="use only this many examples")
    p.add_argument("--quick", action="store_true", help="1 epoch, 4 tokens: a smoke test")
    p.add_argument("--json", default=None, help="also write the results here")
    args = p.parse_args()
    if args.quick:
        args.epochs, args.virtual_tokens = 1, 4
    torch.set_num_threads(max(torch.get_num_threads(), 1))
    results = [run_prompt(args), run_prompt(args, "prefix"), run_plain(args, "head alone"),
               run_plain(args, "full FT")]  # fmt: skip
    print(table(results, args))
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "results": results}, indent=1))


def _model(args):
    from softprompt import ModelConfig

    return ModelConfig(model=args.model, pooling=args.pooling, dtype=args.dtype)


def examples(spec: str, args) -> list:
    from softprompt.config import DataConfig
    from softprompt.data import load_examples

    cfg = DataConfig(data=spec, input_field=args.input_field, target_field=args.target_field)
    return load_examples(spec, cfg)[: args.limit]


def run_prompt(args, method: str = "prompt") -> dict:
    """softprompt's own training: prompt + head (``method`` prefix: a deep prompt)."""
    from softprompt import train
    from softprompt.config import DataConfig, PromptConfig, TrainConfig
    from softprompt.loading import load_model

    with tempfile.TemporaryDirectory() as tmp:
        data = DataConfig(data=args.data, validation=args.validation,
                          input_field=args.input_field, target_field=args.target_field)  # fmt: skip
        if args.limit:
            data = _limited(data, args, Path(tmp))
        cfg = TrainConfig(model=_model(args), data=data,
                          prompt=PromptConfig(num_virtual_tokens=args.virtual_tokens,
                                              init="vocab"),
                          output=str(Path(tmp) / "run"), epochs=args.epochs, method=method,
                          batch_size=args.batch_size, select="loss",  # as the others choose
                          lr=args.prefix_lr if method == "prefix" else args.lr)  # fmt: skip
        start = time.perf_counter()
        result = train(cfg, progress=False)
        seconds = time.perf_counter() - start
        labels = sorted({ex.target for ex in examples(args.data, args)})
        loaded = load_model(_model(args), labels=labels)
        from softprompt.artifacts import load_prompt

        prompt, meta = load_prompt(result.output, loaded.model)  # its head goes in place
        trainable = meta["trainable_parameters"]
    name = "deep prompt + head" if method == "prefix" else "prompt + head"
    return {"method": name, "train_s": round(seconds, 1),
            "trainable": trainable["prompt"] + trainable["head"],
            **test_metrics(loaded, prompt, args)}  # fmt: skip


def _limited(data, args, tmp: Path):
    """--limit: the first examples of each file, written to ``tmp``."""
    from dataclasses import replace

    out = {}
    for name in ("data", "validation"):
        path = tmp / f"{name}.jsonl"
        lines = Path(getattr(data, name)).read_text().splitlines()[: args.limit]
        path.write_text("\n".join(lines) + "\n")
        out[name] = str(path)
    return replace(data, **out)


def run_plain(args, method: str) -> dict:
    """Head alone (the encoder frozen) or full fine-tuning (everything learns), no prompt:
    the same batches, epochs and best-epoch choice as softprompt's run."""
    from softprompt.kinds.classify import head_parameters, rows_loss, tokenize_labels
    from softprompt.loading import load_model
    from softprompt.rows import batch_order

    train_ex, val_ex = examples(args.data, args), examples(args.validation, args)
    labels = sorted({ex.target for ex in train_ex})
    loaded = load_model(_model(args), labels=labels)
    model, tok = loaded.model, loaded.tokenizer
    params = head_parameters(model)
    if method == "full FT":
        model.requires_grad_(True)
        params = [q for q in model.parameters()]
    lr = args.full_lr if method == "full FT" else args.lr
    rows = tokenize_labels(train_ex, tok, 256, labels)
    val_rows = tokenize_labels(val_ex, tok, 256, labels)
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    best, best_state = math.inf, None
    start = time.perf_counter()
    for epoch in range(args.epochs):
        order = batch_order([len(r.input_ids) for r in rows], args.batch_size, 0, epoch)
        for batch in order:
            loss, n, _ = rows_loss(model, None, [rows[i] for i in batch], tok.pad_token_id, "cpu")
            (loss / n).backward()
            optimizer.step()
            optimizer.zero_grad()
        with torch.no_grad():  # model stays in eval mode: no dropout, as softprompt trains
            parts = [val_rows[i : i + 32] for i in range(0, len(val_rows), 32)]
            total = sum(float(rows_loss(model, None, b, tok.pad_token_id, "cpu")[0]) for b in parts)
        if total / len(val_rows) < best:
            best, best_state = total / len(val_rows), copy.deepcopy(model.state_dict())
    seconds = time.perf_counter() - start
    model.load_state_dict(best_state)
    return {"method": method, "train_s": round(seconds, 1),
            "trainable": sum(q.numel() for q in params),
            **test_metrics(loaded, None, args)}  # fmt: skip


def test_metrics(loaded, prompt, args) -> dict:
    from softprompt.kinds.classify import predict
    from softprompt.measure.metrics import classification_metrics

    test = examples(args.test, args)
    probs = predict(loaded.model, loaded.tokenizer, prompt, [ex.source for ex in test], 32)
    preds = [loaded.labels[max(range(len(p)), key=p.__getitem__)] for p in probs]
    m = classification_metrics([ex.target for ex in test], preds, loaded.labels)
    return {"accuracy": m["accuracy"], "macro_f1": m["macro_f1"], "test_examples": len(test)}


def table(results: list[dict], args) -> str:
    lines = [
        f"model {args.model}, {args.epochs} epochs, batch {args.batch_size}, "
        f"{args.virtual_tokens} virtual tokens; lr {args.lr} (full FT {args.full_lr})",
        "| method | trainable parameters | train s | test accuracy | test macro-F1 |",
        "|---|---:|---:|---:|---:|",
    ]
    for r in results:
        lines.append(f"| {r['method']} | {r['trainable']:,} | {r['train_s']:.0f} | "
                     f"{r['accuracy']:.3f} | {r['macro_f1']:.3f} |")  # fmt: skip
    return "\n".join(lines)


if __name__ == "__main__":
    main()
