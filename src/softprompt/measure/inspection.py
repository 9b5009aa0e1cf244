"""`softprompt inspect DIR`: what a trained prompt looks like from the vocabulary's side.

Per virtual token: its nearest vocabulary tokens by cosine similarity, its norm against the
distribution of real token norms, and how far it moved from its initial value.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from softprompt.artifacts import (
    INITIAL,
    PROMPT_KEY,
    load_prompt,
)
from softprompt.loading import LoadedModel
from softprompt.prompt import DeepPrompt, embed_tokens

CAVEAT = (
    "Nearest tokens are only a hint: a soft prompt is optimised in continuous space and need "
    "not sit near any word, so a vector can work well while its neighbours read as noise."
)


@torch.no_grad()
def vocab_embeddings(model: torch.nn.Module) -> torch.Tensor:
    """(V, H) float32: what the embedding layer returns for every id (Gemma's sqrt(H) scale
    included), so norms compare with the prompt's, which lives in that space."""
    weight = model.get_input_embeddings().weight
    probe = torch.tensor([min(1, weight.shape[0] - 1)], device=weight.device)
    scale = embed_tokens(model, probe).float().norm() / weight[probe].float().norm().clamp_min(
        1e-12
    )
    return weight.detach().float().cpu() * float(scale.cpu())


@torch.no_grad()
def inspect_prompt(loaded: LoadedModel, folder: str | Path, top_k: int = 5) -> dict:
    """Nearest tokens, norm percentile and drift per virtual token of the prompt in ``folder``."""
    prompt, _ = load_prompt(folder, loaded.model)
    initial_path = Path(folder) / INITIAL
    if isinstance(prompt, DeepPrompt):
        start = load_file(str(initial_path))[PROMPT_KEY].float() if initial_path.exists() else None
        return inspect_deep(prompt, start)
    p = prompt.embedding.detach().float().cpu()  # (N, H)
    vocab = vocab_embeddings(loaded.model)  # (V, H)
    norms = vocab.norm(dim=1)  # (V,)
    sims = F.normalize(p, dim=1) @ F.normalize(vocab, dim=1).T  # (N, V)
    best = sims.topk(top_k, dim=1)
    initial = load_file(str(initial_path))[PROMPT_KEY].float() if initial_path.exists() else None
    tok = loaded.tokenizer
    tokens = []
    for i in range(p.shape[0]):
        ids = best.indices[i].tolist()
        row = {
            "index": i,
            "nearest": [
                [tok.convert_ids_to_tokens(t), round(float(s), 4)]
                for t, s in zip(ids, best.values[i])
            ],
            "norm": round(float(p[i].norm()), 4),
            "norm_percentile": round(float((norms < p[i].norm()).float().mean()) * 100, 1),
        }
        if initial is not None:
            row["drift"] = round(float((p[i] - initial[i]).norm()), 4)
            row["cos_to_initial"] = round(float(F.cosine_similarity(p[i], initial[i], dim=0)), 4)
        tokens.append(row)
    q = torch.quantile(norms, torch.tensor([0.05, 0.5, 0.95]))
    return {
        "tokens": tokens,
        "vocab_norm": {"p5": float(q[0]), "median": float(q[1]), "p95": float(q[2])},
        "caveat": CAVEAT,
    }


def inspect_deep(prompt: DeepPrompt, initial: torch.Tensor | None) -> dict:
    """A deep prompt per layer: its keys' and values' mean norm per virtual token and, where
    the run's starting point is saved, how far each layer moved from it (relative drift) and
    the cosine to it. Deep prompts have no vocabulary neighbours: they are not input vectors."""
    layers, heads, dim = prompt.layout
    n = prompt.num_virtual_tokens
    now = prompt.embedding.detach().float().cpu().view(n, layers, 2, heads * dim)
    start = initial.view(n, layers, 2, heads * dim) if initial is not None else None
    rows = []
    for layer in range(layers):
        row = {"layer": layer}
        for j, name in enumerate(("key", "value")):
            x = now[:, layer, j]  # (N, width)
            row[f"{name}_norm"] = round(float(x.norm(dim=1).mean()), 4)
            if start is not None:
                x0 = start[:, layer, j]
                row[f"{name}_drift"] = round(float((x - x0).norm() / x0.norm().clamp_min(1e-12)), 4)
                row[f"{name}_cos0"] = round(float(F.cosine_similarity(x.flatten(), x0.flatten(),
                                                                      dim=0)), 4)  # fmt: skip
        rows.append(row)
    return {"deep": True, "layout": {"layers": layers, "kv_heads": heads, "head_dim": dim,
                                     "virtual_tokens": n}, "layers": rows}  # fmt: skip
