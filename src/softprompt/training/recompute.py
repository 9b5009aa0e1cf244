"""Activation checkpointing (``--gradient-checkpointing``): the frozen decoder layers keep
none of their activations for backward and run again when backward reaches them.

Written here rather than through Hugging Face's ``gradient_checkpointing_enable``: that
mechanism acts only in ``train()`` mode and, for every layer that writes a key/value cache,
turns the cache off (``use_cache=False``, ``past_key_values=None``). softprompt's shared
prefix is a cache that the rows read (``prefix.run_prefix`` then ``text_after``), so it would
be silently dropped. Instead each decoder layer's ``forward`` runs inside
``torch.utils.checkpoint.checkpoint(use_reentrant=False)``, the model stays in eval mode (no
dropout, the same function as without), and the one thing a replay must not repeat is
undone: a layer appends its keys/values to the cache it is given, so before the replay the
cache's layers are put back as they were before the first run (references, no copies). The
prefix still runs once per batch forward, the head only where labels are, and the gradient
reaching the prompt through the cache is the plain path's (tests/test_recompute.py).

Module hooks (FSDP2's weight gathers) stay outside the checkpoint, as in torchtitan and in
transformers' own wrapper: only ``forward`` is replaced, per instance.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from functools import partial

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint
from transformers import Cache

from softprompt.loading import decoder_layers

_WRAPPED = "_softprompt_recompute"  # the per-instance flag: replay this layer in backward


@contextmanager
def recomputing(model: nn.Module, on: bool = True) -> Iterator[None]:
    """Within the block (``on``), every decoder layer of ``model`` recomputes its activations
    in backward instead of keeping them; afterwards the model is as it was."""
    if not on:
        yield
        return
    layers = decoder_layers(model)
    for layer in layers:
        if not hasattr(layer, _WRAPPED):
            layer.forward = partial(_checkpointed, layer, layer.forward)
        setattr(layer, _WRAPPED, True)
    try:
        yield
    finally:
        for layer in layers:
            setattr(layer, _WRAPPED, False)


def _checkpointed(layer: nn.Module, forward, *args, **kwargs):
    if not (getattr(layer, _WRAPPED, False) and torch.is_grad_enabled()):
        return forward(*args, **kwargs)  # validation, generation: nothing to keep anyway
    caches = [x for x in (*args, *kwargs.values()) if isinstance(x, Cache)]
    before = [_state(c) for c in caches]

    def run(*a, **k):
        for cache, state in zip(caches, before):
            _restore(cache, state)  # a replay appends to the cache as the first run did
        return forward(*a, **k)

    out = checkpoint(run, *args, use_reentrant=False, **kwargs)
    # Keep only the layers this one wrote (its own): the others' tensors need not live on.
    before[:] = [(count, [(x, attrs) for x, attrs in layers if _changed(x, attrs)])
                 for count, layers in before]  # fmt: skip
    return out


def _state(cache: Cache) -> tuple[int, list[tuple[object, dict]]]:
    """How many layers the cache has, and each one's attributes (tensor references)."""
    return len(cache.layers), [(layer, dict(vars(layer))) for layer in cache.layers]


def _changed(layer: object, attrs: dict) -> bool:
    now = vars(layer)
    return now.keys() != attrs.keys() or any(now[k] is not v for k, v in attrs.items())


def _restore(cache: Cache, state: tuple[int, list[tuple[object, dict]]]) -> None:
    count, layers = state
    del cache.layers[count:]  # layers made by the first run are made again (lazily)
    for layer, attrs in layers:
        vars(layer).clear()
        vars(layer).update(attrs)
