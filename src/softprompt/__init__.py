"""softprompt: train, compare, share and serve soft prompts for frozen causal LMs.

Quick start::

    from softprompt import DataConfig, TrainConfig, train

    cfg = TrainConfig(data=DataConfig(data="train.jsonl", template="Review: {input}\\nSentiment:"),
                      output="runs/sentiment")
    result = train(cfg)

Names are imported on first use, so ``softprompt --help`` starts without loading torch.
"""

from __future__ import annotations

import importlib
import logging
import time

__version__ = "0.1.0"
STARTED = time.time()  # when the package was first imported: the start of a CLI command

# transformers imports torchao (installed for --quantize) whatever the command; at import it
# says that its CUDA-only extensions are absent, and torch warns about two of its enums: true
# on a CPU machine, and noise to a user.
for _name in ("torchao", "torch.utils._pytree"):
    logging.getLogger(_name).setLevel(logging.ERROR)

_EXPORTS = {  # name -> its module, relative to softprompt ("commands.eval")
    "DataConfig": "config",
    "GenerateConfig": "config",
    "ModelConfig": "config",
    "PromptConfig": "config",
    "TrainConfig": "config",
    "SoftpromptError": "errors",
    "LoadedModel": "loading",
    "load_model": "loading",
    "SoftPrompt": "prompt",
    "init_prompt": "prompt",
    "evaluate_loss": "scoring",
    "score_continuations": "scoring",
    "classify": "scoring",
    "EvalConfig": "config",
    "CompareConfig": "config",
    "SweepConfig": "config",
    "run_eval": "commands.eval",
    "run_compare": "commands.compare",
    "run_sweep": "commands.sweep",
    "inspect_prompt": "measure.inspection",
    "generate": "generation",
    "run_generate": "commands.generate",
    "GenerateRunConfig": "config",
    "InspectConfig": "config",
    "ServeConfig": "config",
    "run_inspect": "commands.inspect",
    "serve": "serving",
    "load_prompt": "artifacts",
    "save_prompt": "artifacts",
    "trained_choices": "artifacts",
    "TrainResult": "training",
    "train": "training",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'softprompt' has no attribute {name!r}")
    return getattr(importlib.import_module(f"softprompt.{_EXPORTS[name]}"), name)
