"""Output folders that softprompt owns, and writes that are never half-done.

A command that writes a folder (train, compare, sweep, eval) first claims it: a new or
empty folder gets a marker, ``.softprompt-output.json``, which lists every top-level file
and folder a run of softprompt wrote there (``atomic_write`` and ``record`` add to it).
``--overwrite`` removes only what the marker lists; a non-empty folder without a marker is
refused with the names of the files in it, so a user's own files are never touched.

Every file is written under a temporary name, flushed and renamed; a failed write (a full
disk) removes its temporary file and becomes one clear error.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path

from softprompt.errors import ConfigError, SoftpromptError

MARKER = ".softprompt-output.json"
# Files and folders of runs written before the marker existed: a folder holding only these
# is adopted as softprompt's own.
LEGACY = {
    "adapter_config.json", "adapter_model.safetensors", "softprompt.json",
    "initial_prompt.safetensors", "metrics.jsonl", "loss.png", "checkpoints", "tasks.json",
    "report.md", "report.html", "loss_curves.png", "quality_cost.png", "sweep.jsonl",
    "sweep.md", "results.json", "predictions.jsonl", "prompt-tuning", "lora",
}  # fmt: skip
_MANIFESTS: dict[Path, set[str]] = {}  # owned folder -> its entries (what the marker says)


class DiskFullError(SoftpromptError):
    """The disk filled up while softprompt wrote a file."""


def claim_output(output: Path, what: str, resume: bool = False, overwrite: bool = False) -> Path:
    """Make ``output`` softprompt's folder for ``what`` ("a run", "a comparison", ...), or
    refuse: a file, a folder holding someone else's files, or (without ``resume`` /
    ``overwrite``) a folder that already holds ``what``."""
    output = Path(output)
    if output.exists() and not output.is_dir():
        raise ConfigError(f"--output {output} is a file; give a folder (new or empty)")
    entries = sorted(p.name for p in output.iterdir()) if output.is_dir() else []
    owned = _read_marker(output) if (output / MARKER).exists() else None
    if owned is None and entries:
        if not set(entries) <= LEGACY:
            shown = ", ".join(entries[:5]) + (
                f" and {len(entries) - 5} more" if len(entries) > 5 else ""
            )
            raise ConfigError(
                f"{output} holds files softprompt did not write ({shown}); choose a new or "
                "empty --output (softprompt never removes files it did not write)"
            )
        owned = set(entries)  # a run from before the marker existed
    if owned and not resume:
        if not overwrite:
            raise ConfigError(
                f"{output} already holds {what}; pass --resume to continue it, --overwrite to "
                "replace it, or choose another --output"
            )
        remove_owned(output, owned)
        owned = set()
    _ensure_writable(output)
    _write_marker(output, owned or set())
    return output


def _ensure_writable(output: Path) -> None:
    try:
        output.mkdir(parents=True, exist_ok=True)
        probe = output / f".softprompt-probe-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as err:
        raise ConfigError(f"cannot write in --output {output}: {err.strerror}") from None


def remove_owned(output: Path, entries: set[str]) -> None:
    """Remove the listed top-level entries of ``output`` (and nothing else)."""
    for name in sorted(entries):
        path = output / name
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        elif path.exists() or path.is_symlink():
            path.unlink()


def _read_marker(output: Path) -> set[str]:
    try:
        data = json.loads((output / MARKER).read_text(encoding="utf-8"))
        entries = set(data["entries"])
    except (OSError, ValueError, KeyError, TypeError):
        raise ConfigError(
            f"{output / MARKER} is damaged; remove the folder's run files by hand"
        ) from None
    _MANIFESTS[output.resolve()] = entries
    return entries


def _write_marker(output: Path, entries: set[str]) -> None:
    _MANIFESTS[output.resolve()] = set(entries)
    body = {"written_by": "softprompt", "updated": time.strftime("%Y-%m-%dT%H:%M:%SZ"),
            "entries": sorted(entries)}  # fmt: skip
    _atomic(output / MARKER, lambda p: p.write_text(json.dumps(body, indent=1) + "\n"))


def record(path: Path) -> None:
    """Note ``path`` as written by softprompt in the marker of the owned folder holding it
    (if any): its top-level entry there is then softprompt's to replace."""
    path = Path(path).resolve()
    for root in path.parents:
        if root in _MANIFESTS or (root / MARKER).exists():
            entries = _MANIFESTS.get(root) or _read_marker(root)
            name = path.relative_to(root).parts[0]
            if name != MARKER and name not in entries:
                _write_marker(root, entries | {name})
            return
        if root.parent == root:
            return


def atomic_write(path: Path, write: Callable[[Path], object]) -> None:
    """Call ``write(tmp_path)``, flush it to disk, then rename over ``path``; recorded in
    the owning folder's marker. A full disk is one clear error and leaves no temporary file."""
    record(path)
    _atomic(path, write)


def _atomic(path: Path, write: Callable[[Path], object]) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}{path.suffix}")
    try:
        write(tmp)
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except Exception as err:  # safetensors reports a full disk as its own error type
        raise disk_error(err, path) from None
    finally:
        tmp.unlink(missing_ok=True)


def write_text(path: Path, text: str) -> None:
    atomic_write(path, lambda p: p.write_text(text, encoding="utf-8"))


def write_json(path: Path, obj) -> None:
    text = json.dumps(obj, indent=2, default=str) + "\n"
    atomic_write(path, lambda p: p.write_text(text, encoding="utf-8"))


def disk_error(err: Exception, path: Path) -> Exception:
    """A full disk (or quota) as a DiskFullError naming the file; other errors unchanged."""
    full = getattr(err, "errno", None) in (errno.ENOSPC, errno.EDQUOT)
    if full or "No space left on device" in str(err) or "os error 28" in str(err):
        return DiskFullError(
            f"the disk is full: could not write {path}. What was written before is intact; "
            "free some space, then run the same command with --resume"
        )
    return err
