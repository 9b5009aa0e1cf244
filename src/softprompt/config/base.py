"""Typed settings for every command, validated where they are created.

Each field's ``help`` metadata is the text of its ``--flag`` in the CLI, so the Python API
and the command line describe the same thing in the same words. A nested config (a
``ModelConfig`` inside ``ServeConfig``) contributes its flags to its parent's command;
``nested(...)`` can pick and reorder those flags and word them for that command.

Comma-separated options (``choices``, ``methods``, ``lrs``, ...) keep the text the user gave
(it is what results files record); the one parser of each is a property beside it
(``choice_list``, ``method_list``, ...), checked in ``__post_init__`` and used by the code.
"""

from __future__ import annotations

import math
import typing
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Literal

from softprompt.errors import ConfigError
from softprompt.templates import POSITIONS, PromptFormat, template_fields

EMBEDDED_MODEL = "embedded"
EMBEDDED_CHAT_MODEL = "embedded-chat"  # SmolLM2-135M-Instruct, for conversations
EMBEDDED_ENCODER_MODEL = "embedded-encoder"  # all-MiniLM-L6-v2, a BERT-family encoder
INIT_CHOICES = ("auto", "random", "text", "vocab")
LIBRARY = "library:"  # --init library:DIR, a folder of saved prompts to transfer from
Dtype = Literal["float32", "bfloat16", "auto"]
ChoiceLoss = Literal["restricted+rest", "restricted", "full"]
Select = Literal["loss", "accuracy", "last"]
Reparam = Literal["none", "residual"]
Method = Literal["prompt", "prefix"]
PromptPosition = Literal["start", "after-system", "before-user"]
LossOn = Literal["all-assistant", "last-assistant"]
ModelTask = Literal["auto", "causal", "seq2seq", "classify"]
Quantize = Literal["none", "int8", "nf4"]
Pooling = Literal["auto", "cls", "mean"]
DTYPE_CHOICES = typing.get_args(Dtype)
QUANTIZE_CHOICES = typing.get_args(Quantize)
CHOICE_LOSSES = typing.get_args(ChoiceLoss)
SELECTS = typing.get_args(Select)
REPARAMS = typing.get_args(Reparam)
METHODS = typing.get_args(Method)
CHOICES_AUTO, CHOICES_NONE = "auto", "none"
MIN_TEMPERATURE = 0.01  # sampling below it overflows: use 0 (greedy)
MAX_BATCH_WAIT_MS = 60_000.0


def opt(default, help: str, **extra):  # noqa: A002 - mirrors argparse's name
    """A dataclass field whose ``help`` becomes the CLI flag's help. ``extra`` may hold
    ``required``, ``escapes`` (read \\n and \\t), ``positional``, ``metavar``."""
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata={"help": help, **extra})
    return field(default=default, metadata={"help": help, **extra})


def nested(
    factory: Callable[[], object],
    only: tuple[str, ...] | None = None,
    help: dict[str, str] | None = None,  # noqa: A002
):
    """A nested config field. ``only`` names the sub-fields that become flags of this
    command, in this order (default: all, in their own order); ``help`` rewords some."""
    return field(default_factory=factory, metadata={"nested": True, "only": only, "help_for": help})


def check_choice(value: object, allowed: tuple, flag: str) -> None:
    if value not in allowed:
        raise ConfigError(f"{flag} must be one of {', '.join(allowed)}, not {value!r}")


def check_finite(cfg: object) -> None:
    """Every float setting of ``cfg`` is a finite number (nan and inf pass ``<`` checks)."""
    for f in fields(cfg):
        value = getattr(cfg, f.name)
        if isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"--{f.name.replace('_', '-')} must be a finite number, not {value}")


def parse_list(text: str | list | tuple, flag: str, convert: Callable = str) -> list:
    """'a,b' (or an already split list) -> [convert('a'), convert('b')]."""
    items = text.split(",") if isinstance(text, str) else list(text)
    try:
        return [convert(x.strip() if isinstance(x, str) else x) for x in items if str(x).strip()]
    except ValueError:
        raise ConfigError(f"{flag} {text!r}: expected comma-separated values") from None


def choice_labels(text: str | list[str] | None) -> list[str] | None:
    """--choices as a list of labels, the one reading every command shares: None when not
    given, 'auto' (train detects them from the data) or 'none'."""
    if text is None or text in (CHOICES_AUTO, CHOICES_NONE):
        return None
    return parse_choices(text)


def parse_choices(text: str | list[str]) -> list[str]:
    """'negative,positive' -> ['negative', 'positive']; fewer than two is a ConfigError."""
    choices = parse_list(text, "--choices")
    if len(choices) < 2 or len(set(choices)) < len(choices):
        raise ConfigError(
            f"--choices {text!r} must name two or more different labels, comma-separated, "
            "e.g. 'negative,positive'"
        )
    return choices


@dataclass
class ModelConfig:
    """Which frozen base model to load, and how."""

    model: str | None = opt(
        EMBEDDED_MODEL,
        "Base model: a Hugging Face id (needs the network the first time), a local folder, "
        "a .gguf file, or 'embedded' for the bundled Gemma 3 270M that works offline "
        "('embedded-chat': the bundled SmolLM2-135M-Instruct, for conversations; "
        "'embedded-encoder': the bundled all-MiniLM-L6-v2 encoder, for --task classify).",
    )
    task: ModelTask = opt(
        "auto",
        "What kind of model this is: causal (a decoder LM), seq2seq (an encoder-decoder such as "
        "T5 or BART: the prompt goes before the encoder's input) or classify (a BERT-style "
        "encoder with a classification head trained beside the prompt). auto: from the "
        "model's config.",
    )
    dtype: Dtype = opt(
        "auto",
        "Precision of the frozen model's weights. The soft prompt itself always stays float32. "
        "'auto' (the default): bfloat16 where the hardware computes it natively (a CUDA GPU "
        "with bf16, a CPU with AVX-512 BF16 or AMX), float32 elsewhere; on such a CPU "
        "bfloat16 matched float32's accuracy on the public suite over three seeds and "
        "trained in less than half the time (docs/measurements.md, section 16). 'float32' "
        "for results that must match bit for bit across machines.",
    )
    quantize: Quantize = opt(
        "none",
        "Quantize the frozen base's decoder layers (their linear weights) to save memory: "
        "'int8' (weight-only, per channel) or 'nf4' (QLoRA's 4-bit NormalFloat), through "
        "torchao (the 'quantize' extra), on CPU or GPU. Embeddings, LM head, the prompt and "
        "the loss keep --dtype; the saved prompt records the quantization and loads on the "
        "unquantized base too.",
    )
    pooling: Pooling = opt(
        "auto",
        "Classification models: which hidden states the trained head reads. 'cls': the "
        "model's own head (BERT's pooler over [CLS]), as PEFT's SEQ_CLS model runs it; "
        "'mean': the mean of the text's last hidden states (the pooling sentence-transformers "
        "checkpoints were trained for), in place of BERT's pooled vector or of the first "
        "position that RoBERTa's, MPNet's, DistilBERT's, DeBERTa's heads read. auto: the "
        "pooling the checkpoint declares (sentence-transformers' modules.json, such as the bundled "
        "all-MiniLM-L6-v2's mean), else 'cls'. Saved with the prompt and used wherever it is "
        "loaded; PEFT loads a mean-pooled prompt but reads [CLS] (docs/model-kinds.md).",
    )
    trust_remote_code: bool = opt(
        False, "Allow a hub model to run its own Python code. Only for models you trust."
    )

    def __post_init__(self) -> None:
        check_finite(self)
        check_choice(self.pooling, typing.get_args(Pooling), "--pooling")
        check_choice(self.dtype, DTYPE_CHOICES, "--dtype")
        check_choice(self.quantize, QUANTIZE_CHOICES, "--quantize")
        check_choice(self.task, typing.get_args(ModelTask), "--task")


def prompt_model() -> ModelConfig:
    """A model config whose default is the model a saved prompt was trained on (None)."""
    return ModelConfig(model=None)


@dataclass
class DataConfig:
    """Where the examples come from and how they become token sequences."""

    data: str = opt(
        "",
        "Training data: a .jsonl, .csv, .tsv or .txt file, or hf:NAME[,CONFIG][:SPLIT] for a "
        "Hugging Face data set (needs the network and the 'hub' extra).",
        required=True,
    )
    validation: str | None = opt(
        None, "Validation data in the same format. Default: a --val-fraction of --data."
    )
    val_fraction: float = opt(
        0.1, "Fraction of --data held out for validation when --validation is not given (0 = none)."
    )
    input_field: str = opt("input", "Field holding the model's input in input/target pairs.")
    target_field: str = opt("target", "Field holding the text the model should produce.")
    text_field: str | None = opt(
        None, "Field of plain text (loss on every token). Setting it selects plain-text mode."
    )
    template: str | None = opt(
        None,
        "Template for the input, with {input} (or any field name) in braces, e.g. "
        "'Review: {input}\\nSentiment:' (\\n and \\t are read as newline and tab). "
        "Default: the input as it is.",
        escapes=True,
    )
    target_delimiter: str = opt(
        " ",
        "Put between input and target unless the input already ends in whitespace.",
        escapes=True,
    )
    max_length: int = opt(
        256,
        "Most tokens per row, virtual tokens included. Longer rows are cut (the input's start "
        "first, so the target survives) and counted in a warning.",
    )
    prompt_position: PromptPosition = opt(
        "start",
        "Where the virtual tokens go in a conversation: 'start' (before everything, as PEFT "
        "puts them), 'after-system' (right after the system message's text) or 'before-user' "
        "(just before the first user turn). In a raw --template write {soft_prompt} where "
        "they go instead.",
    )
    chat_template: str | None = opt(
        None,
        'Conversations ({"messages": [...]} records): a Jinja chat template file to render '
        "them with. Default: the model's own.",
    )
    system: str | None = opt(
        None,
        "Conversations: the system message for those that have none (e.g. a task description; "
        "with eval, the system-prompt baseline).",
        escapes=True,
    )
    loss_on: LossOn = opt(
        "all-assistant",
        "Conversations: learn every assistant turn or only the last, each with its "
        "end-of-turn token.",
    )

    def __post_init__(self) -> None:
        check_finite(self)
        if self.template is not None:
            template_fields(self.template)
        check_choice(self.prompt_position, POSITIONS, "--prompt-position")
        check_choice(self.loss_on, typing.get_args(LossOn), "--loss-on")
        if self.chat_template is not None and not Path(self.chat_template).is_file():
            raise ConfigError(f"--chat-template {self.chat_template}: no such file")
        if not 0.0 <= self.val_fraction < 1.0:
            raise ConfigError(f"--val-fraction must be in [0, 1), not {self.val_fraction}")
        if self.max_length < 2:
            raise ConfigError(f"--max-length must be at least 2, not {self.max_length}")

    def prompt_format(self, chat: bool = False) -> PromptFormat:
        """The format these settings describe (``chat``: for conversations)."""
        if chat and self.template is not None:
            raise ConfigError(
                "--template is for input/target pairs and text; conversations are rendered by "
                "the chat template (--chat-template), the prompt placed by --prompt-position"
            )
        template = None
        if chat and self.chat_template is not None:
            template = Path(self.chat_template).read_text(encoding="utf-8")
        return PromptFormat(
            template=None if chat else self.template,
            input_field=self.input_field,
            target_delimiter=self.target_delimiter,
            chat=chat,
            chat_template=template,
            position=self.prompt_position,
            system=self.system,
        )


@dataclass
class PromptConfig:
    """Shape and starting point of the soft prompt."""

    num_virtual_tokens: int = opt(
        20,
        "Number of virtual tokens. 20 is where Lester et al. (2021) saw most of the gain, "
        "and a decoder's deep default's best on the public suite (seed 0 of five tasks: 10 "
        "and 40 scored lower; docs/measurements.md, section 13); longer prompts cost "
        "compute on every row.",
    )
    init: str = opt(
        "auto",
        "Initial values: 'auto' (the task's own words: the label words and the template's or "
        "system prompt's words, repeated to fill the prompt; 'vocab' when there are none; on "
        "the public suite level with 'vocab' and 4.5 points above 'random' on the mean of "
        "five tasks, docs/measurements.md section 17), "
        "'random' (normal, scaled like real token embeddings), 'text' (the embeddings of "
        "--init-text, repeated or cut), 'vocab' (embeddings of common tokens drawn at random), "
        "'library:DIR' (score every saved prompt in DIR on a few training batches and start "
        "from the best), or a folder holding a saved prompt (hf:owner/name: one on the Hugging "
        "Face Hub).",
    )
    init_text: str | None = opt(
        None, "Phrase for --init text, e.g. 'Classify the sentiment of this review'."
    )

    def __post_init__(self) -> None:
        check_finite(self)
        if self.num_virtual_tokens < 1:
            raise ConfigError(
                f"--num-virtual-tokens must be at least 1, not {self.num_virtual_tokens}"
            )
        if self.library is not None:
            if not Path(self.library).is_dir():
                raise ConfigError(f"--init {self.init}: {self.library} is not a folder")
        elif (
            self.init not in INIT_CHOICES
            and not self.init.startswith("hf:")
            and not Path(self.init).is_dir()
        ):
            raise ConfigError(
                "--init must be one of random, text, vocab or a folder with a saved prompt, or "
                f"'auto' or 'library:DIR'; {self.init!r} is none of these"
            )
        if self.init == "text" and not self.init_text:
            raise ConfigError("--init text needs --init-text 'a phrase describing the task'")

    @property
    def from_folder(self) -> bool:
        """Whether ``init`` names a saved prompt's folder."""
        return self.init not in INIT_CHOICES and self.library is None

    @property
    def library(self) -> str | None:
        """The folder of ``--init library:DIR`` (None for any other init)."""
        return self.init[len(LIBRARY) :] if self.init.startswith(LIBRARY) else None
