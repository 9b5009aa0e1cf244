"""Training checkpoints that are never half-written and are checked before use.

Each checkpoint is a folder ``checkpoints/step-NNNNNNNN`` holding ``tensors.safetensors``
(prompt, best prompt, optimizer moments, RNG) and ``state.json`` (counters, optimizer and
scheduler settings, the config, and the tensors file's sha256). It is written under a
temporary name and renamed; the newest two are kept, and a corrupt one is skipped in favour
of the one before it.

``save_run`` / ``restore_run`` put a training run (anything ``Resumable``) in a checkpoint and
take it back: the prompts (one row per task), the best and initial prompts, AdamW's moments,
the scheduler, the RNG and where the run stands (``RunState``); ``--resume`` refuses changed
settings.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import math
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

from softprompt.config import TrainConfig
from softprompt.console import warn
from softprompt.errors import ConfigError
from softprompt.loading import LoadedModel, resolve_dtype
from softprompt.outputs import disk_error, record
from softprompt.prompt import MAPPED, PromptSet

FOLDER = "checkpoints"
KEEP = 2


def save_checkpoint(
    output: Path, step: int, state: dict, tensors: dict[str, Tensor], keep: int = KEEP
) -> Path:
    root = output / FOLDER
    record(root)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step:08d}"
    tmp = root / f".tmp-step-{step:08d}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
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
    except Exception as err:  # a full disk: the checkpoints before this one stay good
        shutil.rmtree(tmp, ignore_errors=True)
        raise disk_error(err, final) from None
    for old in sorted(root.glob("step-*"))[:-keep]:
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


# Settings that may change between a run and its --resume (the rest must match).
RESUMABLE = {
    "epochs",
    "max_steps",
    "eval_every",
    "save_every",
    "keep_checkpoints",
    "patience",
    "select",  # which validated prompt is kept, not how any step trains
    "resume",
    "overwrite",
    "shard_model",
}


@dataclass
class TaskBest:
    """A task's kept validation (``--select``): its loss, its accuracy where the kind
    reports one, and the step it was reached at."""

    loss: float | None = None
    step: int = 0
    accuracy: float | None = None


@dataclass
class RunState:
    """Where a run stands: what a checkpoint must restore to continue exactly."""

    epoch: int = 0  # epochs completed
    group: int = 0  # next optimizer-step group within the epoch
    step: int = 0  # optimizer steps done
    best_loss: float = math.inf  # best pooled validation loss
    best_step: int = 0
    best_accuracy: float | None = None  # best pooled validation accuracy (classification)
    bad_evals: int = 0  # validations since the last improvement (--patience)
    stop_reason: str = ""
    base_val_loss: float | None = None  # the base model alone, before training
    initial_val_loss: float | None = None  # the initial prompt
    first_step_s: float | None = None  # cold start: command -> first step done
    task_base: list[float | None] = field(default_factory=list)  # per task
    task_initial: list[float | None] = field(default_factory=list)
    task_best: list[TaskBest] = field(default_factory=list)

    @classmethod
    def from_dict(cls, record: dict) -> RunState:
        """Read back ``dataclasses.asdict(state)`` from a checkpoint."""
        state = cls(**{k: v for k, v in record.items() if k != "task_best"})
        state.task_best = [TaskBest(**t) for t in record.get("task_best", [])]
        return state


class Resumable(Protocol):
    """What a checkpoint holds of a training run (``training.Run`` has these)."""

    cfg: TrainConfig
    output: Path
    state: RunState
    prompts: PromptSet
    best: Tensor  # (K, N, H): each task's best prompt
    initial: Tensor  # (K, N, H): each task's starting prompt
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    loaded: LoadedModel  # the frozen model: the dtype its weights run in is recorded


# --- a training run's state ------------------------------------------------------------


def save_run(run: Resumable) -> None:
    """Checkpoint the run at ``run.state.step`` (main process only)."""
    opt_state = run.optimizer.state_dict()
    tensors = {
        "prompt": run.prompts.stacked(),  # (K, N, H): one row per task
        "best": run.best,
        "initial": run.initial,
        "rng": torch.get_rng_state(),
    }
    for i, (param, best) in enumerate(zip(getattr(run, "head", []), getattr(run, "best_head", []))):
        tensors[f"head.{i}"], tensors[f"best_head.{i}"] = param.detach(), best  # classify
    for i, prompt in enumerate(run.prompts.prompts):  # --reparam, --prefix-projection: MLPs
        if isinstance(prompt, MAPPED):
            tensors.update({f"reparam.{i}.{k}": v for k, v in prompt.state_dict().items()})
    for index, moments in opt_state["state"].items():  # only tasks that have had a step
        tensors.update({f"optim.{index}.{k}": torch.as_tensor(v) for k, v in moments.items()})
    record = {
        "run": dataclasses.asdict(run.state),
        "config": dataclasses.asdict(run.cfg),
        "param_groups": opt_state["param_groups"],
        "scheduler": run.scheduler.state_dict(),
        "data_files": data_fingerprints(run.cfg),
        "weights_dtype": _weights_dtype(run),
    }
    save_checkpoint(run.output, run.state.step, record, tensors, run.cfg.keep_checkpoints)


def restore_run(run: Resumable) -> Path:
    """Load the newest good checkpoint into the run: its prompts, best and initial prompts,
    optimizer, scheduler, RNG and state. Returns the checkpoint's folder."""
    found = load_latest_checkpoint(run.output)
    if found is None:
        raise ConfigError(f"--resume: no usable checkpoint in {run.output / FOLDER}")
    record, tensors, folder = found
    saved = _concrete_dtype(record["config"], record.get("weights_dtype"))
    _check_same_run(saved, _concrete_dtype(dataclasses.asdict(run.cfg), _weights_dtype(run)))
    _check_same_data(record.get("data_files"), data_fingerprints(run.cfg))
    run.state = RunState.from_dict(record["run"])
    run.prompts.load_stacked(tensors["prompt"])
    for i, prompt in enumerate(run.prompts.prompts):
        if isinstance(prompt, MAPPED):
            prefix = f"reparam.{i}."
            prompt.load_state_dict(
                {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}
            )
    moments: dict[int, dict] = {}
    for key, value in tensors.items():
        if key.startswith("optim."):
            _, index, name = key.split(".", 2)
            moments.setdefault(int(index), {})[name] = value
    run.optimizer.load_state_dict({"state": moments, "param_groups": record["param_groups"]})
    run.scheduler.load_state_dict(record["scheduler"])
    torch.set_rng_state(tensors["rng"])
    run.best, run.initial = tensors["best"].clone(), tensors["initial"].clone()
    for i, (param, best) in enumerate(zip(getattr(run, "head", []), getattr(run, "best_head", []))):
        param.data.copy_(tensors[f"head.{i}"])  # a classification head, trained beside
        best.copy_(tensors[f"best_head.{i}"])
    return folder


def data_fingerprints(cfg: TrainConfig) -> dict[str, str]:
    """sha256 of each local data file the run reads (--data, --validation)."""
    files = [f for f in (cfg.data.data, cfg.data.validation) if f and not f.startswith("hf:")]
    out = {}
    for name in files:
        path = Path(name).expanduser()
        if path.is_file():
            stat = path.stat()
            out[name] = _file_sha256(str(path.resolve()), stat.st_size, stat.st_mtime_ns)
    return out


@functools.lru_cache(maxsize=8)  # once per file version: a checkpoint does not re-read the data
def _file_sha256(path: str, size: int, mtime_ns: int) -> str:
    return _sha256(Path(path))


def _check_same_data(saved: dict | None, now: dict[str, str]) -> None:
    """Refuse to resume on data that changed since the checkpoint (the rows, their order
    and the validation split would silently differ)."""
    if not isinstance(saved, dict):  # a checkpoint from before data was fingerprinted
        return
    for name, digest in now.items():
        if name in saved and saved[name] != digest:
            raise ConfigError(
                f"--resume: the data file {name} changed since the checkpoint was written; "
                "resume with the data as it was, or start again with --overwrite"
            )


def _weights_dtype(run: Resumable) -> str:
    return str(run.loaded.model.dtype).removeprefix("torch.")


def _concrete_dtype(config: dict, weights: str | None) -> dict:
    """``config`` with ``--dtype`` as the dtype the weights ran in: a run with ``auto`` on a
    host where it chose float32 resumes under ``--dtype float32`` and the other way round
    (a checkpoint from before the dtype was recorded: its ``--dtype``, auto as on this host)."""
    model = config.get("model")
    if not isinstance(model, dict):
        return config
    ran = weights if isinstance(weights, str) else resolve_dtype(str(model.get("dtype", "")))
    return {**config, "model": {**model, "dtype": ran}}


def _check_same_run(saved: dict, now: dict) -> None:
    diffs = _differences(saved, now)
    if diffs:
        dtype = [f"; --dtype {a!r} resumes it" for k, a, _ in diffs if k == "model.dtype"]
        raise ConfigError(
            "--resume needs the same settings as the interrupted run; these differ: "
            + ", ".join(f"{k} (was {a!r}, now {b!r})" for k, a, b in diffs)
            + "".join(dtype)
        )


# Settings added after a checkpoint may have been written: absent there, they had this value.
ADDED_LATER = {"model.task": "auto", "reparam": "none", "reparam_hidden": 128, "ensemble": 1,
               "method": "prompt", "prefix_projection": False, "prefix_hidden": 512}  # fmt: skip


def _differences(saved: dict, now: dict, prefix: str = "") -> list[tuple[str, object, object]]:
    out = []
    for key, value in now.items():
        if key in RESUMABLE:
            continue
        if key not in saved and ADDED_LATER.get(prefix + key, ...) == value:
            continue
        old = saved.get(key)
        if isinstance(value, dict) and isinstance(old, dict):
            out += _differences(old, value, prefix + key + ".")
        elif old != value:
            out.append((prefix + key, old, value))
    return out
