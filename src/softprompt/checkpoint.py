"""Training checkpoints that are never half-written and are checked before use.

Each checkpoint is a folder ``checkpoints/step-NNNNNNNN`` holding ``tensors.safetensors``
(prompt, best prompt, optimizer moments, RNG) and ``state.json`` (counters, optimizer and
scheduler settings, the config, and the tensors file's sha256). It is written under a
temporary name and renamed; the newest two are kept, and a corrupt one is skipped in favour
of the one before it.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

from safetensors.torch import load_file, save_file
from torch import Tensor

from softprompt.data import warn

FOLDER = "checkpoints"
KEEP = 2


def save_checkpoint(output: Path, step: int, state: dict, tensors: dict[str, Tensor]) -> Path:
    root = output / FOLDER
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step:08d}"
    tmp = root / f".tmp-step-{step:08d}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    weights = tmp / "tensors.safetensors"
    save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(weights))
    state = {**state, "step": step, "tensors_sha256": _sha256(weights)}
    (tmp / "state.json").write_text(json.dumps(state, indent=1, default=str))
    for f in tmp.iterdir():
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    for old in sorted(root.glob("step-*"))[:-KEEP]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def load_latest_checkpoint(output: Path) -> tuple[dict, dict[str, Tensor], Path] | None:
    """The newest checkpoint that verifies, or None if there is none."""
    for folder in sorted((output / FOLDER).glob("step-*"), reverse=True):
        try:
            state = json.loads((folder / "state.json").read_text())
            weights = folder / "tensors.safetensors"
            if _sha256(weights) != state["tensors_sha256"]:
                raise ValueError("its tensors do not match the recorded checksum")
            return state, load_file(str(weights)), folder
        except (OSError, ValueError, KeyError) as err:  # JSONDecodeError is a ValueError
            warn(f"checkpoint {folder} is corrupt ({err}); trying the one before it")
    return None


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()
