"""A quantized frozen base (``--quantize int8|nf4``): the decoder layers' linear weights are
stored in 8 or 4 bits and de-quantized as each layer runs; activations, the gradient that
flows back through the layers to the prompt, the embeddings, the LM head and the loss keep
the model's dtype (float32 or bfloat16). Only the prompt learns, so nothing is ever written
back into a quantized weight.

Through torchao (PyTorch's own quantization library), which runs on CPU and CUDA alike:
- int8: ``Int8WeightOnlyConfig``, one scale per output channel;
- nf4: ``to_nf4``, QLoRA's 4-bit NormalFloat with double-quantized scales (blocks of 64
  weights; the scales' blocks shrink to fit a small layer).
bitsandbytes (PEFT's usual route) is not used: its kernels want CUDA and this package must
train on CPU too; torchao's tensors do both.

Memory: transformers loads each weight as a view of the mapped safetensors file, so the
pages read of it stay resident until the whole mapping closes. Each float weight's pages
are given back as soon as it is quantized or copied out of the file (``_page_out``, in
pieces of 64 MiB), so loading never holds a weight twice; ``benchmarks/bench_big.py``
reports the peak against a float32 base. Quantizing while reading (transformers'
``TorchAoConfig``) was not tried.
"""

from __future__ import annotations

import ctypes
import math
import os
import sys
from pathlib import Path

import torch
from torch import nn

from softprompt.config import QUANTIZE_CHOICES
from softprompt.errors import ConfigError

NF4_BLOCK, NF4_SCALER_BLOCK = 64, 256  # QLoRA's and torchao's defaults
_ATTR = "softprompt_quantization"  # set on a quantized model: what was done to it


def quantization(model: nn.Module) -> str | None:
    """How the model's layers were quantized by ``quantize_base`` (None: they were not)."""
    return getattr(model, _ATTR, None)


def quantize_base(model: nn.Module, how: str, layers: nn.Module) -> int:
    """Quantize every ``nn.Linear`` inside ``layers`` (the decoder stack: the embeddings and
    LM head stay as they are) in place; returns how many were quantized."""
    if how == "none":
        return 0
    linears = [m for m in layers.modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise ConfigError(f"--quantize {how}: {type(model).__name__} has no linear layers in its "
                          "decoder stack to quantize; leave --quantize out")  # fmt: skip
    _quiet_import()
    if how == "int8":
        from torchao.quantization import Int8WeightOnlyConfig, quantize_

        for m in linears:
            old = m.weight.detach()
            quantize_(m, Int8WeightOnlyConfig())
            m.__class__ = Int8Linear  # backward from the int8 weight, not a float copy
            _page_out(old)
            _give_back()
    elif how == "nf4":
        from torchao.quantization import to_nf4

        for m in linears:
            old = m.weight.detach()
            m.weight = nn.Parameter(_nf4(old, to_nf4), requires_grad=False)
            _page_out(old)
            _give_back()
    else:
        raise ConfigError(f"--quantize must be one of {', '.join(QUANTIZE_CHOICES)}, not {how!r}")
    _off_the_file(model)
    _give_back()
    setattr(model, _ATTR, how)
    return len(linears)


class _Int8Matmul(torch.autograd.Function):
    """``x @ W.T + b`` for a frozen int8 weight, whose backward de-quantizes ``W`` again.

    torchao's own linear for an ``Int8Tensor`` saves the de-quantized float weight for
    backward: while a batch is in flight every quantized layer holds a float copy of its
    weight, so training on an int8 base peaked above a float32 one (bench_big). Here only
    the int8 weight, which the layer holds anyway, is kept; backward pays one more
    de-quantization per layer. The weight gets no gradient (the base is frozen)."""

    @staticmethod
    def forward(ctx, x, weight, bias):
        ctx.weight = weight  # the parameter itself: no copy
        with torch.no_grad():
            return nn.functional.linear(x, weight, bias)

    @staticmethod
    def backward(ctx, grad):
        weight = ctx.weight.dequantize().to(grad.dtype)
        return grad @ weight, None, None


class Int8Linear(nn.Linear):
    """An ``nn.Linear`` whose weight torchao made int8 (``Int8WeightOnlyConfig``), with the
    backward of ``_Int8Matmul``; its state is an ``nn.Linear``'s."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not torch.is_grad_enabled() or not x.requires_grad:
            return nn.functional.linear(x, self.weight, self.bias)
        return _Int8Matmul.apply(x, self.weight, self.bias)


def _give_back() -> None:
    """Return freed memory to the system (glibc's ``malloc_trim``; elsewhere nothing): the
    float weights replaced layer by layer are freed in pieces that glibc would keep."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _off_the_file(model: nn.Module) -> None:
    """Copy the weights left as they were into memory of their own. transformers maps the
    safetensors file and its tensors are views of that mapping, which stays resident while
    any of them lives: the embeddings would keep every layer's replaced float weights."""
    for p in [*model.parameters(), *model.buffers()]:
        if type(p) in (nn.Parameter, torch.Tensor) and not p.is_meta:
            p.data = _copy_out(p.data)


def _copy_out(old: torch.Tensor) -> torch.Tensor:
    """A copy of ``old`` in memory of its own, made 64 MiB at a time, each piece's file pages
    given back once copied (``_page_out``): the two never both sit whole in memory."""
    if old.dim() == 0 or not old.is_contiguous():
        new = old.clone()
        _page_out(old)
        return new
    new = torch.empty_like(old)
    step = max(1, (64 << 20) // max(1, old[0].numel() * old.element_size()))
    for a in range(0, old.shape[0], step):
        new[a : a + step].copy_(old[a : a + step])
        _page_out(old[a : a + step])
    return new


MADV_DONTNEED = 4


def _weight_file_ranges() -> list[tuple[int, int]]:
    """(start, end) of this process's private mappings of ``.safetensors`` files, from
    /proc/self/maps (empty elsewhere than Linux)."""
    try:
        lines = Path("/proc/self/maps").read_text().splitlines()
    except OSError:
        return []
    ranges = []
    for line in lines:
        parts = line.split(maxsplit=5)
        if len(parts) == 6 and parts[1][3:] == "p" and parts[5].endswith(".safetensors"):
            start, end = (int(x, 16) for x in parts[0].split("-"))
            ranges.append((start, end))
    return ranges


def _page_out(t: torch.Tensor) -> None:
    """Take the pages of ``t``, a weight just copied or replaced, out of this process's
    resident memory now. transformers loads a weight as a view of the mapped safetensors
    file, and the pages read of it would otherwise stay resident until the whole mapping
    closes, beside the copy: for the embedded model, the whole embedding matrix twice.

    Only whole pages inside ``t`` and inside a private mapping of a ``.safetensors`` file
    are named (``madvise(MADV_DONTNEED)``): such a page is read again from the file if
    anything touches it, so no data is lost. MADV_PAGEOUT, which would be safe on any memory,
    left the resident size unchanged on this machine's kernel. Nothing happens elsewhere."""
    if t.device.type != "cpu" or not t.is_contiguous() or not sys.platform.startswith("linux"):
        return
    page = os.sysconf("SC_PAGE_SIZE")
    start = -(-t.data_ptr() // page) * page
    end = (t.data_ptr() + t.numel() * t.element_size()) // page * page
    if end <= start or not any(a <= start and end <= b for a, b in _weight_file_ranges()):
        return
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.madvise(ctypes.c_void_p(start), ctypes.c_size_t(end - start), MADV_DONTNEED)
    except (OSError, AttributeError):
        pass


def _nf4(weight, to_nf4):
    """NF4 blocks of 64 weights; the block scales are themselves quantized in blocks of 256
    (fewer where the layer has fewer blocks: a divisor of their count)."""
    if weight.numel() % NF4_BLOCK:
        raise ConfigError(f"--quantize nf4: a weight of shape {tuple(weight.shape)} does not "
                          f"split into blocks of {NF4_BLOCK}; use --quantize int8")  # fmt: skip
    scaler = math.gcd(weight.numel() // NF4_BLOCK, NF4_SCALER_BLOCK)
    return to_nf4(weight, NF4_BLOCK, scaler)


def _quiet_import() -> None:
    """torchao, or a message saying how to install it (its import-time notes are silenced
    in ``softprompt/__init__.py``)."""
    try:
        import torchao.quantization  # noqa: F401
    except ImportError:
        raise ConfigError(
            "--quantize needs torchao: pip install 'softprompt[quantize]' (or torchao)"
        ) from None
