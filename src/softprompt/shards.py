"""Sharded loading (``--shard-model``): no process ever holds the whole model.

The model is built with its parameters on the meta device (no memory; buffers such as
rotary frequencies are computed as usual: accelerate's ``init_empty_weights`` with
``include_buffers=False``), its decoder layers are split across the processes by the
caller's ``shard`` (FSDP2's ``fully_shard``, which accepts meta parameters), and then each
process reads from the safetensors files only the rows of each layer weight it holds
(``safe_open(...).get_slice``: the file is memory-mapped, nothing else is read). The
embeddings, final norm and LM head are read whole on every process, as ``shard_layers``
keeps them whole. Every weight is read in pieces of at most 64 MiB, the file mapped anew
for each, so that the pages read of the file never sit beside the copy made of them.

Written by hand rather than through transformers' ``from_pretrained``: its low-memory
FSDP path (``FSDP_CPU_RAM_EFFICIENT_LOADING``, accelerate's) loads the whole model on rank 0
and broadcasts it, so one process still holds all of it; and its ``device_mesh`` loading is
for tensor parallelism, not FSDP's row shards.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path

import torch
from accelerate import init_empty_weights
from safetensors import safe_open
from torch import nn

from softprompt.console import say
from softprompt.errors import ConfigError, ModelLoadError


def sharded_model(folder: Path, config, auto_class, dtype: torch.dtype,
                  shard: Callable[[nn.Module], None], device="cpu") -> nn.Module:  # fmt: skip
    """The model in ``folder`` with ``shard`` applied before any weight exists, each process
    holding only its rows of the sharded parameters (on ``device``); frozen, in eval mode."""
    if getattr(config, "quantization_config", None):
        raise ConfigError("--shard-model reads plain safetensors weights; this model's are "
                          "pre-quantized: load it without --shard-model")  # fmt: skip
    with init_empty_weights(include_buffers=False):
        model = auto_class.from_config(config, dtype=dtype)
    shard(model)
    for module in model.modules():  # FSDP's shards first (their rows only), then the rest
        if any(isinstance(p, torch.distributed.tensor.DTensor) for p in module.parameters(False)):
            module.to_empty(device=device, recurse=False)
    params = dict(model.named_parameters())
    buffers = dict(model.named_buffers())
    read = total = 0  # values of the sharded parameters: read here, in the files
    for file in _weight_files(folder):
        with safe_open(str(file), framework="pt") as f:  # every weight's shape and dtype
            # from the file's header: one mapping, no weight read
            layout = {k: _shape_dtype(f, k) for k in f.keys()}
        for key, (shape, stored) in layout.items():
            with torch.no_grad():
                n = _load_one(model, params, buffers, file, key, shape, stored, dtype, device)
            if isinstance(params.get(key), torch.distributed.tensor.DTensor):
                read, total = read + n, total + params[key].numel()
    if total:  # (a shard that split nothing: a test of the loading alone)
        say(f"--shard-model: this process read {read / total:.0%} of the decoder layers' "
            f"{total / 1e6:.1f}M weights from {folder.name} (its rows only)")  # fmt: skip
    model.tie_weights()  # a tied head is not in the file: it is the embedding matrix
    for module in model.modules():  # buffers (rotary frequencies) were computed on the CPU
        for name, buf in module._buffers.items():
            if buf is not None:
                module._buffers[name] = buf.to(device)
    missing = [n for n, p in model.named_parameters() if p.device.type == "meta"]
    if missing:
        raise ModelLoadError(
            f"--shard-model: {folder} has no weights for {missing[0]} (and {len(missing) - 1} "
            "more); load it without --shard-model"
        )
    model.requires_grad_(False)
    return model.eval()


def _weight_files(folder: Path) -> list[Path]:
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [folder / n for n in names]
    if (folder / "model.safetensors").is_file():
        return [folder / "model.safetensors"]
    raise ModelLoadError(f"--shard-model reads safetensors weights; {folder} has no "
                         "model.safetensors (or its index)")  # fmt: skip


def _shape_dtype(f, key: str) -> tuple[list[int], torch.dtype]:
    """A weight's shape and stored dtype, from the open file's header (an empty slice of it
    names the dtype; a 0-d weight is read whole, being one number)."""
    piece = f.get_slice(key)
    shape = piece.get_shape()
    return shape, (piece[0:0].dtype if shape else f.get_tensor(key).dtype)


def _load_one(model, params: dict, buffers: dict, file: Path, key: str, shape: list[int],
              stored: torch.dtype, dtype, device) -> int:  # fmt: skip
    """Copy weight ``key`` of ``file`` into the model: a sharded parameter gets only this
    process's rows of it. Returns how many values were read."""
    if key in buffers:
        with safe_open(str(file), framework="pt") as f:
            buffers[key].copy_(f.get_tensor(key))
        return buffers[key].numel()
    if key not in params:
        raise ModelLoadError(
            f"--shard-model: {file.name} holds {key!r}, which this version of transformers "
            "does not name; load it without --shard-model"
        )
    param = params[key]
    if isinstance(param, torch.distributed.tensor.DTensor):
        local = param.to_local()  # FSDP2 shards dim 0 as torch.chunk does: ceil(n / P) rows each
        start = param.device_mesh.get_local_rank() * math.ceil(shape[0] / param.device_mesh.size())
        _read_rows(file, key, start, local)
        return local.numel()
    owner, _, leaf = key.rpartition(".")
    value = torch.empty(shape, dtype=dtype if stored.is_floating_point else stored,
                        device=device)  # fmt: skip
    _read_rows(file, key, 0, value)
    model.get_submodule(owner)._parameters[leaf] = nn.Parameter(value, requires_grad=False)
    return value.numel()


CHUNK_BYTES = 64 << 20


def _read_rows(file: Path, key: str, start: int, out: torch.Tensor) -> None:
    """Rows ``start, start + len(out)`` of weight ``key`` into ``out`` (converted to its
    dtype), at most ``CHUNK_BYTES`` of the file at a time, the file mapped anew for each
    piece: the pages of a piece leave this process's resident memory when its mapping
    closes, so a weight is never held twice (file pages and copy), the embedding matrix
    included."""
    if out.dim() == 0:
        with safe_open(str(file), framework="pt") as f:
            out.copy_(f.get_tensor(key))
        return
    row_bytes = max(1, out[0].numel() * out.element_size())
    step = max(1, CHUNK_BYTES // row_bytes)
    for a in range(0, out.shape[0], step):
        b = min(a + step, out.shape[0])
        with safe_open(str(file), framework="pt") as f:
            out[a:b].copy_(f.get_slice(key)[start + a : start + b])
