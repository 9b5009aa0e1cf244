"""The prefix: the part of every sequence that is the same in every row, run once.

In a decoder, everything up to the last virtual token attends only to itself: the virtual
tokens, and the constant head before them when the prompt sits inside the text (a BOS, a
template's text before ``{soft_prompt}``, a chat's system turn). Its keys and values do not
depend on the row. ``run_prefix`` runs a prefix once and keeps every layer's keys and
values; that one mechanism serves both sides:

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
    """A soft prompt compiled for one model, behind its head tokens (if any): the embeddings
    and per-layer keys/values of [head][virtual tokens]."""

    embeds: Tensor  # (P, H), the model's dtype; P = head tokens + N
    keys: list[Tensor]  # per layer, (1, KV heads, P, head dim)
    values: list[Tensor]
    head: tuple[int, ...] = ()  # the head's token ids

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
    model: nn.Module, prefix: Tensor, which: Tensor, batch: dict[str, Tensor]
) -> Tensor:
    """Final hidden states that predict each text token: (B, T, H), where column 0 is the
    prefix's last state (it predicts the first text token).

    ``prefix`` (K, P, H) runs once (batch K, usually 1: one prompt, with its head if any);
    row i then reads prefix ``which[i]``'s keys and values from the shared cache. The batch's
    rows (B, T) are what follows the prefix, right-padded.
    """
    ids, mask = batch["input_ids"], batch["attention_mask"]
    b, n = ids.shape[0], prefix.shape[1]
    weight = model.get_input_embeddings().weight
    cache, head = run_prefix(model, prefix.to(weight.dtype))  # the prompts, once
    cache.batch_select_indices(which)  # (K, kv, N, d) -> (B, kv, N, d), differentiable
    full_mask = torch.cat([mask.new_ones(b, n), mask], dim=1)  # (B, N+T)
    text = model.base_model(
        inputs_embeds=embed_tokens(model, ids),
        attention_mask=full_mask,
        past_key_values=cache,
        use_cache=True,
    ).last_hidden_state  # (B, T, H)
    last = head[which, -1:]  # (B, 1, H)
    return torch.cat([last, text[:, :-1]], dim=1)[:, : ids.shape[1]]


def with_head(model: nn.Module, virtual: Tensor, head: Sequence[int]) -> Tensor:
    """[head tokens][virtual tokens] as embeddings (P, H) in the model's dtype; ``virtual``
    (N, H) keeps its gradient."""
    weight = model.get_input_embeddings().weight
    virtual = virtual.to(device=weight.device, dtype=weight.dtype)
    if not head:
        return virtual
    ids = torch.tensor([list(head)], device=weight.device)
    return torch.cat([embed_tokens(model, ids)[0], virtual])


@torch.no_grad()
def compile_prefix(model: nn.Module, prompt: SoftPrompt, head: Sequence[int] = ()) -> Prefix:
    """Run the prompt (behind its ``head`` tokens) alone through the model, batch 1, and keep
    every layer's keys/values."""
    embeds = with_head(model, prompt.embedding.detach(), head)  # (P, H)
    cache, _ = run_prefix(model, embeds[None])
    keys = [layer.keys for layer in cache.layers]
    values = [layer.values for layer in cache.layers]
    return Prefix(embeds=embeds, keys=keys, values=values, head=tuple(head))


def compile_all(
    model: nn.Module,
    prompts: Sequence[PromptLike],
    heads: Sequence[Sequence[int] | None] | None = None,
) -> list[Prefix | None]:
    """Compile each distinct (SoftPrompt, head) once; prefixes and None pass through."""
    heads = heads or [()] * len(prompts)
    done: dict[tuple, Prefix] = {}
    out = []
    for p, head in zip(prompts, heads):
        if isinstance(p, SoftPrompt):
            key = (id(p), tuple(head or ()))
            if key not in done:
                done[key] = compile_prefix(model, p, head or ())
            p = done[key]
        out.append(p)
    return out


def embeds_only(model: nn.Module, prompt: SoftPrompt) -> Prefix:
    """A prompt kept as its embeddings alone, with no per-layer keys/values: for a model that
    runs it as plain inputs (an encoder's input, or a decoder whose cache cannot hold it)."""
    dtype = model.get_input_embeddings().weight.dtype
    return Prefix(prompt.embedding.detach().to(dtype), [], [])
