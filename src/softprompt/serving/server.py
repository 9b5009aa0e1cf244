"""`softprompt serve`: one frozen model, many soft prompts, an OpenAI-compatible HTTP API.

- registry.py  the prompt folder (PromptStore): load, compile, rescan
- api.py       the FastAPI routes
- batcher.py   dynamic batching across prompts in a worker thread
- server.py    model loading, uvicorn, BackgroundServer (tests and benchmarks)

Endpoints: GET /v1/models, POST /v1/completions, POST /v1/chat/completions (both with
``stream``), POST /v1/prompts/{name} (load or reload), DELETE /v1/prompts/{name},
POST /v1/rescan (sync with the folder), GET /health, GET /metrics (Prometheus text).
"""

from __future__ import annotations

import threading
import time
from dataclasses import replace
from pathlib import Path

from softprompt.config import ServeConfig
from softprompt.console import say
from softprompt.errors import ConfigError
from softprompt.loading import load_model
from softprompt.serving.api import create_app
from softprompt.serving.registry import BASE, base_model_of


def serve(cfg: ServeConfig) -> None:
    """Load the model and the prompts, then answer HTTP requests until interrupted."""
    try:
        import uvicorn
    except ImportError:
        raise ConfigError(
            "softprompt serve needs its extra: pip install 'softprompt[serve]'"
        ) from None
    folder = Path(cfg.prompts).expanduser()
    if not folder.is_dir():
        raise ConfigError(f"--prompts {cfg.prompts} is not a folder; give the folder of prompts")
    loaded = load_model(replace(cfg.model, model=cfg.model.model or base_model_of(folder)))
    app = create_app(loaded, cfg)
    report = app.state.softprompt.store.rescan()
    for name, message in report["errors"].items():
        say(f"skipped prompt {name}: {message}")
    say(f"serving {BASE} and {len(report['added'])} prompts on http://{cfg.host}:{cfg.port}/v1")
    try:
        # SIGTERM ends open requests after a few seconds, then the batcher (finally)
        uvicorn.run(app, host=cfg.host, port=cfg.port, log_level="warning",
                    timeout_graceful_shutdown=5)  # fmt: skip
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
