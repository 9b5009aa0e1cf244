"""Measure a prompt (or the bare base model) on data: loss and perplexity."""

from __future__ import annotations

import math

import torch
from torch import nn

from softprompt.data import Row, collate
from softprompt.prompt import SoftPrompt, lm_loss


@torch.no_grad()
def evaluate_loss(
    model: nn.Module, prompt: SoftPrompt | None, rows: list[Row], batch_size: int, pad_id: int
) -> dict[str, float]:
    """Mean next-token loss over labelled tokens (targets only for pairs) and perplexity."""
    device = model.get_input_embeddings().weight.device
    order = sorted(range(len(rows)), key=lambda i: len(rows[i].input_ids))  # little padding
    total, count = 0.0, 0
    for start in range(0, len(order), batch_size):
        batch = collate([rows[i] for i in order[start : start + batch_size]], pad_id)
        loss, n = lm_loss(model, prompt, {k: v.to(device) for k, v in batch.items()})
        total += float(loss)
        count += n
    mean = total / max(count, 1)
    return {"loss": mean, "ppl": math.exp(min(mean, 50.0)), "tokens": count}
