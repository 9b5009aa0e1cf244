"""What a model must allow for a soft prompt, checked once at load (``Kind.prepare``): a
model that lacks it is refused in one line that says what is missing, instead of a
transformers error in the middle of training or generation.

A soft prompt is rows of embeddings with no token ids, so the model must
- have an input embedding layer that returns a tensor (the prompt's rows live in its space;
  I-BERT's quantized layer returns a pair);
- run its body (a decoder, a classifier, a seq2seq model's encoder) from ``inputs_embeds``
  alone: checked by running it on two embedded tokens, since some read the ids anyway
  (CPM-Ant, DeepSeek-V4's hash routing, Longformer's global attention, Gemma 3n/4's
  per-layer inputs);
- (a decoder) let ``generate`` start from ``inputs_embeds``;
- (a classifier) take an attention mask, so padding does not change a row's result.
"""

from __future__ import annotations

import inspect

import torch
from torch import nn

from softprompt.errors import ModelLoadError, PrecisionError, first_line


def check_inputs(model: nn.Module, body: nn.Module, generates: bool = False,
                 masked: bool = False) -> None:  # fmt: skip
    """Refuse ``model`` (a ModelLoadError) if a soft prompt cannot be fed to ``body`` (the
    module that reads the embeddings); ``generates``: its ``generate`` must start from
    embeddings; ``masked``: its forward must take an attention mask."""
    name = type(model).__name__
    _check_embeddings(model, body, name)
    if generates and "inputs_embeds" not in _params(model.prepare_inputs_for_generation):
        _refuse(name, "cannot generate from inputs_embeds (its prepare_inputs_for_generation "
                "does not take them), which generation after a soft prompt needs")  # fmt: skip
    if masked and "attention_mask" not in _params(model.forward):
        _refuse(name, "takes no attention mask, so padding would change the result of every "
                "row of a batch shorter than its longest")  # fmt: skip


@torch.no_grad()
def _check_embeddings(model: nn.Module, body: nn.Module, name: str) -> None:
    """The input embedding layer returns a tensor and ``body`` runs from it alone."""
    try:
        layer = model.get_input_embeddings()
    except NotImplementedError:
        layer = None
    weight = getattr(layer, "weight", None)
    if not isinstance(weight, nn.Parameter):
        _refuse(name, "has no input embedding layer (get_input_embeddings), which a soft "
                "prompt's rows belong to")  # fmt: skip
    ids = torch.tensor([[1, 2]], device=weight.device)  # (1, 2)
    embeds = layer(ids)
    if not isinstance(embeds, torch.Tensor):
        got = type(embeds).__name__
        _refuse(name, f"has an input embedding layer ({type(layer).__name__}) that returns "
                f"a {got}, not the embeddings a soft prompt is made of")  # fmt: skip
    text = model.config.get_text_config()  # the probe below feeds the layer's own rows,
    if getattr(text, "hidden_size_per_layer_input", None):  # which Gemma 4 maps back to ids
        _refuse(name, "computes per-layer inputs from the token ids, which a soft prompt "
                "does not have")  # fmt: skip
    params = _params(body.forward)
    required = params.get("input_ids")
    part = "" if body is model else f" its {type(body).__name__}"
    if "inputs_embeds" in params and (required is None or required.default is not required.empty):
        try:
            body(inputs_embeds=embeds, attention_mask=torch.ones_like(ids))
            return
        except Exception as err:  # noqa: BLE001 - whatever it raises, it cannot run from embeds
            why = first_line(err)[:120]
            if weight.dtype in (torch.bfloat16, torch.float16):  # its code may need float32
                dtype = str(weight.dtype).removeprefix("torch.")
                raise PrecisionError(f"{name} cannot run{part} from inputs_embeds in {dtype} "
                                     f"({why})") from err  # fmt: skip
    else:
        why = "its forward needs input_ids"
    _refuse(name, f"cannot run{part} from inputs_embeds alone ({why}), as a "
            "soft prompt (embeddings with no token ids) needs")  # fmt: skip


def _params(fn) -> dict:
    return inspect.signature(fn).parameters


def _refuse(name: str, what: str) -> None:
    raise ModelLoadError(f"{name} {what}; softprompt cannot tune a prompt for it: use another "
                         "model")  # fmt: skip
