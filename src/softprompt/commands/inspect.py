"""`softprompt inspect`: nearest tokens, norms and drift of a trained prompt, as a table."""

from __future__ import annotations

from dataclasses import replace

from softprompt.artifacts import (
    load_prompt,
    resolve_prompt_dir,
    trained_base_model,
)
from softprompt.config import InspectConfig
from softprompt.errors import SoftpromptError
from softprompt.library import similar_prompts
from softprompt.loading import LoadedModel, load_model
from softprompt.measure.inspection import inspect_prompt


def run_inspect(cfg: InspectConfig, loaded: LoadedModel | None = None) -> dict:
    """`softprompt inspect`: load the prompt's base model (unless given) and inspect it."""
    folder = resolve_prompt_dir(cfg.prompt_dir)
    if not folder.is_dir():
        raise SoftpromptError(f"{cfg.prompt_dir} is not a folder; give the --output of a train run")
    if loaded is None:
        model = cfg.model.model or trained_base_model(folder)
        loaded = load_model(replace(cfg.model, model=model))
    if cfg.similar is not None:
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
    """A plain-text table: one line per virtual token, then the norm distribution and caveat
    (a deep prompt: one line per layer)."""
    if info.get("deep"):
        return _format_deep(info)
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


def _format_deep(info: dict) -> str:
    lay = info["layout"]
    lines = [
        f"deep prompt: {lay['virtual_tokens']} virtual tokens, keys and values in "
        f"{lay['layers']} layers ({lay['kv_heads']} KV heads x {lay['head_dim']})"
    ]
    moved = "key_drift" in info["layers"][0]
    head = f"{'layer':>5}  {'key norm':>9}  {'value norm':>10}"
    lines.append(head + ("  key drift  value drift  key cos0  value cos0" if moved else ""))
    for r in info["layers"]:
        line = f"{r['layer']:>5}  {r['key_norm']:>9.3f}  {r['value_norm']:>10.3f}"
        if moved:
            line += (f"  {r['key_drift']:>9.3f}  {r['value_drift']:>11.3f}  {r['key_cos0']:>8.3f}"
                     f"  {r['value_cos0']:>10.3f}")  # fmt: skip
        lines.append(line)
    lines.append("norms: mean per virtual token; drift: distance from the starting keys/values "
                 "over their norm")  # fmt: skip
    return "\n".join(lines)


def main(cfg: InspectConfig) -> None:
    """The command: inspect, then print the table."""
    info = run_inspect(cfg)
    print(format_similar(info) if "similar" in info else format_inspection(info))
