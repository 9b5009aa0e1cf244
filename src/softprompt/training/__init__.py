"""Training a soft prompt: the loop (``loop.train``), a run's state and steps (``run``), its
set-up (``setup``: data, output folder, model, prompts, optimizer), its starting prompts
(``starting``), its end (``finish``), checkpoints (``checkpoint``) and several processes
(``parallel``)."""

from softprompt.training.loop import train
from softprompt.training.run import TrainResult

__all__ = ["TrainResult", "train"]
