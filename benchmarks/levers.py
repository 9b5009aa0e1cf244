"""Each speed lever measured on the same batches: alone (against PEFT-like plain training)
and together. Sharing the virtual tokens needs the labelled-positions head path, so that
lever is measured on top of it. Run through bench_train.py (``--levers``), in its own process."""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

TEMPLATE = "Review: {input}\nSentiment:"

DATA = Path(__file__).resolve().parents[1] / "examples" / "sentiment"


def read(split: str, limit: int) -> list[dict]:
    """The first ``limit`` records of the shipped sentiment set's ``split``."""
    rows = [json.loads(x) for x in (DATA / f"{split}.jsonl").read_text().splitlines() if x]
    return rows[:limit]


def nonembedding_params(model) -> int:
    """Parameters the body multiplies per token (embeddings are a lookup, the head is apart)."""
    embed = model.get_input_embeddings().weight.numel()
    return sum(p.numel() for p in model.parameters()) - embed


def _batches(tok, args, pad_to: int | None) -> list[dict]:

    from softprompt.data import Example
    from softprompt.rows import batch_order, collate, tokenize

    recs = read("train", 8 * args.batch_size)
    exs = [Example(TEMPLATE.format(input=r["review"]), r["label"], "") for r in recs]
    rows = tokenize(exs, tok, 64)
    if pad_to:  # the fixed-length padding of the usual recipe
        order = [list(range(i, i + args.batch_size)) for i in range(0, len(rows), args.batch_size)]
    else:
        order = batch_order([len(r.input_ids) for r in rows], args.batch_size, 0, 0)
    out = []
    for idx in order[:4]:
        batch = collate([rows[i] for i in idx], tok.pad_token_id)
        if pad_to:
            extra = pad_to - batch["input_ids"].shape[1]
            batch = {
                k: torch.nn.functional.pad(v, (0, extra), value=v0)
                for (k, v), v0 in zip(batch.items(), (tok.pad_token_id, 0, -100))
            }
        out.append(batch)
    return out


def _time_steps(model, prompt, batches, **kw) -> float:
    from softprompt.loss import lm_loss

    loss, n = lm_loss(model, prompt, batches[0], **kw)  # warm-up
    (loss / n).backward()
    start = time.perf_counter()
    for batch in batches:
        loss, n = lm_loss(model, prompt, batch, **kw)
        (loss / n).backward()
        prompt.embedding.grad = None
    return (time.perf_counter() - start) / len(batches)


def run_levers(args) -> None:
    from softprompt import PromptConfig, init_prompt, load_model

    loaded = load_model(model=args.model, dtype="float32")  # cast per lever below
    model, tok = loaded.model, loaded.tokenizer
    prompt = init_prompt(model, tok, PromptConfig(num_virtual_tokens=args.virtual_tokens))
    fixed, bucketed = _batches(tok, args, 64), _batches(tok, args, None)
    plain = dict(fast_head=False, shared_prefix=False)
    configs = [  # (name, batches, lm_loss options, bf16)
        ("plain: pad to 64, full head, prompt per row, fp32", fixed, plain, False),
        ("alone: pad to the batch, bucketed", bucketed, plain, False),
        ("alone: LM head only at labels", fixed, dict(shared_prefix=False), False),
        ("head at labels + virtual tokens once per batch", fixed, {}, False),
        ("alone: bf16 weights", fixed, plain, True),
        ("all three fp32 levers", bucketed, {}, False),
        ("all three + bf16 weights", bucketed, {}, True),
    ]
    from softprompt.loading import resolve_dtype

    if resolve_dtype("auto") != "bfloat16":  # emulated bf16 runs a step for many minutes
        print("  bf16 levers skipped: this CPU only emulates bfloat16 (--dtype auto picks "
              "float32 here)", flush=True)  # fmt: skip
        configs = [c for c in configs if not c[3]]
    results = []
    for name, batches, kw, bf16 in configs:
        model.to(torch.bfloat16 if bf16 else torch.float32)
        seconds = _time_steps(model, prompt, batches, **kw)
        results.append({"lever": name, "s_per_step": seconds})
    base = results[0]["s_per_step"]
    for r in results:
        r["speedup"] = base / r["s_per_step"]
        print(f"  {r['lever']:<52s} {r['s_per_step']:.3f} s/step  {r['speedup']:.2f}x", flush=True)
    print(
        "RESULT "
        + json.dumps({"levers": results, "nonembedding_params": nonembedding_params(model)}),
        flush=True,
    )
