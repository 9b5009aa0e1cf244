"""`softprompt export`: a prompt's rows for vLLM, SGLang or numpy, with deploy.json."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import Tensor

from softprompt.config import ExportConfig
from softprompt.console import say
from softprompt.deploy import (
    VLLM_RESCALES,
    Deployment,
    encode_tensor,
)
from softprompt.outputs import atomic_write, claim_output, write_json, write_text

FILES = {
    "vllm": ("prompt_embeds.pt", "prompt_embeds.b64"),
    "sglang": ("input_embeds.json",),
    "numpy": ("prompt_embeds.npy",),
}


def run_export(cfg: ExportConfig) -> Path:
    """Write the prompt's rows in the form ``cfg.to`` takes, with ``deploy.json`` saying
    what they are (model, shape, dtype, placement) and how to send them."""
    dep = Deployment.load(cfg.prompt_dir)
    rows = dep.rows(cfg.dtype)  # (N, H)
    out = claim_output(Path(cfg.output), "an export", overwrite=cfg.overwrite)
    if cfg.to == "vllm":
        atomic_write(out / "prompt_embeds.pt", lambda p: torch.save(rows, p))
        write_text(out / "prompt_embeds.b64", encode_tensor(rows) + "\n")
    elif cfg.to == "sglang":
        text = json.dumps(rows.float().tolist(), allow_nan=False)  # strict JSON: no NaN
        write_text(out / "input_embeds.json", text + "\n")
    else:
        atomic_write(out / "prompt_embeds.npy", lambda p: _save_npy(rows, p))
    info = _describe(dep, cfg, rows)
    write_json(out / "deploy.json", info)
    kind = info["base_model"]["model_type"]
    if kind in VLLM_RESCALES and cfg.to == "vllm":
        say(
            f"note: vLLM multiplies prompt_embeds by sqrt(hidden size) in {kind} models; "
            "divide these rows by it before sending them there"
        )
    say(f"exported {rows.shape[0]} virtual tokens x {rows.shape[1]} ({cfg.dtype}) to {out}")
    return out


def _save_npy(rows: Tensor, path: Path) -> None:
    import numpy as np

    with open(path, "wb") as f:  # np.save on a path would append .npy to the temporary name
        np.save(f, rows.numpy())


def _describe(dep: Deployment, cfg: ExportConfig, rows: Tensor) -> dict:
    base = dep.meta.get("base_model") or {}
    return {
        "engine": cfg.to,
        "files": list(FILES[cfg.to]),
        "shape": list(rows.shape),
        "dtype": cfg.dtype,
        "base_model": {
            "name": base.get("name"),
            "architecture": base.get("architecture"),
            "model_type": base.get("model_type"),
            "hidden_size": rows.shape[1],
        },
        "placement": dep.fmt.position_name,
        "prompt_format": dep.fmt.to_meta(),
        "space": "the output of the model's input-embedding layer (scaled for Gemma)",
        "usage": USAGE[cfg.to],
    }


USAGE = {
    "vllm": 'Chat Completions: a content part {"type": "prompt_embeds", "data": <the text '
    "of prompt_embeds.b64>} (prompts placed after-system); Completions: prompt_embeds = the "
    "whole sequence, built by softprompt.deploy.Deployment.completions_body. Serve with "
    "`vllm serve MODEL --enable-prompt-embeds`.",
    "sglang": "POST /generate with input_embeds = the whole sequence (head, these rows, the "
    "embedded input): softprompt.deploy.Deployment.sglang_body builds it.",
    "numpy": "np.load('prompt_embeds.npy'): (virtual tokens, hidden), the rows to put before "
    "the embedded input.",
}


def main(cfg: ExportConfig) -> None:
    """The command: write the files, then print deploy.json."""
    out = run_export(cfg)
    print((out / "deploy.json").read_text(encoding="utf-8"))
