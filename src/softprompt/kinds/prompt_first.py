"""What the kinds whose prompt goes before the whole input (seq2seq, classify) refuse: a
prompt inside the text, conversations, and the causal LM's training shortcuts."""

from __future__ import annotations

from softprompt.data import Example
from softprompt.errors import ConfigError, SoftpromptError
from softprompt.rows import Encoded
from softprompt.templates import PromptFormat

INSIDE = (
    "{soft_prompt} inside a template is for causal LMs: a seq2seq or classification model "
    "takes the prompt before its whole input"
)


def refuse_inside(examples: list[Example], what: str = "an encoder-decoder model") -> None:
    """Conversations and a prompt inside the text are for causal LMs."""
    for ex in examples:
        if ex.messages is not None:
            raise ConfigError(f"{ex.where}: {what} takes input/target pairs, not conversations")
        if ex.head is not None:
            raise ConfigError(
                "{soft_prompt} inside a template is for causal LMs: a seq2seq or classification "
                "model takes the prompt before its whole input"
            )


def encode_whole(tokenizer, fmt: PromptFormat, text: str, fields) -> Encoded:
    """(None, ids) of a raw input, the prompt to go before all of it; a prompt inside the
    template is refused."""
    head, rest = fmt.raw_text(text, fields)
    if head is not None:
        raise SoftpromptError(INSIDE)
    return None, tokenizer(rest)["input_ids"]


def encode_whole_example(tokenizer, ex: Example, what: str) -> Encoded:
    """(None, ids) of an example's input; conversations and inside prompts refused."""
    refuse_inside([ex], what)
    return None, tokenizer(ex.source)["input_ids"]


def refuse_training(cfg, kind: str, choices_advice: str) -> None:
    """What an encoder-decoder or a classifier cannot train, said in one line."""
    if cfg.shard_model:
        raise ConfigError(f"--shard-model shards decoder layers of causal LMs, not {kind}")
    if cfg.restricted_choices is not None:
        raise ConfigError(
            f"--choices with the restricted loss is for causal LMs; a {kind} model "
            + choices_advice
        )
