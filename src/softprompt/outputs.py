"""Output folders that softprompt owns, and writes that are never half-done.

A command that writes a folder (train, compare, sweep, eval, export) first claims it: a new
or empty folder gets a marker, ``.softprompt-output.json``, which says which kind of output
wrote it (a run, a comparison, a sweep, results, an export) and lists every top-level entry
that command wrote there (``atomic_write`` and ``record`` add to it).

Nothing in a folder is trusted: a marker is only believed when it has softprompt's format
and kind and every entry is a plain name (no separator, no ``..``) that this kind of output
writes; a folder of another kind is never claimed (``eval --output RUN`` is refused, it
never replaces the run); ``--overwrite`` removes only what a valid marker lists and checks
every entry before it removes any; a non-empty folder without a valid marker is refused
with the names of the files in it, so a user's own files are never touched. The claim
itself is atomic across processes: it holds an OS lock (flock) on the folder for the rest
of the process, so two commands can never write one folder at once.

Every file is written under a temporary name, flushed and renamed; a failed write (a full
disk) removes its temporary file and becomes one clear error.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import time
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path

from softprompt.errors import ConfigError, SoftpromptError

MARKER = ".softprompt-output.json"
FORMAT = "softprompt-output/2"
_OURS = {MARKER}
PROMPT_NAMES = {"adapter_config.json", "adapter_model.safetensors", "softprompt.json",
                "initial_prompt.safetensors", "metrics.jsonl", "loss.png", "README.md"}  # fmt: skip
_TRACKING = {"metrics.csv", "tensorboard"}
# kind -> (the phrase commands use, the top-level names its command writes)
KINDS: dict[str, tuple[str, frozenset[str]]] = {
    "run": ("a run", frozenset(PROMPT_NAMES | _TRACKING | {
        "checkpoints", "tasks.json", "ensemble.json", "teacher", "teacher-agreement.json"})),
    "comparison": ("a comparison", frozenset(_TRACKING | {
        "metrics.jsonl", "prompt-tuning", "prefix-tuning", "lora", "report.md", "report.html",
        "loss_curves.png", "quality_cost.png"})),
    "sweep": ("a sweep", frozenset(_TRACKING | {"sweep.jsonl", "sweep.md"})),
    "results": ("results", frozenset({"results.json", "predictions.jsonl"})),
    "export": ("an export", frozenset({"prompt_embeds.pt", "prompt_embeds.b64",
                                       "input_embeds.json", "prompt_embeds.npy", "deploy.json"})),
}  # fmt: skip
_BY_PHRASE = {phrase: kind for kind, (phrase, _) in KINDS.items()}
_MANIFESTS: dict[Path, tuple[str, set[str]]] = {}  # owned folder -> (kind, its entries)
# Folders this process holds the lock of -> the lock's fd. One process (a sweep, a test
# session, a notebook) may write many folders one after another: past LOCKS_KEPT, the
# oldest claim (long finished) lets its folder go.
_LOCKS: OrderedDict[Path, int] = OrderedDict()
LOCKS_KEPT = 32


class DiskFullError(SoftpromptError):
    """The disk filled up while softprompt wrote a file."""


class MarkerError(ConfigError):
    """A marker that does not prove the folder is softprompt's output of the claimed kind."""


def claim_output(output: Path, what: str, resume: bool = False, overwrite: bool = False) -> Path:
    """Make ``output`` softprompt's folder for ``what`` ("a run", "results", ... see
    ``KINDS``), or refuse: a file, a folder holding someone else's files or another kind of
    output, a damaged marker, a folder another process is writing, or (without ``resume`` /
    ``overwrite``) a folder that already holds ``what``."""
    output, kind = Path(output), _BY_PHRASE[what]
    if output.exists() and not output.is_dir():
        raise ConfigError(f"--output {output} is a file; give a folder (new or empty)")
    _state(output, kind)  # refuse before writing anything in it
    _ensure_writable(output)
    _lock(output)
    owned = _state(output, kind)  # again, now that no other process can change it
    if owned and not resume:
        if not overwrite:
            resume_it = "pass --resume to continue it, " if kind == "run" else "pass "
            raise ConfigError(
                f"{output} already holds {what}; {resume_it}--overwrite to replace it, or "
                "choose another --output"
            )
        remove_owned(output, owned, kind)
        owned = set()
    _write_marker(output, kind, owned)
    return output


def _state(output: Path, kind: str) -> set[str]:
    """The entries softprompt owns in ``output`` for ``kind``; refuses what it cannot prove."""
    entries = sorted(p.name for p in output.iterdir() if not _transient(p.name)) if (
        output.is_dir()) else []  # fmt: skip
    if (output / MARKER).exists() or (output / MARKER).is_symlink():
        return _read_marker(output, kind)
    if entries:
        shown = ", ".join(entries[:5]) + (f" and {len(entries) - 5} more" if len(entries) > 5
                                          else "")  # fmt: skip
        raise ConfigError(
            f"{output} holds files softprompt did not write ({shown}); choose a new or "
            "empty --output (softprompt never removes files it did not write)"
        )
    return set()


def _transient(name: str) -> bool:
    """softprompt's own bookkeeping files (another process's claim may be writing them)."""
    return name in _OURS or name.startswith((".softprompt-probe-", f".{MARKER}.tmp-"))


def _ensure_writable(output: Path) -> None:
    try:
        output.mkdir(parents=True, exist_ok=True)
        probe = output / f".softprompt-probe-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as err:
        raise ConfigError(f"cannot write in --output {output}: {err.strerror}") from None


def _lock(output: Path) -> None:
    """Hold an exclusive OS lock on the folder itself until this process ends (no file is
    written for it; the OS releases it even when the process is killed: never stale)."""
    key = output.resolve()
    if key in _LOCKS:
        _LOCKS.move_to_end(key)
        return
    try:
        import fcntl
    except ImportError:  # not POSIX: no cross-process lock (the marker is still checked)
        return
    fd = os.open(output, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))  # the folder itself
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        raise ConfigError(
            f"another softprompt process is writing to {output}; wait for it to end or "
            "choose another --output"
        ) from None
    _LOCKS[key] = fd
    while len(_LOCKS) > LOCKS_KEPT:
        os.close(_LOCKS.popitem(last=False)[1])


def release_output(output: Path) -> None:
    """Let other processes claim ``output`` (the lock is released at exit anyway)."""
    fd = _LOCKS.pop(Path(output).resolve(), None)
    if fd is not None:
        os.close(fd)


def remove_owned(output: Path, entries: set[str], kind: str) -> None:
    """Remove the listed top-level entries of ``output`` (and nothing else); every entry is
    checked before any is removed, and links are removed, never followed."""
    for name in entries:
        _check_entry(output, kind, name, on_disk=True)
    for name in sorted(entries):
        path = output / name
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        elif path.exists() or path.is_symlink():
            path.unlink()


def _plain(name: object) -> bool:
    return (isinstance(name, str) and name not in ("", ".", "..") and "/" not in name
            and "\\" not in name and "\0" not in name and name not in _OURS)  # fmt: skip


def _check_entry(output: Path, kind: str, name: object, on_disk: bool = False) -> None:
    """Refuse an entry that is not a plain name this kind writes. A run's task or ensemble
    member folders and a sweep's recipe runs have free names: on disk they must be a prompt
    folder, or a folder with a run's marker."""
    phrase, names = KINDS[kind]
    if not _plain(name):
        raise MarkerError(
            f"{output / MARKER} lists {name!r}, not a plain file name in the folder; "
            "it was not written by softprompt: remove the folder's files by hand"
        )
    if name in names:
        return
    if kind not in ("run", "sweep"):
        raise MarkerError(f"{output / MARKER} lists {name!r}, which {phrase} never writes; "
                          "remove the folder's files by hand")  # fmt: skip
    path = output / name
    if on_disk and path.exists() and not _sub_output(path, kind):
        raise MarkerError(
            f"{output / MARKER} lists {name!r}, which is not a folder {phrase} writes; "
            "remove the folder's files by hand"
        )


def _sub_output(path: Path, kind: str) -> bool:
    if path.is_symlink() or not path.is_dir():
        return False
    inside = {p.name for p in path.iterdir()}
    if kind == "run":  # a task's or an ensemble member's prompt
        return inside <= PROMPT_NAMES | _OURS
    return MARKER in inside  # a sweep's recipe: a run with its own marker


def _known(kind: object) -> bool:
    return isinstance(kind, str) and kind in KINDS


def _read_marker(output: Path, kind: str) -> set[str]:
    """The entries of a marker that proves it is softprompt's ``kind`` output, else a
    MarkerError (nothing is removed for a marker that is not believed)."""
    path = output / MARKER
    try:
        if path.is_symlink() or not path.is_file() or path.stat().st_size > 1_000_000:
            raise ValueError("not a small plain file")
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError):
        raise MarkerError(f"{path} is damaged; remove the folder's files by hand") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT or not _known(data.get("kind")):
        raise MarkerError(
            f"{path} was not written by this version of softprompt (no format {FORMAT!r} and "
            "kind); softprompt will not remove or reuse the folder's files: choose another "
            "--output, or remove them by hand"
        )
    if data["kind"] != kind:
        raise ConfigError(
            f"{output} holds {KINDS[data['kind']][0]}, not {KINDS[kind][0]}; softprompt never "
            "replaces one kind of output with another: choose another --output"
        )
    entries = data.get("entries")
    if not isinstance(entries, list):
        raise MarkerError(f"{path}: 'entries' is not a list of names; remove the folder's "
                          "files by hand")  # fmt: skip
    for name in entries:
        _check_entry(output, kind, name, on_disk=True)
    _MANIFESTS[output.resolve()] = (kind, set(entries))
    return set(entries)


def _write_marker(output: Path, kind: str, entries: set[str]) -> None:
    _MANIFESTS[output.resolve()] = (kind, set(entries))
    body = {"format": FORMAT, "kind": kind, "written_by": "softprompt",
            "updated": time.strftime("%Y-%m-%dT%H:%M:%SZ"), "entries": sorted(entries)}  # fmt: skip
    _atomic(output / MARKER, lambda p: p.write_text(json.dumps(body, indent=1) + "\n"))


def _owner(path: Path) -> tuple[Path, str, set[str]] | None:
    """(root, kind, entries) of the nearest owned folder holding ``path``, if any."""
    for root in path.parents:
        if root in _MANIFESTS:
            return (root, *_MANIFESTS[root])
        if (root / MARKER).exists():
            try:
                data = json.loads((root / MARKER).read_text(encoding="utf-8"))
                kind = data["kind"] if isinstance(data, dict) else None
            except (OSError, ValueError, RecursionError, KeyError):
                return None  # not believed: nothing is recorded in it
            return (root, kind, _read_marker(root, kind)) if _known(kind) else None
        if root.parent == root:
            return None
    return None


def record(path: Path) -> None:
    """Note ``path`` as written by softprompt in the marker of the owned folder holding it
    (if any): its top-level entry there is then softprompt's to replace. A name its kind
    never writes is not recorded (it is then never removed)."""
    path = Path(path).resolve()
    owner = _owner(path)
    if owner is None:
        return
    root, kind, entries = owner
    name = path.relative_to(root).parts[0]
    if name in entries or not _plain(name):
        return
    try:
        _check_entry(root, kind, name)
    except MarkerError:
        return
    _write_marker(root, kind, entries | {name})


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
    """A full disk (or quota) as a DiskFullError naming the file and what to run once space
    is free; other errors unchanged."""
    full = getattr(err, "errno", None) in (errno.ENOSPC, errno.EDQUOT)
    if full or "No space left on device" in str(err) or "os error 28" in str(err):
        return DiskFullError(
            f"the disk is full: could not write {path}. What was written before is intact; "
            f"free some space, then {_retry_advice(Path(path))}"
        )
    return err


def _retry_advice(path: Path) -> str:
    """--resume only where it can work: a run that has a checkpoint to resume from."""
    owner = _owner(path.resolve()) if path.is_absolute() or path.parent.exists() else None
    if owner is not None and owner[1] == "run":
        if any((owner[0] / "checkpoints").glob("step-*")):
            return "run the same command with --resume"
        return "run the same command with --overwrite (no checkpoint was written yet)"
    if owner is not None and owner[1] == "results":
        return "run the same command again"
    return "run the same command again (with --overwrite if it refuses the folder)"
