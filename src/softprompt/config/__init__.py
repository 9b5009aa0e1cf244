"""Typed settings for every command, validated where they are created.

Each field's ``help`` metadata is the text of its ``--flag`` in the CLI, so the Python API
and the command line describe the same thing in the same words. ``base`` holds the model,
data and prompt settings every command shares; ``train``, ``use`` (generate, inspect, serve,
export, push) and ``measure`` (eval, compare, sweep) hold each command's own. The CLI's flags
are generated from these classes in ``cli.py``.
"""

import dataclasses
import typing

from softprompt.config.base import (  # noqa: F401
    CHOICE_LOSSES,
    CHOICES_AUTO,
    CHOICES_NONE,
    DTYPE_CHOICES,
    EMBEDDED_CHAT_MODEL,
    EMBEDDED_ENCODER_MODEL,
    EMBEDDED_MODEL,
    INIT_CHOICES,
    LIBRARY,
    MAX_BATCH_WAIT_MS,
    METHODS,
    MIN_TEMPERATURE,
    QUANTIZE_CHOICES,
    REPARAMS,
    ChoiceLoss,
    DataConfig,
    Dtype,
    LossOn,
    Method,
    ModelConfig,
    ModelTask,
    PromptConfig,
    PromptPosition,
    Quantize,
    Reparam,
    check_choice,
    check_finite,
    choice_labels,
    nested,
    opt,
    parse_choices,
    parse_list,
    prompt_model,
)
from softprompt.config.measure import COMPARE_METHODS, CompareConfig, EvalConfig, SweepConfig  # noqa: F401
from softprompt.config.train import DistillConfig, TrainConfig  # noqa: F401
from softprompt.config.use import (  # noqa: F401
    ExportConfig,
    ExportDtype,
    ExportTarget,
    GenerateConfig,
    GenerateRunConfig,
    InspectConfig,
    PushConfig,
    ServeConfig,
)
from softprompt.errors import SWITCHES


def _switches(cls) -> set[str]:
    """The names of the boolean fields of ``cls`` and its nested configs."""
    hints = typing.get_type_hints(cls)
    out = set()
    for f in dataclasses.fields(cls):
        if f.metadata.get("nested"):
            out |= _switches(type(f.default_factory()))
        elif hints[f.name] is bool:
            out.add(f.name)
    return out


# How a ConfigError written with the CLI's flags names them from Python: `resume=True`
SWITCHES.update(*(_switches(c) for c in (TrainConfig, DistillConfig, GenerateRunConfig,
                                          InspectConfig, ServeConfig, EvalConfig, CompareConfig,
                                          SweepConfig, ExportConfig, PushConfig)))  # fmt: skip
