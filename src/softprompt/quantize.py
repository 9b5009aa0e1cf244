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

Memory, measured on an 8-layer Llama of 465 MB in float32 (one process, 2 CPUs): resident
after loading, float32 901 MB, int8 578 MB (1,533 MB before ``_off_the_file`` and
``_give_back``), nf4 653 MB. The peak while loading is above float32's (int8 1,030 MB): the
float weights are read first, then quantized layer by layer; quantizing while reading
(transformers' ``TorchAoConfig``) would avoid that and is not done yet.
"""

from __future__ import annotations

import ctypes
import math

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
            quantize_(m, Int8WeightOnlyConfig())
            _give_back()
    elif how == "nf4":
        from torchao.quantization import to_nf4

        for m in linears:
            m.weight = nn.Parameter(_nf4(m.weight.detach(), to_nf4), requires_grad=False)
            _give_back()
    else:
        raise ConfigError(f"--quantize must be one of {', '.join(QUANTIZE_CHOICES)}, not {how!r}")
    _off_the_file(model)
    _give_back()
    setattr(model, _ATTR, how)
    return len(linears)


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
            p.data = p.data.clone()


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
