"""`softprompt serve`: one frozen model, many compiled soft prompts, an OpenAI-compatible API.

- server.py   the prompt folder (PromptStore), model loading, uvicorn, BackgroundServer
- api.py      the FastAPI routes
- batcher.py  dynamic batching across prompts in a worker thread
"""

from softprompt.serving.server import BackgroundServer, serve

__all__ = ["BackgroundServer", "serve"]
