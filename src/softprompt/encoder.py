"""Encoder classification (BERT, RoBERTa, MiniLM): a soft prompt and a classification head.

As in PEFT's SEQ_CLS prompt tuning, the virtual tokens go before *all* tokens ([CLS]
included), the attention mask is extended with ones (token type ids, left to the model,
are zeros: one segment), and the model's classification head (``classifier`` / ``score``,
PEFT's ``modules_to_save``) trains beside the prompt; the rest of the model stays frozen.
A row holds the input's ids in ``input_ids`` and its label's index as ``labels[0]``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from softprompt.data import Example, Row
from softprompt.errors import ArtifactError, ConfigError
from softprompt.prompt import embed_tokens, rows_prompts

HEAD_NAMES = ("classifier", "score")  # PEFT's modules_to_save for SEQ_CLS
HEAD_PREFIX = "base_model."  # PEFT's key for head tensors: base_model.classifier.weight


def label_list(examples: list[Example]) -> list[str]:
    """The labels of ``examples`` (their targets), sorted: the head's outputs, in order."""
    labels = sorted({ex.target for ex in examples if ex.target is not None})
    if len(labels) < 2:
        where = examples[0].where if examples else "the data"
        raise ConfigError(
            f"{where}: a classification model needs two or more different labels in the "
            f"target field; found {labels or 'none'}"
        )
    return labels


def tokenize_labels(
    examples: list[Example],
    tokenizer,
    max_tokens: int,
    labels: list[str],
    task_ids: dict[str, int] | None = None,
) -> list[Row]:
    """One row per example: its ids (at most ``max_tokens``; the end cut, its last token kept)
    and ``[label index]``."""
    index = {label: i for i, label in enumerate(labels)}
    rows = []
    for ex in examples:
        if ex.target is None or ex.messages is not None or ex.head is not None:
            raise ConfigError(
                f"{ex.where}: a classification model learns input/label pairs; give records "
                "with an input and a target (label) field"
            )
        if ex.target not in index:
            raise ConfigError(
                f"{ex.where}: label {ex.target!r} is not one of the model's labels "
                f"({', '.join(labels)})"
            )
        ids = tokenizer(ex.source)["input_ids"]
        if len(ids) > max_tokens:
            ids = ids[: max_tokens - 1] + ids[-1:]  # keep [SEP]
        rows.append(Row(ids, [index[ex.target]], task=task_ids[ex.task] if task_ids else 0))
    return rows


def collate(rows: list[Row], pad_id: int) -> dict[str, Tensor]:
    """Ids and mask (B, T), right-padded; labels (B,); task (B,)."""
    width = max(len(r.input_ids) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r.input_ids)] = torch.tensor(r.input_ids)
        mask[i, : len(r.input_ids)] = 1
    labels = torch.tensor([r.labels[0] for r in rows], dtype=torch.long)
    task = torch.tensor([r.task for r in rows], dtype=torch.long)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels, "task": task}


def logits(model: nn.Module, prompt, batch: dict[str, Tensor]) -> Tensor:
    """Class logits (B, L), the prompt before every row's tokens."""
    embeds, mask = embed_tokens(model, batch["input_ids"]), batch["attention_mask"]
    if prompt is not None:
        virtual, which = rows_prompts(prompt, batch)
        virtual = virtual[which].to(embeds.dtype)  # (B, N, H)
        ones = torch.ones(virtual.shape[:2], dtype=mask.dtype, device=mask.device)
        embeds, mask = torch.cat([virtual, embeds], dim=1), torch.cat([ones, mask], dim=1)
    return model(inputs_embeds=embeds, attention_mask=mask).logits


def rows_loss(model: nn.Module, prompt, rows: list[Row], pad_id: int, device) -> tuple:
    """(summed cross-entropy over rows, row count, positions run)."""
    batch = {k: v.to(device) for k, v in collate(rows, pad_id).items()}
    out = logits(model, prompt, batch)
    loss = F.cross_entropy(out.float(), batch["labels"], reduction="sum")
    n_virtual = 0 if prompt is None else rows_prompts(prompt, batch)[0].shape[1]
    return loss, len(rows), int(batch["input_ids"].numel() + len(rows) * n_virtual)


@torch.no_grad()
def predict(
    model: nn.Module, tokenizer, prompt, sources: list[str], batch_size: int = 16
) -> list[list[float]]:
    """Class probabilities of each source, in the model's label order."""
    device = model.get_input_embeddings().weight.device
    out: list[list[float]] = [[]] * len(sources)
    order = sorted(range(len(sources)), key=lambda i: len(sources[i]))
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        rows = [Row(tokenizer(sources[i])["input_ids"], [0]) for i in idx]
        batch = {k: v.to(device) for k, v in collate(rows, tokenizer.pad_token_id).items()}
        probs = logits(model, prompt, batch).float().softmax(dim=-1)
        for j, i in enumerate(idx):
            out[i] = probs[j].tolist()
    return out


def head_modules(model: nn.Module) -> dict[str, nn.Module]:
    """The classification head's modules by name, as PEFT picks them (a child whose name
    contains ``classifier`` or ``score``)."""
    found = {n: m for n, m in model.named_children() if any(h in n for h in HEAD_NAMES)}
    if not found:
        raise ConfigError(f"{type(model).__name__} has no classifier or score module to train")
    return found


def head_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The head's parameters, made trainable (the rest of the model stays frozen)."""
    params = [p for m in head_modules(model).values() for p in m.parameters()]
    for p in params:
        p.requires_grad_(True)
    return params


def head_state(model: nn.Module) -> dict[str, Tensor]:
    """The head's tensors under PEFT's key names (``base_model.classifier.weight``)."""
    return {
        f"{HEAD_PREFIX}{name}.{key}": value.detach().float().cpu().contiguous()
        for name, module in head_modules(model).items()
        for key, value in module.state_dict().items()
    }


def load_head(model: nn.Module, tensors: dict[str, Tensor], where: str) -> None:
    """Put a saved head (PEFT's key names) into ``model``; refuse one of another shape."""
    for name, module in head_modules(model).items():
        state = {}
        for key, value in module.state_dict().items():
            saved = tensors.get(f"{HEAD_PREFIX}{name}.{key}")
            if saved is None or saved.shape != value.shape:
                raise ArtifactError(
                    f"{where}: no classification head for this model's {name}.{key} "
                    f"{tuple(value.shape)} (saved: "
                    f"{None if saved is None else tuple(saved.shape)}); load the model the "
                    "prompt was trained with"
                )
            state[key] = saved.to(value.dtype)
        module.load_state_dict(state)
