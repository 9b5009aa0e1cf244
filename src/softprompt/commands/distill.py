"""`softprompt distill`: compile a long prompt into a few virtual tokens."""

from __future__ import annotations

from softprompt.config import DistillConfig
from softprompt.distill import distill


def main(cfg: DistillConfig) -> None:
    """The command: distil (its progress and closing lines go to stderr)."""
    distill(cfg)
