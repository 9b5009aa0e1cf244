"""Transfer from a prompt library (Vu et al. 2022, SPoT): prompts trained on other tasks as
starting points for a new one, and their similarity.

A library is a folder whose sub-folders (at any depth) are saved prompts. ``pick_prompt``
scores each on a few batches of the new task's training rows and returns the best;
``similar_prompts`` ranks them by the cosine similarity of their mean embeddings.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor, nn

from softprompt.artifacts import ADAPTER_WEIGHTS, load_prompt
from softprompt.errors import ArtifactError, ConfigError
from softprompt.prompt import DeepPrompt, SoftPrompt
from softprompt.rows import Row
from softprompt.scoring import evaluate_loss

SCORE_BATCHES = 4  # training batches each library prompt is scored on


def library_prompts(folder: str | Path) -> list[Path]:
    """Every saved prompt's folder under ``folder`` (itself included), sorted."""
    root = Path(folder)
    return sorted({p.parent for p in root.rglob(ADAPTER_WEIGHTS)})


def load_library(
    folder: str | Path, model: nn.Module, num_virtual_tokens: int | None = None
) -> tuple[list[tuple[Path, SoftPrompt]], dict[str, str]]:
    """The prompts of ``folder`` that fit ``model`` (and, if given, have
    ``num_virtual_tokens``), and why each other one was skipped."""
    found, skipped = [], {}
    for path in library_prompts(folder):
        try:
            prompt, _ = load_prompt(path, model=model)
        except (ArtifactError, ConfigError) as err:
            skipped[str(path)] = str(err)
            continue
        if num_virtual_tokens is not None and prompt.num_virtual_tokens != num_virtual_tokens:
            skipped[str(path)] = (
                f"{prompt.num_virtual_tokens} virtual tokens, not {num_virtual_tokens}"
            )
            continue
        found.append((path, prompt))
    return found, skipped


def pick_prompt(
    folder: str | Path,
    model: nn.Module,
    rows: list[Row],
    batch_size: int,
    pad_id: int,
    num_virtual_tokens: int,
    choice_ids: Tensor | None = None,
) -> tuple[SoftPrompt, dict]:
    """The library prompt with the lowest loss on the first ``SCORE_BATCHES`` batches of
    ``rows`` (the training loss, ``choice_ids`` as in training), and a record of the scores."""
    found, skipped = load_library(folder, model, num_virtual_tokens)
    if not found:
        why = "; ".join(f"{k}: {v}" for k, v in skipped.items()) or "no saved prompt in it"
        raise ConfigError(
            f"--init library:{folder}: no prompt of {num_virtual_tokens} virtual tokens for "
            f"this model ({why})"
        )
    sample = rows[: SCORE_BATCHES * batch_size]
    device = model.get_input_embeddings().weight.device
    scores = {}
    for path, prompt in found:
        prompt.to(device)
        result = evaluate_loss(model, prompt, sample, batch_size, pad_id, choice_ids)
        scores[str(path)] = round(result["loss"], 6)
    best = min(found, key=lambda item: scores[str(item[0])])
    record = {"library": str(folder), "picked": str(best[0]), "scores": scores,
              "skipped": skipped, "scored_rows": len(sample)}  # fmt: skip
    picked = best[1]
    if isinstance(picked, DeepPrompt):  # --method prefix continues a deep one as it is
        return DeepPrompt(picked.embedding.detach().cpu(), *picked.layout), record
    return SoftPrompt(picked.embedding.detach().cpu()), record


def similar_prompts(prompt: SoftPrompt, folder: str | Path, model: nn.Module) -> list[dict]:
    """The library's prompts ranked by cosine similarity of their mean embedding with
    ``prompt``'s, most similar first (any prompt length; deep prompts compare with deep
    prompts only)."""
    found, _ = load_library(folder, model)
    mean = prompt.embedding.detach().float().mean(dim=0)
    out = []
    for path, other in found:
        if other.embedding.shape[1] != prompt.embedding.shape[1]:  # a deep prompt vs a shallow one
            continue
        sim = torch.cosine_similarity(mean, other.embedding.detach().float().mean(dim=0), dim=0)
        out.append({"prompt": str(path), "cosine": round(float(sim), 4)})
    return sorted(out, key=lambda r: -r["cosine"])
