"""The prefix: the part of every sequence that is the same in every row, run once.

In a decoder the virtual tokens come first and attend only to each other, so their keys
and values do not depend on the row. ``run_prefix`` runs them once and keeps every
layer's keys and values; that one mechanism serves both sides:

- training (``hidden_after_prefix``): the prompts of a batch (one, or one per task) run
  once, each row reads its prompt's keys/values from the cache, and the gradient flows back
  through the cache to the prompt;
- inference (``compile_prefix``): a trained prompt runs once when it is loaded and its
  keys/values are kept (a ``Prefix``), so a tuned request costs what a base request costs.

Every layer keeps all the prefix's entries, a sliding-window layer too: the attention masks
apply any window, and rows of a mixed batch may need different numbers of entries.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from transformers import DynamicCache

from softprompt.prompt import SoftPrompt, embed_tokens


@dataclass(eq=False)  # holds tensors: compare by identity
class Prefix:
    """A soft prompt compiled for one model: its embeddings and per-layer keys/values."""

    embeds: Tensor  # (N, H), the model's dtype
    keys: list[Tensor]  # per layer, (1, KV heads, N, head dim)
    values: list[Tensor]

    @property
    def length(self) -> int:
        return self.embeds.shape[0]


PromptLike = SoftPrompt | Prefix | None


def run_prefix(model: nn.Module, embeds: Tensor) -> tuple[DynamicCache, Tensor]:
    """Run prefixes ``embeds`` (K, P, H) alone through the model's body: the cache of every
    layer's keys/values (K rows of P entries) and the last hidden states (K, P, H)."""
    cache = DynamicCache()  # no config: plain full layers, nothing dropped
    mask = torch.ones(embeds.shape[:2], dtype=torch.long, device=embeds.device)
    out = model.base_model(
        inputs_embeds=embeds, attention_mask=mask, past_key_values=cache, use_cache=True
    )
    return cache, out.last_hidden_state


def hidden_after_prefix(
    model: nn.Module, virtual: Tensor, which: Tensor, batch: dict[str, Tensor]
) -> Tensor:
    """Final hidden states that predict each text token: (B, T, H), where column 0 is the
    last virtual token's state (it predicts the first text token).

    ``virtual`` (K, N, H) runs once (batch K, usually 1); row i then reads prompt
    ``which[i]``'s keys and values from the shared cache. Rows are right-padded.
    """
    ids, mask = batch["input_ids"], batch["attention_mask"]
    b, n = ids.shape[0], virtual.shape[1]
    weight = model.get_input_embeddings().weight
    cache, head = run_prefix(model, virtual.to(weight.dtype))  # the prompts, once
    cache.batch_select_indices(which)  # (K, kv, N, d) -> (B, kv, N, d), differentiable
    full_mask = torch.cat([mask.new_ones(b, n), mask], dim=1)  # (B, N+T)
    text = model.base_model(
        inputs_embeds=embed_tokens(model, ids),
        attention_mask=full_mask,
        past_key_values=cache,
        use_cache=True,
    ).last_hidden_state  # (B, T, H)
    last_virtual = head[which, -1:]  # (B, 1, H)
    return torch.cat([last_virtual, text[:, :-1]], dim=1)[:, : ids.shape[1]]


@torch.no_grad()
def compile_prefix(model: nn.Module, prompt: SoftPrompt) -> Prefix:
    """Run the prompt alone through the model (batch 1) and keep every layer's keys/values."""
    weight = model.get_input_embeddings().weight
    embeds = prompt.embedding.detach().to(device=weight.device, dtype=weight.dtype)  # (N, H)
    cache, _ = run_prefix(model, embeds[None])
    keys = [layer.keys for layer in cache.layers]
    values = [layer.values for layer in cache.layers]
    return Prefix(embeds=embeds, keys=keys, values=values)


def compile_all(model: nn.Module, prompts: Sequence[PromptLike]) -> list[Prefix | None]:
    """Compile each distinct SoftPrompt once; prefixes and None pass through."""
    done: dict[int, Prefix] = {}
    out = []
    for p in prompts:
        if isinstance(p, SoftPrompt):
            if id(p) not in done:
                done[id(p)] = compile_prefix(model, p)
            p = done[id(p)]
        out.append(p)
    return out
