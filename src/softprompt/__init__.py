"""softprompt: train, compare, share and serve soft prompts for frozen causal LMs.

Quick start::

    from softprompt import TrainConfig, DataConfig, train, load_model, load_prompt, generate

    cfg = TrainConfig(data=DataConfig(data="train.jsonl", template="Review: {input}\\nSentiment:"),
                      output="runs/sentiment")
    result = train(cfg)
"""

__version__ = "0.1.0"

from softprompt.artifacts import load_prompt, save_prompt  # noqa: E402
from softprompt.config import (  # noqa: E402
    DataConfig,
    GenerateConfig,
    ModelConfig,
    PromptConfig,
    TrainConfig,
)
from softprompt.errors import SoftpromptError  # noqa: E402
from softprompt.evaluate import evaluate_loss  # noqa: E402
from softprompt.generate import generate  # noqa: E402
from softprompt.loading import LoadedModel, load_model  # noqa: E402
from softprompt.prompt import SoftPrompt, init_prompt  # noqa: E402
from softprompt.train import TrainResult, train  # noqa: E402

__all__ = [
    "DataConfig",
    "GenerateConfig",
    "LoadedModel",
    "ModelConfig",
    "PromptConfig",
    "SoftPrompt",
    "SoftpromptError",
    "TrainConfig",
    "TrainResult",
    "evaluate_loss",
    "generate",
    "init_prompt",
    "load_model",
    "load_prompt",
    "save_prompt",
    "train",
]
