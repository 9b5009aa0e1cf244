"""`softprompt train`: train a soft prompt as the flags say and save it."""

from __future__ import annotations

from softprompt.config import TrainConfig
from softprompt.training import train


def main(cfg: TrainConfig) -> None:
    """The command: train (its progress and closing line go to stderr)."""
    train(cfg)
