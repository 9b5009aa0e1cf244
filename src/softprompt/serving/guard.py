"""ASGI middleware in front of every route: the API key, and the body's size, counted as it
arrives (from Content-Length, or byte by byte for a chunked body) so an oversized body is a
413 before any route reads it."""

from __future__ import annotations

import hmac

from fastapi.responses import JSONResponse

from softprompt.serving.playground import PATHS as PLAYGROUND

KEY_OK = "softprompt_key_ok"  # in scope["state"]: did the request carry the key (or none is set)


class Guard:
    """The API key (every route but /health and the playground page), and the body size:
    refused from Content-Length before reading, or as soon as the bytes read pass the limit
    (a chunked body has no Content-Length). The body is read here, whole, before any route
    runs: routes never see a body over the limit."""

    def __init__(self, app, api_key: str | None, max_bytes: int):
        self.app, self.api_key, self.max_bytes = app, api_key, max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        authorised = not self.api_key or self._authorised(headers)
        scope.setdefault("state", {})[KEY_OK] = authorised
        public = scope["path"] == "/health" or (
            scope["path"] in PLAYGROUND and scope["method"] == "GET"
        )  # the playground page is static: its API calls carry the key
        if not authorised and not public:
            message = "invalid or missing API key: send 'Authorization: Bearer <key>'"
            return await error_response(401, message)(scope, receive, send)
        length = headers.get("content-length", "0")
        if not length.isdigit() or int(length) > self.max_bytes:
            return await self._too_large(scope, receive, send)
        messages = await self._read_body(receive)
        if messages is None:
            return await self._too_large(scope, receive, send)

        async def replay():
            return messages.pop(0) if messages else await receive()

        await self.app(scope, replay, send)

    async def _read_body(self, receive) -> list[dict] | None:
        """The request's body messages, or None once they pass the limit."""
        messages, seen = [], 0
        while True:
            message = await receive()
            messages.append(message)
            if message["type"] != "http.request":  # the client went away
                return messages
            seen += len(message.get("body", b""))
            if seen > self.max_bytes:
                return None
            if not message.get("more_body", False):
                return messages

    def _authorised(self, headers: dict[str, str]) -> bool:
        scheme, _, key = headers.get("authorization", "").partition(" ")
        return scheme.lower() == "bearer" and hmac.compare_digest(
            key.strip().encode(), self.api_key.encode()
        )

    async def _too_large(self, scope, receive, send):
        message = f"the request body is over this server's limit of {self.max_bytes} bytes"
        await error_response(413, message)(scope, receive, send)


def error_response(status: int, message: str) -> JSONResponse:
    """An error as OpenAI answers it: {"error": {"message", "type", "param", "code"}}."""
    kind = "invalid_request_error" if status < 500 else "server_error"
    body = {"error": {"message": message, "type": kind, "param": None, "code": status}}
    return JSONResponse(body, status_code=status)
