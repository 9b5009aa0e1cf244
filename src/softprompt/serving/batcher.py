"""Dynamic batching for the server: requests for any prompt share one generate call.

A worker thread owns the model. It takes the oldest waiting request, waits a short
window for others to arrive, and runs every waiting request with the same sampling
settings as one mixed-prompt batch (``generation.generate_ids``). Each step a
stopping criterion hands the new tokens to their requests, which apply their own
``max_tokens`` and stop strings and stream text to the event loop that waits for them.
"""

from __future__ import annotations

import asyncio
import sys
import threading
import time
from dataclasses import dataclass, field

import torch
from transformers import (
    GenerationConfig,
    LogitsProcessorList,
    StoppingCriteria,
    StoppingCriteriaList,
)

from softprompt.generation import LabelsOnly, cut_at_label
from softprompt.loading import LoadedModel
from softprompt.prefix import Prefix


@dataclass
class Metrics:
    """Counters shown at /metrics; updated under one lock from the worker and the app."""

    requests: int = 0
    failed_requests: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    batches: int = 0
    batch_rows: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def add(self, **counts: int) -> None:
        with self.lock:
            for name, value in counts.items():
                setattr(self, name, getattr(self, name) + value)


@dataclass(eq=False)  # identity: two requests with the same text are still two
class Job:
    """One row to generate, and the channel its text goes back through."""

    ids: list[int]
    prefix: Prefix | None
    max_tokens: int
    temperature: float
    top_p: float
    stop: list[str]
    tokenizer: object
    loop: asyncio.AbstractEventLoop
    end_ids: set[int] = field(default_factory=set)  # also end the answer (a chat's end of turn)
    labels: list[str] | None = None  # its prompt's labels: the answer is one of them
    label_ids: list[list[int]] | None = None  # ... as token sequences (``LabelsOnly``)
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    tokens: list[int] = field(default_factory=list)
    text: str = ""
    sent: int = 0  # characters of ``text`` already streamed
    finish_reason: str | None = None
    cancelled: bool = False  # its client went away: generate no more for it

    @property
    def sampling(self) -> tuple[float, float]:
        """Rows of one batch must share these: HF generate samples the whole batch alike."""
        return (self.temperature, self.top_p if self.temperature > 0 else 1.0)

    def push(self, token: int, eos: set[int]) -> None:
        """Take one new token: stop on EOS, a stop string or max_tokens; stream the rest."""
        if token in eos:
            return self.finish("stop")
        self.tokens.append(token)
        self.text = self.tokenizer.decode(self.tokens, skip_special_tokens=True)
        cut = min((i for s in self.stop if (i := self.text.find(s)) >= 0), default=-1)
        if cut >= 0:
            self.text = self.text[:cut]
            return self.finish("stop")
        if self.labels and (label := cut_at_label(self.text, self.labels)) != self.text:
            self.text = label
            return self.finish("stop")
        if len(self.tokens) >= self.max_tokens:
            return self.finish("length")
        # Hold back what could be the start of a stop string or half a UTF-8 character.
        hold = max((len(s) - 1 for s in self.stop), default=0)
        safe = len(self.text.rstrip("\ufffd")) - hold
        self._emit(safe)

    def finish(self, reason: str) -> None:
        self.finish_reason = reason
        self._emit(len(self.text))
        self.loop.call_soon_threadsafe(self.events.put_nowait, ("done", reason))

    def fail(self, message: str) -> None:
        self.finish_reason = "error"
        self.loop.call_soon_threadsafe(self.events.put_nowait, ("error", message))

    def _emit(self, upto: int) -> None:
        if upto > self.sent:
            delta, self.sent = self.text[self.sent : upto], upto
            self.loop.call_soon_threadsafe(self.events.put_nowait, ("text", delta))


class _Feed(StoppingCriteria):
    """Called by generate after every step: hands each row its token, says who is done."""

    def __init__(self, requests: list[Job], eos: set[int], stopping: threading.Event):
        self.requests, self.eos, self.stopping = requests, eos, stopping

    def __call__(self, input_ids: torch.LongTensor, scores, **kwargs) -> torch.BoolTensor:
        for req, token in zip(self.requests, input_ids[:, -1].tolist()):
            if req.finish_reason is None and (req.cancelled or self.stopping.is_set()):
                req.finish_reason = "cancelled"  # nobody reads it: no event is sent
            elif req.finish_reason is None:
                req.push(token, self.eos | req.end_ids)
        done = [r.finish_reason is not None for r in self.requests]
        return torch.tensor(done, device=input_ids.device)


class Batcher:
    """Queue + worker thread: collects requests for ``wait_ms`` and runs them together."""

    def __init__(
        self, loaded: LoadedModel, max_batch_size: int, wait_ms: float, max_queue: int
    ) -> None:
        self.loaded, self.max_batch_size = loaded, max_batch_size
        self.wait_s, self.max_queue = wait_ms / 1000, max_queue
        self.metrics = Metrics()
        self._pending: list[Job] = []
        self._cond = threading.Condition()
        self._stopped = False
        self._stopping = threading.Event()  # set by close(): a running batch ends early
        self.error: str | None = None  # why the worker stopped, if it did on its own
        self._thread = threading.Thread(target=self._loop, name="softprompt-batcher", daemon=True)
        self._thread.start()

    def queue_length(self) -> int:
        with self._cond:
            return len(self._pending)

    def alive(self) -> bool:
        """Whether the worker still takes requests (/health says so)."""
        return self._thread.is_alive() and self.error is None and not self._stopped

    def submit(self, requests: list[Job]) -> bool:
        """Queue the rows of one API request together; False if the queue is full."""
        with self._cond:
            if len(self._pending) + len(requests) > self.max_queue:
                return False
            self._pending.extend(requests)
            self._cond.notify()
        return True

    def close(self) -> None:
        """Stop the worker: the running batch ends at its next token, waiting rows fail."""
        self._stopping.set()
        with self._cond:
            self._stopped = True
            self._cond.notify()
        self._thread.join(timeout=30)
        self._fail_pending("the server is shutting down")

    def _fail_pending(self, message: str) -> None:
        with self._cond:
            pending, self._pending = self._pending, []
        for req in pending:
            try:
                req.fail(message)
            except RuntimeError:  # its event loop has closed: nobody waits for it
                pass

    def _next_batch(self) -> list[Job]:
        with self._cond:
            while True:
                while not self._pending and not self._stopped:
                    self._cond.wait()
                deadline = time.monotonic() + self.wait_s
                # A short window lets requests that arrive together share one batch.
                while len(self._pending) < self.max_batch_size and not self._stopped:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        break
                    self._cond.wait(left)
                if self._stopped:
                    return []
                self._pending = [r for r in self._pending if not r.cancelled]
                if self._pending:
                    break
            key = self._pending[0].sampling
            batch = [r for r in self._pending if r.sampling == key][: self.max_batch_size]
            chosen = {id(r) for r in batch}
            self._pending = [r for r in self._pending if id(r) not in chosen]
        return batch

    def _loop(self) -> None:
        try:
            self._serve()
        except BaseException as err:  # noqa: BLE001 - recorded: /health reports it
            self.error = f"{type(err).__name__}: {err}"
            print(f"[softprompt] the batcher stopped: {self.error}", file=sys.stderr)
            self._fail_pending(f"the server's generation worker stopped ({self.error})")

    def _serve(self) -> None:
        while True:
            batch = self._next_batch()
            if not batch:
                return
            self.metrics.add(batches=1, batch_rows=len(batch))
            try:
                self._run(batch)
            except Exception as err:  # noqa: BLE001 - one bad batch must not stop the server
                if len(batch) == 1:
                    self._failed(batch[0], err)
                    continue
                for req in batch:  # run alone, so only the request at fault fails
                    if req.finish_reason is not None:  # answered before the failure
                        continue
                    if req.sent:  # its stream has begun: a rerun would repeat text
                        self._failed(req, err)
                        continue
                    try:
                        self._run([req])
                    except Exception as single:  # noqa: BLE001
                        self._failed(req, single)

    def _run(self, batch: list[Job]) -> None:
        tok = self.loaded.tokenizer
        for req in batch:  # a retried row starts again from nothing
            req.tokens, req.text, req.sent, req.finish_reason = [], "", 0, None
        temperature, top_p = batch[0].sampling
        gen_cfg = GenerationConfig(
            max_new_tokens=max(r.max_tokens for r in batch),
            do_sample=temperature > 0,
            temperature=temperature if temperature > 0 else None,
            top_p=top_p if temperature > 0 else None,
            top_k=None,
            pad_token_id=tok.pad_token_id,
            eos_token_id=tok.eos_token_id,
        )
        eos = {tok.eos_token_id} if tok.eos_token_id is not None else set()
        feed = _Feed(batch, eos, self._stopping)
        only = None
        if any(r.label_ids for r in batch):
            only = LogitsProcessorList([LabelsOnly([r.label_ids for r in batch], tok.eos_token_id)])
        self.loaded.kind.generate_ids(
            self.loaded.model,
            [r.ids for r in batch],
            [r.prefix for r in batch],
            gen_cfg,
            stopping=StoppingCriteriaList([feed]),
            processors=only,
        )
        for req in batch:
            if req.finish_reason is None:  # the model's own limit ended the row
                req.finish("length")
            self.metrics.add(prompt_tokens=len(req.ids), completion_tokens=len(req.tokens))

    def _failed(self, req: Job, err: Exception) -> None:
        print(f"[softprompt] request failed: {type(err).__name__}: {err}", file=sys.stderr)
        self.metrics.add(failed_requests=1)
        req.fail(f"generation failed: {type(err).__name__}: {err}")
