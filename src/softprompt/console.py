"""What a user sees on stderr: progress messages and warnings.

Under several processes (torchrun, accelerate) only the first one speaks, so a message
appears once however many processes run.
"""

from __future__ import annotations

import os
import sys


def is_first_process() -> bool:
    """True in a single process, and in process 0 of a launched group."""
    return os.environ.get("RANK", "0") == "0"


def say(msg: str) -> None:
    """A progress message on stderr."""
    if is_first_process():
        print(f"[softprompt] {msg}", file=sys.stderr, flush=True)


def warn(msg: str) -> None:
    """A warning on stderr."""
    if is_first_process():
        print(f"[softprompt] warning: {msg}", file=sys.stderr, flush=True)
