"""One object per kind of model, behind one small Protocol: the only place that knows which
kind a model is.

- ``causal`` (``CAUSAL``): a decoder LM; the prompt sits first or after a constant head,
  runs once per batch as a shared prefix, and is compiled once for generation;
- ``seq2seq`` (``SEQ2SEQ``): an encoder-decoder (T5, BART); the prompt goes before the
  encoder's input (a deep prompt: in the decoder's self-attention) and the loss is on the
  decoder's target tokens;
- ``classify`` (``CLASSIFY``): a BERT-style encoder whose classification head trains beside
  the prompt.

Everything kind-specific (which transformers class loads the model, how examples become
rows, the loss, scoring choices, generation, what the artifact adds, what the kind refuses)
is a method of the kind object that ``loading.load_model`` puts in ``LoadedModel.kind``.
Other modules ask the object; they never compare kind names. A new kind is one new object.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Protocol

from torch import Tensor, nn

from softprompt.data import Example
from softprompt.errors import ConfigError
from softprompt.kinds.causal import CAUSAL
from softprompt.kinds.classify import CLASSIFY
from softprompt.kinds.seq2seq import SEQ2SEQ
from softprompt.prefix import Prefix, PromptLike
from softprompt.prompt import SoftPrompt
from softprompt.rows import Encoded, Row
from softprompt.templates import PromptFormat


class Kind(Protocol):
    """What softprompt does differently for one kind of model."""

    name: str  # "causal", "seq2seq" or "classify": saved in softprompt.json, shown to users
    peft_task_type: str  # PEFT's task type of this kind's artifact (CAUSAL_LM, ...)
    model_types: Mapping[str, str]  # transformers' model types with a class of this kind
    auto_class: type  # the transformers Auto class that loads it
    chat: bool  # conversations (chat templates) can be trained and served
    serves: bool  # `softprompt serve` streams its completions
    prompt_inside: bool  # a prompt may sit inside the text ({soft_prompt}, chat placement)
    restricted_choices: bool  # --choices' restricted loss (and --choices auto) apply
    default_lr: float  # the peak learning rate without --lr (benchmarks/suite.py chose it)
    deep_prompts: bool  # a deep prefix (--method prefix) trains and serves
    default_prefix_lr: float  # ... and its peak learning rate without --lr
    default_epochs: tuple[int, int]  # without --epochs: the fewest and most passes (epochs_for)
    default_steps: int  # ... between which as many as reach this many optimizer steps
    default_method: str  # "prompt" or "prefix" without --method
    # which validated prompt is kept without --select: (classifying, generating)
    default_select: tuple[str, str]

    def load_kwargs(self, labels: list[str] | None) -> dict:
        """Extra ``from_pretrained`` arguments (a classifier's labels)."""

    def prepare(self, model: nn.Module, cfg, source: str) -> None:
        """Decide, once at load, what the model allows (a decoder's shortcuts) and how it runs
        (a classifier's pooling, ``cfg.pooling``; ``source``: the folder or hub id loaded)."""

    def labels(self, model: nn.Module) -> list[str] | None:
        """The loaded model's output labels (a classifier's), in id order."""

    def check_training(self, cfg, loaded, processes: int, examples: list[Example]) -> None:
        """Refuse, in one line, what this kind cannot train (before anything slow)."""

    def check_deep(self, loaded) -> None:
        """Refuse, in one line, a deep prompt (--method prefix) this model cannot hold."""

    def tokenize(
        self, examples: list[Example], tokenizer, max_tokens: int, task_ids, fmt, delimiter,
        loss_on: str, labels: list[str] | None,
    ) -> list[Row]:  # fmt: skip
        """Token rows of ``examples`` as this kind's loss reads them."""

    def data_mode(self, mode: str) -> str:
        """What the data is to this kind ('labels' for a classifier; else ``mode``)."""

    def trainable(self, model: nn.Module) -> list[nn.Parameter]:
        """Parameters that learn beside the prompt (a classifier's head), made trainable."""

    def rows_loss(
        self, model: nn.Module, prompts, rows: list[Row], pad_id: int, device,
        choice_ids: Tensor | None = None,
    ) -> tuple[Tensor, int, int]:  # fmt: skip
        """(summed loss, label count, positions the body ran) of ``rows`` with ``prompts``."""

    def evaluate_loss(
        self, model: nn.Module, prompt, rows: list[Row], batch_size: int, pad_id: int,
        choice_ids: Tensor | None = None,
    ) -> dict:  # fmt: skip
        """Mean loss per label over ``rows``, with perplexity and the label count, and
        ``accuracy`` where the kind tells right from wrong (a decoder given ``choice_ids``: the
        label ranked first among the choices; a classifier: the head's argmax)."""

    def encode(self, tokenizer, fmt: PromptFormat, text: str, fields=None) -> Encoded:
        """A raw input's tokens, split where the prompt goes: (head or None, ids)."""

    def encode_example(self, tokenizer, fmt: PromptFormat, ex: Example) -> Encoded:
        """An example's input as generation and scoring see it."""

    def answer(
        self, loaded, encoded: list[Encoded], prompts: Sequence[PromptLike], cfg,
        prefix_cache: bool = True, stop_ids: list[int] | None = None, labels=None,
    ) -> list[str]:  # fmt: skip
        """The model's answer to each encoded input, each with its own prompt (or None);
        ``labels`` (token sequences): a prompted row answers with one (where supported)."""

    def score_choices(
        self, loaded, prompt: SoftPrompt | None, encoded: list[Encoded], sources: list[str],
        choices: list[str], opts: dict, rows: list[Row] | None = None,
    ) -> tuple[list[list[float]], dict | None]:  # fmt: skip
        """Each choice's score for each input (a classifier: its labels' probabilities) and,
        where one pass gives it too, the loss of the labelled ``rows`` (else None)."""

    def generate_ids(
        self, model: nn.Module, ids: Sequence[list[int]], prefixes: Sequence[Prefix | None],
        gen_cfg, stopping=None, processors=None,
    ) -> Tensor:  # fmt: skip
        """New token ids for each row with its compiled prompt (the server's batches);
        ``processors``: transformers logits processors (``LabelsOnly``)."""

    def compile(self, model: nn.Module, prompt: SoftPrompt) -> Prefix:
        """A loaded prompt as the server keeps it (its per-layer keys/values if it has any)."""

    def adapter_fields(self, model: nn.Module) -> dict:
        """What this kind sets in PEFT's adapter_config.json beyond the common fields."""

    def saved_rows(self, rows: Tensor) -> Tensor:
        """The prompt's rows as PEFT stores them for this kind."""

    def loaded_rows(self, rows: Tensor, n: int | None) -> Tensor:
        """The prompt's rows from PEFT's stored tensor (``saved_rows`` undone)."""

    def saved_deep(self, flat: Tensor, layers: int) -> tuple[Tensor, int]:
        """A deep prompt held per layer (N, layers x 2 x KV width) as PEFT's PREFIX_TUNING
        tensor for this kind, and the num_layers PEFT reads it with."""

    def loaded_deep(self, rows: Tensor, saved: int, layers: int | None) -> tuple[Tensor, int]:
        """``saved_deep`` undone for PEFT's tensor of ``saved`` layers, for a model of
        ``layers`` (None: as saved): (the tensor per layer, its layer count)."""

    def extra_tensors(self, model: nn.Module) -> dict[str, Tensor]:
        """Tensors the artifact holds beside the prompt (a classifier's head)."""

    def saved_meta(self, model: nn.Module) -> dict:
        """What softprompt.json records for this kind beside the common fields (a
        classifier's pooling)."""

    def load_extra(self, model: nn.Module, tensors: dict[str, Tensor], meta: dict,
                   where: str) -> None:  # fmt: skip
        """Put ``extra_tensors`` (and what ``saved_meta`` recorded) back into ``model``."""


def epochs_for(kind: Kind, steps_per_epoch: int) -> int:
    """Passes over the data without --epochs: as many as reach ``kind.default_steps``
    optimizer steps, within the kind's fewest and most (a 128-row set gets more passes than a
    2,000-row one: the public suite, docs/measurements.md section 9)."""
    fewest, most = kind.default_epochs
    return min(most, max(fewest, math.ceil(kind.default_steps / max(steps_per_epoch, 1))))


KINDS: dict[str, Kind] = {k.name: k for k in (CAUSAL, SEQ2SEQ, CLASSIFY)}
# Encoder-only families: they have a causal-LM class too (BertLMHeadModel), but what they are
# made for is classification.
ENCODER_TYPES = frozenset(
    {
        "bert",
        "roberta",
        "distilbert",
        "electra",
        "deberta",
        "deberta-v2",
        "xlm-roberta",
        "mpnet",
        "albert",
        "camembert",
        "modernbert",
    }  # fmt: skip
)


def by_name(name: str) -> Kind:
    """The kind called ``name`` (as softprompt.json and ``--task`` write it)."""
    if name not in KINDS:
        raise ConfigError(f"unknown model kind {name!r}: use one of {', '.join(KINDS)}")
    return KINDS[name]


def detect(config, task: str = "auto", shown: str = "the model") -> Kind:
    """The kind of model ``config`` describes (``task`` other than auto: that kind, checked)."""
    model_type = getattr(config, "model_type", None)
    remote = bool(getattr(config, "auto_map", None))  # trust_remote_code models map themselves
    _refuse_multimodal(config, shown)
    if task != "auto":
        kind = by_name(task)
        if not remote and model_type not in kind.model_types:
            raise ConfigError(
                f"--task {task}: {shown} ({model_type}) has no {task} model class in "
                f"transformers; use --task {detect(config, 'auto', shown).name} or another model"
            )
        return kind
    if getattr(config, "is_encoder_decoder", False):
        if remote or model_type in SEQ2SEQ.model_types:
            return SEQ2SEQ
        archs = ", ".join(getattr(config, "architectures", None) or [str(model_type)])
        raise ConfigError(  # Whisper, MusicGen: their encoders read audio, not text
            f"{shown} ({archs}) is an encoder-decoder without a text-to-text (seq2seq LM) class "
            "in transformers; softprompt tunes prompts for text encoders: use another model"
        )
    if model_type in ENCODER_TYPES:
        return CLASSIFY
    if remote or model_type in CAUSAL.model_types:
        return CAUSAL
    fits = [k for k in KINDS.values() if model_type in k.model_types]
    if fits:
        return fits[0]
    archs = ", ".join(getattr(config, "architectures", None) or [str(model_type)])
    raise ConfigError(
        f"{shown} ({archs}) is neither a causal LM, an encoder-decoder nor an encoder with a "
        "classification class in transformers; softprompt cannot tune a prompt for it"
    )


MULTIMODAL = ("vision_config", "audio_config", "vision_tower", "audio_encoder_config")


def _refuse_multimodal(config, shown: str) -> None:
    """A multimodal wrapper (Gemma3ForConditionalGeneration): refused in one line, naming its
    text model, which is what a prompt for text is tuned on. Besides the usual tower names,
    a config with a text model and another model's config beside it (Granite Speech's
    encoder_config) is one."""
    tower = next((n for n in MULTIMODAL if getattr(config, n, None) is not None), None)
    shown_tower = tower and f"{tower.split('_')[0]} tower"
    if tower is None and getattr(config, "text_config", None) is not None:
        others = (n for n, v in vars(config).items() if n != "text_config" and hasattr(v, "to_dict")
                  and getattr(v, "model_type", None) is not None)  # fmt: skip
        tower = next(others, None)
        shown_tower = tower and f"{tower} beside its text model"
    if tower is None:
        return
    archs = ", ".join(getattr(config, "architectures", None) or [str(config.model_type)])
    text = getattr(getattr(config, "text_config", None), "model_type", None)
    use = f"its text model ({text})" if text else "a text-only model"
    raise ConfigError(
        f"{shown} ({archs}) is a multimodal model ({shown_tower}); softprompt "
        f"tunes prompts for text models: use {use}"
    )


def of_model(model: nn.Module) -> Kind:
    """The kind of a loaded model, from its class and config (for callers that hold a bare
    model rather than a ``LoadedModel``)."""
    if getattr(model.config, "is_encoder_decoder", False):
        return SEQ2SEQ
    if type(model).__name__.endswith("ForSequenceClassification"):
        return CLASSIFY
    return CAUSAL


def for_task_type(task_type: str | None) -> Kind | None:
    """The kind whose artifacts carry PEFT's ``task_type`` (None: unknown or absent)."""
    return next((k for k in KINDS.values() if k.peft_task_type == task_type), None)


__all__ = ["CAUSAL", "CLASSIFY", "KINDS", "SEQ2SEQ", "Kind", "by_name", "detect", "of_model"]
