"""The OpenAI-compatible routes of `softprompt serve` (FastAPI).

Bodies are validated by pydantic; every error, ours or the framework's, is answered as
``{"error": {"message": ..., "type": ..., "code": ...}}`` with a 4xx status when the
client can fix it. A request never reaches the model before it passed every limit.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
import traceback
import uuid
from dataclasses import dataclass

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException

from softprompt.config import ServeConfig
from softprompt.errors import ConfigError, SoftpromptError
from softprompt.loading import LoadedModel
from softprompt.prompt import max_positions
from softprompt.rows import Encoded, encode_chat
from softprompt.serving.batcher import Batcher, Job
from softprompt.serving.guard import KEY_OK, Guard, error_response
from softprompt.serving.playground import add_playground
from softprompt.serving.registry import BASE, ApiError, Entry, PromptStore
from softprompt.serving.schema import Body, ChatBody, CompletionBody, Message
from softprompt.templates import PromptFormat, check_messages


@dataclass
class ServerState:
    loaded: LoadedModel
    cfg: ServeConfig
    store: PromptStore
    batcher: Batcher
    started: int


def create_app(loaded: LoadedModel, cfg: ServeConfig) -> FastAPI:
    """The app with its prompt store and batcher (``app.state.softprompt``); no prompt loaded."""
    if not loaded.kind.serves:
        raise ConfigError(
            f"softprompt serve streams completions from causal and seq2seq LMs; {loaded.name} "
            "is a classification model: use `softprompt generate` or `eval` (or the Python API)"
        )
    app = FastAPI(title="softprompt", version="1")
    batcher = Batcher(loaded, cfg.max_batch_size, cfg.batch_wait_ms, cfg.max_queue)
    store = PromptStore(cfg.prompts, loaded, cfg.allow_mismatch, cfg.max_prompt_tokens)
    state = ServerState(loaded, cfg, store, batcher, int(time.time()))
    app.state.softprompt = state
    _add_error_handlers(app)
    _add_info_routes(app, state)
    if not cfg.no_admin:
        _add_admin_routes(app, state)
    _add_generation_routes(app, state)
    add_playground(app)
    app.add_middleware(Guard, api_key=cfg.api_key, max_bytes=cfg.max_request_bytes)
    return app


def _add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def apierror_response(request: Request, err: ApiError):
        return error_response(err.status, str(err))

    @app.exception_handler(RequestValidationError)
    async def bad_body(request: Request, err: RequestValidationError):
        first = err.errors()[0] if err.errors() else {"loc": (), "msg": "invalid request"}
        where = ".".join(str(p) for p in first.get("loc", ()) if p != "body")
        if first.get("type") == "json_invalid":
            return error_response(400, "the body is not valid JSON")
        return error_response(400, f"{where or 'body'}: {first.get('msg')}")

    @app.exception_handler(HTTPException)
    async def httperror_response(request: Request, err: HTTPException):
        return error_response(err.status_code, str(err.detail))

    @app.exception_handler(Exception)
    async def crash(request: Request, err: Exception):
        # The client learns only that it failed (a message may hold server paths): the
        # details go to the server's log.
        traceback.print_exception(type(err), err, err.__traceback__, file=sys.stderr)
        return error_response(500, f"internal error ({type(err).__name__}); see the server's log")


def _add_info_routes(app: FastAPI, state: ServerState) -> None:
    @app.get("/health")
    async def health(request: Request):
        """ok and counts for anyone; the model and why folders were skipped only with the
        key. 503 when the batcher has stopped (no request could be answered)."""
        skipped = state.store.skipped()
        body = {"status": "ok", "prompts": len(state.store.entries()), "skipped": len(skipped),
                "queue_length": state.batcher.queue_length()}  # fmt: skip
        if request.scope.get("state", {}).get(KEY_OK):
            memory = {e.name: {"bytes": e.nbytes, "deep": e.prefix.deep}
                      for e in state.store.entries()}  # fmt: skip
            body.update(base_model=state.loaded.name, skipped=skipped, prompt_memory=memory)
        if not state.batcher.alive():
            body["status"] = "error: the generation worker has stopped; restart the server"
            return JSONResponse(body, status_code=503)
        return body

    @app.get("/metrics", response_class=PlainTextResponse)
    async def metrics():
        m = state.batcher.metrics
        lines = [
            ("requests_total", m.requests),
            ("failed_requests_total", m.failed_requests),
            ("prompt_tokens_total", m.prompt_tokens),
            ("completion_tokens_total", m.completion_tokens),
            ("batches_total", m.batches),
            ("batch_rows_total", m.batch_rows),
            ("queue_length", state.batcher.queue_length()),
            ("prompts_loaded", len(state.store.entries())),
            ("prompt_bytes", sum(e.nbytes for e in state.store.entries())),
        ]
        return "".join(f"softprompt_{name} {value}\n" for name, value in lines)

    @app.get("/v1/models")
    async def models():
        data = [_model_card(BASE, state.started, state.loaded.name)]
        data += [_model_card(e.name, e.loaded_at, BASE) for e in state.store.entries()]
        return {"object": "list", "data": data}


def _add_admin_routes(app: FastAPI, state: ServerState) -> None:
    @app.post("/v1/prompts/{name}")
    def add_prompt(name: str):  # sync: compiling runs in the thread pool
        entry = state.store.load(name)
        return {"loaded": entry.name, "num_virtual_tokens": entry.prefix.length}

    @app.delete("/v1/prompts/{name}")
    def remove_prompt(name: str):
        state.store.remove(name)
        return {"removed": name}

    @app.post("/v1/rescan")
    def rescan():
        return state.store.rescan()


def _model_card(name: str, created: int, parent: str) -> dict:
    return {"id": name, "object": "model", "created": created, "owned_by": "softprompt",
            "root": parent}  # fmt: skip


def _add_generation_routes(app: FastAPI, state: ServerState) -> None:
    # Checking, tokenizing and compiling a prompt's head run in the thread pool, so a large
    # request never holds up the event loop (and /health) while it is prepared.
    @app.post("/v1/completions")
    async def completions(body: CompletionBody):
        loop = asyncio.get_running_loop()
        rows = await run_in_threadpool(_completion_jobs, state, body, loop)
        return await _answer(state, body, rows, chat=False)

    @app.post("/v1/chat/completions")
    async def chat(body: ChatBody):
        loop = asyncio.get_running_loop()
        rows = await run_in_threadpool(_chat_jobs, state, body, loop)
        return await _answer(state, body, rows, chat=True)


def _completion_jobs(state: ServerState, body: CompletionBody, loop) -> list[Job]:
    texts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
    if not texts or len(texts) > state.cfg.max_batch_size:
        raise ApiError(400, f"give 1 to {state.cfg.max_batch_size} prompts per request")
    if body.stream and len(texts) > 1:
        raise ApiError(400, "stream supports one prompt per request")
    _check_chars(state, texts)
    entry = _entry(state, body.model)
    if entry is not None and entry.fmt is not None and entry.fmt.chat:
        raise ApiError(
            400, f"prompt {entry.name!r} was trained on conversations: use /v1/chat/completions"
        )
    fmt = entry.fmt if entry is not None and entry.fmt is not None else PromptFormat()
    tok = state.loaded.tokenizer
    try:
        encoded = [state.loaded.kind.encode(tok, fmt, t, body.fields) for t in texts]
    except SoftpromptError as err:
        raise ApiError(400, str(err)) from None
    return _rows(state, body, encoded, entry, body.max_tokens or 16, loop)


def _chat_jobs(state: ServerState, body: ChatBody, loop) -> list[Job]:
    _check_chars(state, [m.text for m in body.messages])
    entry = _entry(state, body.model)
    if not state.loaded.kind.chat:
        raise ApiError(400, f"this server's model is {state.loaded.kind.name}: no "
                       "conversations; use /v1/completions")  # fmt: skip
    fmt = entry.fmt if entry is not None else None
    if fmt is not None and not fmt.chat and fmt.template is not None:
        raise ApiError(
            400,
            f"prompt {entry.name!r} was trained on raw text with the template "
            f"{fmt.template!r}: use /v1/completions",
        )
    encoded = _chat_encoded(state.loaded.tokenizer, body.messages, fmt)
    max_tokens = body.max_completion_tokens or body.max_tokens or min(256, state.cfg.max_tokens)
    end = set(fmt.stop_ids(state.loaded.tokenizer)) if fmt is not None and fmt.chat else set()
    return _rows(state, body, [encoded], entry, max_tokens, loop, end)


CHARS_PER_TOKEN = 16  # far above any tokenizer's average: a cheap check before tokenizing


def _check_chars(state: ServerState, texts: list[str | None]) -> None:
    limit = state.cfg.max_prompt_tokens * CHARS_PER_TOKEN
    if sum(len(t or "") for t in texts) > limit:
        raise ApiError(400, f"the input is over {limit} characters, far more than this "
                       f"server's {state.cfg.max_prompt_tokens}-token limit")  # fmt: skip


def _entry(state: ServerState, model: str) -> Entry | None:
    if model in (BASE, state.loaded.name):
        return None
    entry = state.store.get(model)
    if entry is None:
        raise ApiError(
            404,
            f"model {model!r} not found: GET /v1/models lists the loaded ones; "
            "POST /v1/rescan loads prompts added to the folder",
        )
    return entry


def _chat_encoded(tokenizer, messages: list[Message], fmt: PromptFormat | None) -> Encoded:
    """The conversation rendered as training rendered it (``fmt``: the prompt's chat format),
    or, for the base model and prompts saved without a format, by the tokenizer's chat
    template with any prompt first (or as 'role: content' lines, without a template)."""
    plain = [{"role": m.role, "content": m.text} for m in messages]
    if fmt is None or not fmt.chat:
        if not getattr(tokenizer, "chat_template", None):
            text = "".join(f"{m['role']}: {m['content']}\n" for m in plain) + "assistant:"
            return None, tokenizer(text, add_special_tokens=True)["input_ids"]
        fmt = PromptFormat(chat=True)
    try:
        return encode_chat(tokenizer, fmt, check_messages(plain, "messages"))
    except SoftpromptError as err:
        raise ApiError(400, str(err)) from None


def _rows(
    state: ServerState,
    body: Body,
    encoded: list[Encoded],
    entry: Entry | None,
    max_tokens: int,
    loop: asyncio.AbstractEventLoop,
    end_ids: set[int] | None = None,
) -> list[Job]:
    """Batcher jobs for one request, after every limit has been checked. A prompt behind a
    head runs from the prefix compiled for that head; the base model reads the head as text."""
    cfg = state.cfg
    if max_tokens > cfg.max_tokens:
        raise ApiError(400, f"max_tokens {max_tokens} is over this server's limit {cfg.max_tokens}")
    stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
    if len(stop) > 4 or any(not s for s in stop):
        raise ApiError(400, "stop takes at most 4 non-empty strings")
    n_virtual = entry.prefix.length if entry else 0
    positions = max_positions(state.loaded.model)
    for head, row in encoded:
        length = n_virtual + len(row) + len(head or [])
        if len(row) == 0:
            raise ApiError(400, "the prompt is empty (no tokens)")
        if length > cfg.max_prompt_tokens:
            raise ApiError(
                400,
                f"the prompt is {length} tokens; this server's limit is {cfg.max_prompt_tokens}",
            )
        if positions and length + max_tokens > positions:
            raise ApiError(400, f"prompt + max_tokens exceed the model's {positions} positions")
    model, tok = state.loaded.model, state.loaded.tokenizer
    voters = entry.members if entry is not None and entry.members else [entry]
    if len(voters) > 1 and body.stream:
        raise ApiError(400, f"{entry.name!r} is an ensemble: its answer is its members' vote, "
                       "known only when all have finished; leave out stream")  # fmt: skip
    temperature = cfg.temperature if body.temperature is None else body.temperature
    jobs = []
    for head, ids in encoded:  # an ensemble: one row per member, side by side in the batch
        for voter in voters:
            prefix = voter.prefix_for(model, head) if voter else None
            row = ids if voter else (head or []) + ids
            labels, label_ids = (voter.labels, voter.label_ids) if voter else (None, None)
            jobs.append(Job(row, prefix, max_tokens, temperature, body.top_p, stop, tok,
                            loop, end_ids=set(end_ids or ()), labels=labels,
                            label_ids=label_ids))  # fmt: skip
    return jobs


async def _answer(state: ServerState, body: Body, rows: list[Job], chat: bool):
    state.batcher.metrics.add(requests=1)
    if not state.batcher.alive():
        raise ApiError(503, "the server's generation worker has stopped; restart the server")
    if not state.batcher.submit(rows):
        state.batcher.metrics.add(failed_requests=1)
        raise ApiError(429, f"the server is busy ({state.cfg.max_queue} rows queued); retry later")
    rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
    if body.stream:
        return StreamingResponse(
            _stream(rows[0], body.model, rid, chat), media_type="text/event-stream"
        )
    for row in rows:
        while (event := await row.events.get())[0] == "text":
            pass
        if event[0] == "error":
            raise ApiError(500, event[1])
    entry = state.store.get(body.model)
    k = len(entry.members) if entry is not None and entry.members else 1
    winners = [_voted(rows[i : i + k]) for i in range(0, len(rows), k)]
    choices = [_choice(i, r.text, r.finish_reason, chat) for i, r in enumerate(winners)]
    prompt_tokens = sum(len(r.ids) for r in rows)
    completion_tokens = sum(len(r.tokens) for r in rows)
    usage = {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
             "total_tokens": prompt_tokens + completion_tokens}  # fmt: skip
    kind = "chat.completion" if chat else "text_completion"
    return {"id": rid, "object": kind, "created": int(time.time()), "model": body.model,
            "choices": choices, "usage": usage}  # fmt: skip


def _voted(rows: list[Job]) -> Job:
    """The answer most members gave (compared without surrounding whitespace); a tie goes
    to the earliest member among the tied."""
    texts = [r.text.strip() for r in rows]
    return rows[max(range(len(rows)), key=lambda j: (texts.count(texts[j]), -j))]


def _choice(index: int, text: str, finish: str | None, chat: bool) -> dict:
    if chat:
        message = {"role": "assistant", "content": text}
        return {"index": index, "message": message, "finish_reason": finish}
    return {"index": index, "text": text, "logprobs": None, "finish_reason": finish}


async def _stream(row: Job, model: str, rid: str, chat: bool):
    """Server-sent events as OpenAI sends them: one chunk per text delta, then [DONE]."""
    kind = "chat.completion.chunk" if chat else "text_completion"

    def chunk(text: str | None, finish: str | None) -> str:
        if chat:
            delta = {"role": "assistant", "content": text} if text is not None else {}
            choice = {"index": 0, "delta": delta, "finish_reason": finish}
        else:
            choice = {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish}
        payload = {"id": rid, "object": kind, "created": int(time.time()), "model": model,
                   "choices": [choice]}  # fmt: skip
        return f"data: {json.dumps(payload)}\n\n"

    try:
        while True:
            event, value = await row.events.get()
            if event == "text":
                yield chunk(value, None)
            elif event == "done":
                yield chunk(None, value)
                break
            else:  # the status line is sent already: report the error in the stream
                error = {"error": {"message": value, "type": "server_error"}}
                yield f"data: {json.dumps(error)}\n\n"
                break
        yield "data: [DONE]\n\n"
    finally:  # the client hung up (or the stream ended): generate no more for it
        row.cancelled = True
