"""What a user sees on stderr: progress messages and warnings.

Under several processes (torchrun, accelerate) only the first one speaks, so a message
appears once however many processes run.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar


def is_first_process() -> bool:
    """True in a single process, and in process 0 of a launched group."""
    return os.environ.get("RANK", "0") == "0"


def clock(seconds: float) -> str:
    """'42s', '3m05s': a duration as a progress line shows it."""
    minutes, sec = divmod(round(seconds), 60)
    return f"{minutes}m{sec:02d}s" if minutes else f"{sec}s"


def say(msg: str) -> None:
    """A progress message on stderr."""
    if is_first_process():
        print(f"[softprompt] {msg}", file=sys.stderr, flush=True)


def warn(msg: str) -> None:
    """A warning on stderr."""
    if is_first_process():
        print(f"[softprompt] warning: {msg}", file=sys.stderr, flush=True)


@contextmanager
def ticking(desc: str) -> Iterator[None]:
    """On a terminal, a line counting the seconds ``desc`` has run (for work with no
    progress to show); elsewhere nothing. The caller says how long it took at the end."""
    if not (is_first_process() and sys.stderr.isatty()):
        yield
        return
    stop, start = threading.Event(), time.perf_counter()

    def tick() -> None:
        while not stop.wait(1.0):
            seconds = time.perf_counter() - start
            print(f"\r[softprompt] {desc}: {seconds:.0f} s", end="", file=sys.stderr, flush=True)

    thread = threading.Thread(target=tick, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()
        print(file=sys.stderr)  # end the ticking line


# The name of the work that batch loops show a bar for (``counting``); None: no bar.
_COUNTING: ContextVar[str | None] = ContextVar("softprompt_counting", default=None)


@contextmanager
def counting(desc: str) -> Iterator[None]:
    """On a terminal, the batch loops run inside show a progress bar named ``desc`` (rows
    done, elapsed, estimate: ``batch_starts``); elsewhere nothing. The caller says how long
    it took at the end."""
    if not (is_first_process() and sys.stderr.isatty()):
        yield
        return
    token = _COUNTING.set(desc)
    try:
        yield
    finally:
        _COUNTING.reset(token)


# tqdm's options for the bars of batch loops (the line goes when the work ends: the caller
# says how long it took)
BAR_OPTIONS: dict = {"dynamic_ncols": True, "leave": False}


def batch_starts(starts: range, name: str | None = None) -> Iterator[int]:
    """The starts of a batch loop, ``range(0, rows, batch_size)``, with a progress bar (rows,
    elapsed, estimate) on the first process when ``name`` is given or a ``counting`` runs."""
    sizes = [min(starts.step, starts.stop - s) for s in starts]
    yield from _counted(list(starts), sizes, starts.stop, name)


def batch_parts(parts: list[list[int]], name: str | None = None) -> Iterator[list[int]]:
    """Batches of row indices, with ``batch_starts``'s progress bar."""
    yield from _counted(parts, [len(p) for p in parts], sum(map(len, parts)), name)


def _counted(items: list, sizes: list[int], total: int, name: str | None) -> Iterator:
    name = name or _COUNTING.get()
    if name is None or not is_first_process():
        yield from items
        return
    from tqdm.auto import tqdm

    with tqdm(total=total, desc=f"[softprompt] {name}", unit="row", file=sys.stderr,
              **BAR_OPTIONS) as bar:  # fmt: skip
        for item, size in zip(items, sizes):
            yield item
            bar.update(size)
