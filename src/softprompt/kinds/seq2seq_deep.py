"""Deep prompts on encoder-decoders: keys/values before the decoder's own, in each decoder
self-attention layer, where PEFT's SEQ_2_SEQ_LM prefix tuning puts them (the encoder and the
cross-attention untouched). Held per decoder layer, as a decoder LM's; PEFT's order of the
saved tensor is ``to_peft``/``from_peft``. Training and scoring build the cache once per
batch (``decoder_prefix``); generation packs each row's compiled prompt (``packed_prefixes``).
"""

from __future__ import annotations

import weakref
from collections.abc import Sequence

import torch
from torch import Tensor, nn
from transformers import DynamicCache, EncoderDecoderCache

from softprompt.errors import SoftpromptError
from softprompt.prefix import Prefix, PromptLike, compile_prefix, deep_cache, kv_layout
from softprompt.prompt import DeepPrompt, deep_layout, is_deep, rows_prompts


def deep_row(prompt) -> bool:
    """Whether a row's prompt is a deep one (trained, or compiled to keys/values)."""
    return is_deep(prompt) or isinstance(prompt, Prefix) and prompt.deep


def decoder_prefix(model: nn.Module, prompt, batch: dict[str, Tensor]) -> EncoderDecoderCache:
    """The decoder's cache for a batch: row i's deep prompt (``batch["task"]`` picks it from a
    PromptSet) in the self-attention part, built once from the batch's prompts and selected
    per row (differentiable); the cross-attention part empty (the model fills it from the
    encoder's output), as PEFT's prefix tuning leaves it."""
    flat, which = rows_prompts(prompt, batch)
    return EncoderDecoderCache(deep_cache(model, flat, deep_layout(prompt), which), DynamicCache())


def compiled_deep(model: nn.Module, prompts: Sequence[PromptLike]) -> list[Prefix | None]:
    """Each row's deep prompt as keys/values (compiled once per prompt); None for a row
    without one (no prompt, or an input-layer prompt, which goes before the encoder)."""
    done: dict[int, Prefix] = {}
    out = []
    for p in prompts:
        if isinstance(p, DeepPrompt):
            p = done[id(p)] if id(p) in done else done.setdefault(id(p), compile_prefix(model, p))
        out.append(p if isinstance(p, Prefix) and p.deep else None)
    return out


def packed_prefixes(model: nn.Module, prefixes: Sequence[Prefix | None]) -> dict:
    """``generate``'s extra arguments for rows whose deep prompts are ``prefixes``: their
    keys/values right-aligned in one decoder cache, and, where the rows' prompts differ in
    length (or some have none), a decoder mask that hides the empty slots. Empty slots move
    the decoder's positions along, which a model with relative positions (T5) does not see
    and one with absolute positions (BART) does: there such rows are refused as a batch (the
    server then runs each alone)."""
    if all(p is None for p in prefixes):
        return {}
    lengths = [p.length if p is not None else 0 for p in prefixes]
    c, b = max(lengths), len(prefixes)
    if len(set(lengths)) > 1 and not pads_exactly(model):
        raise SoftpromptError(
            f"{model.config.model_type}: rows whose deep prompts differ in length (or that have "
            "none) cannot share a batch: its decoder's positions count the prompt; run them "
            "apart (one prompt per batch)"
        )
    template = next(p for p in prefixes if p is not None)
    layers = []
    for layer, (k0, v0) in enumerate(zip(template.keys, template.values)):
        keys = k0.new_zeros(b, k0.shape[1], c, k0.shape[3])  # (B, heads, C, head dim)
        values = v0.new_zeros(b, v0.shape[1], c, v0.shape[3])
        for i, (p, n) in enumerate(zip(prefixes, lengths)):
            if n:
                keys[i, :, c - n :] = p.keys[layer][0]
                values[i, :, c - n :] = p.values[layer][0]
        layers.append((keys, values))
    both = EncoderDecoderCache(DynamicCache(ddp_cache_data=layers), DynamicCache())
    if len(set(lengths)) == 1:
        return {"past_key_values": both}
    mask = torch.ones(b, c + 1, dtype=torch.long, device=template.keys[0].device)  # + start
    for i, n in enumerate(lengths):
        mask[i, : c - n] = 0
    return {"past_key_values": both, "decoder_attention_mask": mask}


_PADS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


@torch.no_grad()
def pads_exactly(model: nn.Module) -> bool:
    """Whether a masked slot before the decoder's deep prompt changes nothing: true where
    the decoder's positions are relative (T5's attention bias), false where they count from
    the cache's start (BART's learned positions). Checked once, on the model itself."""
    if model not in _PADS:
        layers, heads, dim = kv_layout(model)
        weight = model.get_input_embeddings().weight
        ids = torch.tensor([[1, 2]], device=weight.device)
        decoder = torch.tensor([[0, 3]], device=weight.device)

        def logits(pad: int) -> Tensor:
            kv = [(weight.new_ones(1, heads, pad + 1, dim),) * 2] * layers
            cache = EncoderDecoderCache(DynamicCache(ddp_cache_data=kv), DynamicCache())
            mask = torch.ones(1, pad + 3, dtype=torch.long, device=weight.device)
            mask[:, :pad] = 0
            return model(input_ids=ids, decoder_input_ids=decoder, decoder_attention_mask=mask,
                         past_key_values=cache, use_cache=True).logits.float()  # fmt: skip

        # masked slots add exact zeros; a shifted position moves the logits far more
        _PADS[model] = bool(torch.allclose(logits(0), logits(1), atol=1e-3, rtol=1e-3))
    return _PADS[model]


def peft_layers(layers: int) -> int:
    """The layer count PEFT's SEQ_2_SEQ_LM prefix is saved with, for a decoder of
    ``layers``. PEFT 0.21 doubles its tensor's L blocks, splits the 4L in fours and gives
    decoder layer i block 2i mod L as self-attention keys/values (the other pair goes to the
    cross-attention cache, which it empties). With L odd that reaches each layer with its own
    block; with L even, layers i and i + L/2 would share one and half the blocks would be
    unused, so an even decoder is saved as L + 1 blocks, one of them zeros and unused."""
    return layers if layers % 2 else layers + 1


def to_peft(flat: Tensor, layers: int) -> Tensor:
    """A deep prompt held per decoder layer (N, layers x 2 x KV width) in PEFT's order
    (N, ``peft_layers(layers)`` x 2 x KV width): layer i's keys/values in block 2i mod L'."""
    n, total = flat.shape[0], peft_layers(layers)
    blocks = flat.reshape(n, layers, -1)
    out = blocks.new_zeros(n, total, blocks.shape[2])
    out[:, [2 * i % total for i in range(layers)]] = blocks
    return out.reshape(n, -1)


def from_peft(rows: Tensor, saved: int, layers: int) -> Tensor:
    """``to_peft`` undone (and a PEFT-saved prefix of ``saved`` layers read as PEFT reads
    it): decoder layer i's keys/values are block 2i mod ``saved``."""
    n = rows.shape[0]
    return rows.reshape(n, saved, -1)[:, [2 * i % saved for i in range(layers)]].reshape(n, -1)
