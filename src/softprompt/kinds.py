"""Which kind of model a prompt is tuned for, and the kind-specific loss beside the causal one.

- ``causal``: a decoder LM (the default path: ``loss.py``, ``prefix.py``, ``generation.py``);
- ``seq2seq``: an encoder-decoder (T5, BART): the prompt goes before the encoder's input, the
  loss is on the decoder's target tokens (``seq2seq.py``);
- ``classify``: a BERT-style encoder with a classification head trained beside the prompt
  (``encoder.py``).

The causal path never goes through here but for one string comparison (``model_kind``).
"""

from __future__ import annotations

import math

import torch
from torch import nn
from transformers.models.auto.modeling_auto import (
    MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
    MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES,
    MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES,
)

from softprompt.data import Row
from softprompt.errors import ConfigError

KINDS = ("causal", "seq2seq", "classify")
# Encoder-only families: they have a causal-LM class too (BertLMHeadModel), but what they are
# made for is classification.
ENCODER_TYPES = frozenset(
    {
        "bert",
        "roberta",
        "distilbert",
        "electra",
        "deberta",
        "deberta-v2",
        "xlm-roberta",
        "mpnet",
        "albert",
        "camembert",
        "modernbert",
    }  # fmt: skip
)
_MAPPINGS = {
    "causal": MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
    "seq2seq": MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES,
    "classify": MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES,
}


def detect_kind(config, task: str = "auto", shown: str = "the model") -> str:
    """The kind of model ``config`` describes (``task`` other than auto: that kind, checked)."""
    model_type = getattr(config, "model_type", None)
    remote = bool(getattr(config, "auto_map", None))  # trust_remote_code models map themselves
    if task != "auto":
        if not remote and model_type not in _MAPPINGS[task]:
            raise ConfigError(
                f"--task {task}: {shown} ({model_type}) has no {task} model class in "
                f"transformers; use --task {detect_kind(config, 'auto', shown)} or another model"
            )
        return task
    if getattr(config, "is_encoder_decoder", False):
        return "seq2seq"
    if model_type in ENCODER_TYPES:
        return "classify"
    if remote or model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        return "causal"
    fits = [k for k, mapping in _MAPPINGS.items() if model_type in mapping]
    if fits:
        return fits[0]
    archs = ", ".join(getattr(config, "architectures", None) or [str(model_type)])
    raise ConfigError(
        f"{shown} ({archs}) is neither a causal LM, an encoder-decoder nor an encoder with a "
        "classification class in transformers; softprompt cannot tune a prompt for it"
    )


def model_kind(model: nn.Module) -> str:
    """The kind of a loaded model, from its class and config."""
    if getattr(model.config, "is_encoder_decoder", False):
        return "seq2seq"
    if type(model).__name__.endswith("ForSequenceClassification"):
        return "classify"
    return "causal"


def rows_loss(model: nn.Module, prompts, rows: list[Row], pad_id: int, device) -> tuple:
    """(summed loss, label count, positions run) of a seq2seq or classify model on ``rows``."""
    if model_kind(model) == "seq2seq":
        from softprompt import seq2seq

        return seq2seq.rows_loss(model, prompts, rows, pad_id, device)
    from softprompt import encoder

    return encoder.rows_loss(model, prompts, rows, pad_id, device)


def evaluate_rows(model: nn.Module, prompt, rows: list[Row], batch_size: int, pad_id: int) -> dict:
    """Mean loss per label (seq2seq: per target token; classify: per example)."""
    device = model.get_input_embeddings().weight.device
    order = sorted(range(len(rows)), key=lambda i: len(rows[i].input_ids))
    total, count = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(order), batch_size):
            batch_rows = [rows[i] for i in order[start : start + batch_size]]
            loss, n, _ = rows_loss(model, prompt, batch_rows, pad_id, device)
            total, count = total + float(loss), count + n
    mean = total / max(count, 1)
    return {"loss": mean, "ppl": math.exp(min(mean, 50.0)), "tokens": count}
