"""`softprompt serve`: one frozen model, many soft prompts, an OpenAI-compatible HTTP API.

Every sub-folder of ``--prompts`` holding a saved prompt is a model of the API, named
after the folder; ``base`` is the model without a prompt. Prompts are compiled into
prefix caches when loaded, and requests for any of them share batches (``batcher.py``).

Endpoints: GET /v1/models, POST /v1/completions, POST /v1/chat/completions (both with
``stream``), POST /v1/prompts/{name} (load or reload), DELETE /v1/prompts/{name},
POST /v1/rescan (sync with the folder), GET /health, GET /metrics (Prometheus text).
"""

from __future__ import annotations

import re
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from softprompt.artifacts import ADAPTER_WEIGHTS, load_prompt, read_meta
from softprompt.config import EMBEDDED_MODEL, ModelConfig, ServeConfig
from softprompt.errors import ConfigError, SoftpromptError
from softprompt.generation import PromptPrefix, compile_prefix
from softprompt.loading import LoadedModel, load_model, say

BASE = "base"  # the API name of the model without a prompt
NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


class ApiError(SoftpromptError):
    """An error answered with an HTTP status and a one-line message."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


@dataclass
class Entry:
    """A loaded prompt: its compiled prefix and the template it was trained with."""

    name: str
    prefix: PromptPrefix
    template: str | None
    loaded_at: int = field(default_factory=lambda: int(time.time()))


class PromptStore:
    """The prompts of one folder, compiled for one model; safe to use from any thread."""

    def __init__(self, folder: str | Path, loaded: LoadedModel, allow_mismatch: bool = False):
        self.root = Path(folder).expanduser().resolve()
        self.loaded, self.allow_mismatch = loaded, allow_mismatch
        self._entries: dict[str, Entry] = {}
        self._lock = threading.Lock()

    def path_of(self, name: str) -> Path:
        """The folder of prompt ``name``; names that could leave the prompts folder are refused."""
        if name == BASE or not NAME_RE.fullmatch(name) or ".." in name:
            raise ApiError(
                400, f"invalid prompt name {name!r}: use letters, digits, '.', '_' and '-'"
            )
        path = (self.root / name).resolve()  # follows links: a link out of the folder is refused
        if path.parent != self.root:
            raise ApiError(400, f"prompt {name!r} points outside the prompts folder")
        return path

    def load(self, name: str) -> Entry:
        """(Re)load prompt ``name`` from its sub-folder and compile its prefix."""
        path = self.path_of(name)
        if not (path / ADAPTER_WEIGHTS).is_file():
            raise ApiError(404, f"no saved prompt {name!r} in {self.root}")
        try:
            prompt, meta = load_prompt(path, self.loaded.model, self.allow_mismatch)
        except SoftpromptError as err:
            raise ApiError(400, str(err)) from None
        entry = Entry(name, compile_prefix(self.loaded.model, prompt), meta.get("template"))
        with self._lock:
            self._entries[name] = entry
        return entry

    def remove(self, name: str) -> None:
        with self._lock:
            if self._entries.pop(name, None) is None:
                raise ApiError(404, f"prompt {name!r} is not loaded")

    def get(self, name: str) -> Entry | None:
        with self._lock:
            return self._entries.get(name)

    def entries(self) -> list[Entry]:
        with self._lock:
            return sorted(self._entries.values(), key=lambda e: e.name)

    def rescan(self) -> dict:
        """Load sub-folders not loaded yet, drop prompts whose folder is gone."""
        on_disk = {p.name for p in self.root.iterdir() if (p / ADAPTER_WEIGHTS).is_file()}
        added, errors = [], {}
        for name in sorted(on_disk - {e.name for e in self.entries()}):
            try:
                self.load(name)
                added.append(name)
            except ApiError as err:
                errors[name] = str(err)
        removed = [e.name for e in self.entries() if e.name not in on_disk]
        for name in removed:
            self.remove(name)
        return {"added": added, "removed": removed, "errors": errors}


def base_model_of(folder: Path) -> str:
    """The base model named by the first prompt of ``folder``, else the embedded one."""
    for sub in sorted(folder.iterdir()):
        name = read_meta(sub).get("base_model", {}).get("name") if sub.is_dir() else None
        if name:
            return name
    return EMBEDDED_MODEL


def serve(cfg: ServeConfig) -> None:
    """Load the model and the prompts, then answer HTTP requests until interrupted."""
    import uvicorn

    from softprompt.serving.api import create_app

    folder = Path(cfg.prompts).expanduser()
    if not folder.is_dir():
        raise ConfigError(f"--prompts {cfg.prompts} is not a folder; give the folder of prompts")
    loaded = load_model(ModelConfig(model=cfg.model or base_model_of(folder), dtype=cfg.dtype))
    app = create_app(loaded, cfg)
    report = app.state.softprompt.store.rescan()
    for name, message in report["errors"].items():
        say(f"skipped prompt {name}: {message}")
    say(f"serving {BASE} and {len(report['added'])} prompts on http://{cfg.host}:{cfg.port}/v1")
    try:
        uvicorn.run(app, host=cfg.host, port=cfg.port, log_level="warning")
    finally:
        app.state.softprompt.batcher.close()


class BackgroundServer:
    """A uvicorn server in a thread (tests and benchmarks); ``stop()`` ends it."""

    def __init__(self, app, host: str = "127.0.0.1", port: int = 0):
        import uvicorn

        config = uvicorn.Config(app, host=host, port=port, log_level="warning", lifespan="off")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("the server did not start")
            time.sleep(0.02)
        self.port = self.server.servers[0].sockets[0].getsockname()[1]
        self.url = f"http://{host}:{self.port}"

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)
