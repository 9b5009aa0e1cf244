"""How bfloat16 weights change what prompt tuning learns from: loss and prompt gradient
against float32 on the same batch, with the LM head in bfloat16 or float32.

    python benchmarks/precision.py [--model M] [--rows 16]

Prints the loss, the cosine between each gradient and float32's, and the relative error of
its norm. (The accuracy effect of a whole bf16 training run is in bench_train.py.)
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    from softprompt import PromptConfig, SoftPrompt, init_prompt, load_model
    from softprompt import loss as loss_mod
    from softprompt.data import Example
    from softprompt.loss import lm_loss
    from softprompt.rows import collate, tokenize

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="embedded")
    p.add_argument("--rows", type=int, default=16)
    args = p.parse_args()
    loaded = load_model(model=args.model, dtype="float32")  # the reference: cast to bf16 below
    model, tok = loaded.model, loaded.tokenizer
    path = ROOT / "examples" / "sentiment" / "train.jsonl"
    recs = [json.loads(x) for x in path.read_text().splitlines()][: args.rows]
    exs = [Example(f"Review: {r['review']}\nSentiment:", r["label"], "") for r in recs]
    batch = collate(tokenize(exs, tok, 256), tok.pad_token_id)
    start = init_prompt(model, tok, PromptConfig()).embedding.detach()

    def loss_and_grad() -> tuple[float, torch.Tensor]:
        prompt = SoftPrompt(start)
        loss, n = lm_loss(model, prompt, batch)
        (loss / n).backward()
        return float(loss.detach()) / n, prompt.embedding.grad.clone()

    results = {"float32": loss_and_grad()}
    model.to(torch.bfloat16)
    results["bfloat16"] = loss_and_grad()
    head32 = model.get_output_embeddings().weight.float()
    original = loss_mod.head_logits
    loss_mod.head_logits = lambda m, h, ids=None: F.linear(
        h.float(), head32
    )  # the head alone in fp32
    try:
        results["bfloat16 body, float32 head"] = loss_and_grad()
    finally:
        loss_mod.head_logits = original
    ref = results["float32"][1]
    print("| weights | loss | gradient cosine to fp32 | gradient error (relative) |")
    print("| --- | --- | --- | --- |")
    for name, (loss, grad) in results.items():
        cos = F.cosine_similarity(grad.flatten(), ref.flatten(), dim=0).item()
        err = ((grad - ref).norm() / ref.norm()).item()
        print(f"| {name} | {loss:.5f} | {cos:.4f} | {err:.3f} |")


if __name__ == "__main__":
    main()
