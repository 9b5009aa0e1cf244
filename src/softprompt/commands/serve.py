"""`softprompt serve`: one model, every prompt of a folder, over HTTP."""

from __future__ import annotations

from softprompt.config import ServeConfig
from softprompt.errors import SoftpromptError


def main(cfg: ServeConfig) -> None:
    """The command: serve until stopped (the serve extra must be installed)."""
    try:
        from softprompt.serving import serve  # fastapi / uvicorn come with the serve extra
    except ImportError as err:
        raise SoftpromptError(
            f"softprompt serve needs its extra ({err.name} is missing): "
            "pip install 'softprompt[serve]'"
        ) from None
    serve(cfg)
