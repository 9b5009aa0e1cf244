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
