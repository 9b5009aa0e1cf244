"""`softprompt serve`: one frozen model, many compiled soft prompts, an OpenAI-compatible API.

- registry.py  the prompt folder (PromptStore): load, compile, rescan
- api.py       the FastAPI routes
- batcher.py   dynamic batching across prompts in a worker thread
- server.py    model loading, uvicorn, BackgroundServer
"""

from softprompt.serving.server import BackgroundServer, serve

__all__ = ["BackgroundServer", "serve"]
