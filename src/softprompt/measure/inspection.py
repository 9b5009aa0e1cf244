"""`softprompt inspect DIR`: what a trained prompt looks like from the vocabulary's side.

Per virtual token: its nearest vocabulary tokens by cosine similarity, its norm against the
distribution of real token norms, and how far it moved from its initial value.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from softprompt.artifacts import (
    INITIAL,
    PROMPT_KEY,
    load_prompt,
    resolve_prompt_dir,
    trained_base_model,
)
from softprompt.config import InspectConfig
from softprompt.errors import SoftpromptError
from softprompt.loading import LoadedModel, load_model
from softprompt.prompt import embed_tokens

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
    p = prompt.embedding.detach().float().cpu()  # (N, H)
    vocab = vocab_embeddings(loaded.model)  # (V, H)
    norms = vocab.norm(dim=1)  # (V,)
    sims = F.normalize(p, dim=1) @ F.normalize(vocab, dim=1).T  # (N, V)
    best = sims.topk(top_k, dim=1)
    initial_path = Path(folder) / INITIAL
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


def run_inspect(cfg: InspectConfig, loaded: LoadedModel | None = None) -> dict:
    """`softprompt inspect`: load the prompt's base model (unless given) and inspect it."""
    folder = resolve_prompt_dir(cfg.prompt_dir)
    if not folder.is_dir():
        raise SoftpromptError(f"{cfg.prompt_dir} is not a folder; give the --output of a train run")
    if loaded is None:
        model = cfg.model.model or trained_base_model(folder)
        loaded = load_model(replace(cfg.model, model=model))
    if cfg.similar is not None:
        from softprompt.library import similar_prompts

        prompt, _ = load_prompt(folder, loaded.model)
        return {"prompt": cfg.prompt_dir, "similar": similar_prompts(prompt, cfg.similar,
                                                                     loaded.model)}  # fmt: skip
    return inspect_prompt(loaded, folder, cfg.top_k)


def format_similar(info: dict) -> str:
    """One line per library prompt, most similar first."""
    lines = [f"prompts most like {info['prompt']} (cosine of mean embeddings):"]
    lines += [f"{r['cosine']:7.4f}  {r['prompt']}" for r in info["similar"]]
    if not info["similar"]:
        lines.append("(no saved prompt for this model in the library)")
    return "\n".join(lines)


def format_inspection(info: dict) -> str:
    """A plain-text table: one line per virtual token, then the norm distribution and caveat."""
    has_drift = "drift" in info["tokens"][0]
    head = f"{'tok':>3}  {'norm':>8}  {'pct':>5}  " + ("drift   cos0   " if has_drift else "")
    lines = [head + "nearest vocabulary tokens (cosine)"]
    for t in info["tokens"]:
        near = ", ".join(f"{piece!r} {s:.2f}" for piece, s in t["nearest"])
        drift = f"{t['drift']:6.3f}  {t['cos_to_initial']:5.2f}  " if has_drift else ""
        lines.append(
            f"{t['index']:>3}  {t['norm']:>8.3f}  {t['norm_percentile']:>5.1f}  {drift}{near}"
        )
    v = info["vocab_norm"]
    lines.append(
        f"real token norms: 5th percentile {v['p5']:.3f}, median {v['median']:.3f}, "
        f"95th percentile {v['p95']:.3f} (pct = share of real tokens with a smaller norm)"
    )
    lines.append(info["caveat"])
    return "\n".join(lines)
