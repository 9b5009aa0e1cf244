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

import weakref
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from transformers import DynamicCache, EncoderDecoderCache

from softprompt.errors import ConfigError
from softprompt.prompt import DeepPrompt, SoftPrompt, embed_tokens


@dataclass(eq=False)  # holds tensors: compare by identity
class Prefix:
    """A soft prompt compiled for one model, behind its head tokens (if any): the embeddings
    and per-layer keys/values of [head][virtual tokens]."""

    embeds: Tensor | None  # (P, H), the model's dtype; P = head tokens + N; None: deep
    keys: list[Tensor]  # per layer, (1, KV heads, P, head dim)
    values: list[Tensor]
    head: tuple[int, ...] = ()  # the head's token ids

    @property
    def length(self) -> int:
        return self.keys[0].shape[2] if self.embeds is None else self.embeds.shape[0]

    @property
    def deep(self) -> bool:
        """A deep prompt's keys/values: they exist only in the cache (no input vectors)."""
        return self.embeds is None

    @property
    def nbytes(self) -> int:
        """Memory the compiled prefix holds (embeddings and every layer's keys/values)."""
        parts = [*self.keys, *self.values] + ([self.embeds] if self.embeds is not None else [])
        return sum(t.numel() * t.element_size() for t in parts)


PromptLike = SoftPrompt | Prefix | None


def run_prefix(model: nn.Module, embeds: Tensor) -> tuple[DynamicCache, Tensor]:
    """Run prefixes ``embeds`` (K, P, H) alone through the model's body: the cache of every
    layer's keys/values (K rows of P entries) and the last hidden states (K, P, H).

    An encoder-decoder keeps a deep prompt in its decoder's self-attention (as PEFT's
    SEQ_2_SEQ_LM prefix tuning does): there the prefixes run through the decoder, which
    reads the encoder's output of the same prefixes, and the cache is the decoder's."""
    mask = torch.ones(embeds.shape[:2], dtype=torch.long, device=embeds.device)
    if getattr(model.config, "is_encoder_decoder", False):
        encoded = model.get_encoder()(inputs_embeds=embeds, attention_mask=mask)
        both = EncoderDecoderCache(DynamicCache(), DynamicCache())
        out = model.get_decoder()(inputs_embeds=embeds, attention_mask=mask,
                                  encoder_hidden_states=encoded.last_hidden_state,
                                  encoder_attention_mask=mask, past_key_values=both,
                                  use_cache=True)  # fmt: skip
        return both.self_attention_cache, out.last_hidden_state
    cache = DynamicCache()  # no config: plain full layers, nothing dropped
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
    weight = model.get_input_embeddings().weight
    cache, head = run_prefix(model, prefix.to(weight.dtype))  # the prompts, once
    cache.batch_select_indices(which)  # (K, kv, N, d) -> (B, kv, N, d), differentiable
    text = text_after(model, cache, batch)  # (B, T, H)
    last = head[which, -1:]  # (B, 1, H)
    return torch.cat([last, text[:, :-1]], dim=1)[:, : text.shape[1]]


def text_after(model: nn.Module, cache: DynamicCache, batch: dict[str, Tensor]) -> Tensor:
    """Final hidden states (B, T) of the batch's rows run after the cache's entries (each
    row's own, all visible to it)."""
    ids, mask = batch["input_ids"], batch["attention_mask"]
    full_mask = torch.cat([mask.new_ones(ids.shape[0], cache.get_seq_length()), mask], dim=1)
    return model.base_model(
        inputs_embeds=embed_tokens(model, ids),
        attention_mask=full_mask,
        past_key_values=cache,
        use_cache=True,
    ).last_hidden_state


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
    every layer's keys/values (a deep prompt: its own keys/values, nothing to run)."""
    if isinstance(prompt, DeepPrompt):
        if head:
            raise ConfigError("a deep prompt sits before everything: it takes no head tokens")
        check_layout(model, prompt)
        keys, values = deep_layers(prompt.embedding.detach()[None], prompt.layout,
                                   model.get_input_embeddings().weight.dtype)  # fmt: skip
        return Prefix(embeds=None, keys=keys, values=values)
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


# --- deep prompts: trained keys/values read from the cache ---------------------------------

_LAYOUTS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


@torch.no_grad()
def kv_layout(model: nn.Module) -> tuple[int, int, int]:
    """(layers, KV heads, head dim) of what the model's cache holds per token, read from the
    cache of one token run through it (so grouped-query attention and a head dim that is not
    hidden / heads come out as the model has them). Refused in one line where the layers
    differ or there is no attention cache (a recurrent or state-space layer)."""
    if model not in _LAYOUTS:
        weight = model.get_input_embeddings().weight
        try:
            cache, _ = run_prefix(model, weight.new_zeros(1, 1, weight.shape[1]))
            shapes = {(layer.keys.shape[1], layer.keys.shape[3]) for layer in cache.layers}
            shapes |= {(layer.values.shape[1], layer.values.shape[3]) for layer in cache.layers}
        except (AttributeError, RuntimeError, TypeError, ValueError):
            shapes = set()
        if len(shapes) != 1:
            raise ConfigError(
                f"{model.config.model_type}: its layers do not all keep keys and values of one "
                "shape in an attention cache, so a deep prompt (--method prefix) cannot sit in "
                "it; use --method prompt"
            )
        ((heads, dim),) = shapes
        _LAYOUTS[model] = (len(cache.layers), heads, dim)
    return _LAYOUTS[model]


def check_layout(model: nn.Module, prompt: DeepPrompt) -> None:
    """Refuse a deep prompt made for attention of another shape, in one line."""
    if prompt.layout != kv_layout(model):
        raise ConfigError(
            f"this deep prompt holds keys/values for {prompt.layers} layers of "
            f"{prompt.kv_heads} x {prompt.head_dim}; the model has "
            "{} layers of {} x {}: it was made for another model".format(*kv_layout(model))
        )


def deep_layers(flat: Tensor, layout: tuple[int, int, int], dtype) -> tuple[list, list]:
    """Per-layer keys and values, each (K, KV heads, N, head dim) in ``dtype``, of K deep
    prompts ``flat`` (K, N, layers x 2 x KV width) in PEFT's layout; differentiable."""
    layers, heads, dim = layout
    k, n = flat.shape[:2]
    kv = flat.to(dtype).view(k, n, layers, 2, heads, dim).permute(2, 3, 0, 4, 1, 5)
    return list(kv[:, 0].unbind(0)), list(kv[:, 1].unbind(0))


def deep_flat(keys: Sequence[Tensor], values: Sequence[Tensor]) -> Tensor:
    """``deep_layers`` undone for one prompt: (N, layers x 2 x KV width), float32."""
    kv = torch.stack([torch.stack([k[0], v[0]]) for k, v in zip(keys, values)])  # (L,2,h,N,d)
    n = kv.shape[3]
    return kv.permute(3, 0, 1, 2, 4).reshape(n, -1).float()


@torch.no_grad()
def deepen(model: nn.Module, prompt: SoftPrompt) -> DeepPrompt:
    """The deep prompt that starts where ``prompt`` (an input-layer prompt) is: its keys and
    values as the frozen model computes them, so the two give the same outputs at step 0
    (the text after it sees the same cache at the same positions)."""
    if isinstance(prompt, DeepPrompt):
        return prompt
    layout = kv_layout(model)
    weight = model.get_input_embeddings().weight
    cache, _ = run_prefix(model, prompt.embedding.detach().to(weight)[None])
    keys = [layer.keys.float() for layer in cache.layers]
    values = [layer.values.float() for layer in cache.layers]
    return DeepPrompt(deep_flat(keys, values).cpu(), *layout)


def cache_of(keys: Sequence[Tensor], values: Sequence[Tensor]) -> DynamicCache:
    """A cache holding these keys and values per layer (B, KV heads, N, D), as plain full
    layers: the attention masks apply any sliding window."""
    cache = DynamicCache()
    for i, (k, v) in enumerate(zip(keys, values)):
        cache.update(k, v, i)
    return cache


def deep_cache(model: nn.Module, flat: Tensor, layout: tuple[int, int, int],
               which: Tensor) -> DynamicCache:  # fmt: skip
    """A cache holding deep prompt ``which[i]`` of ``flat`` (K, N, ...) for row i: built once
    per batch from the K prompts, rows selected (differentiable)."""
    cache = cache_of(*deep_layers(flat, layout, model.get_input_embeddings().weight.dtype))
    cache.batch_select_indices(which)
    return cache


def hidden_after_deep(
    model: nn.Module, flat: Tensor, layout: tuple[int, int, int], which: Tensor,
    batch: dict[str, Tensor],
) -> Tensor:  # fmt: skip
    """``hidden_after_prefix`` for deep prompts ``flat`` (K, N, layers x 2 x KV width): each
    row reads its prompt's keys/values from the cache (built once per batch, selected per
    row without copying the parameter per row in the graph's leaves). Column 0 is zeros:
    nothing before the text predicts its first token (callers drop that position)."""
    text = text_after(model, deep_cache(model, flat, layout, which), batch)  # (B, T, H)
    return torch.cat([torch.zeros_like(text[:, :1]), text[:, :-1]], dim=1)
