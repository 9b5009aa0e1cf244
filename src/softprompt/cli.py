"""The command line: each subcommand maps to one typed function of the library.

Flags are generated from the config dataclasses, so ``--help`` shows the same text as
the fields' documentation in the Python API. ``COMMANDS`` is the map: one entry per
subcommand (help, config, handler), turned into argparse by ``make_parser``.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import sys
import types
import typing
from dataclasses import MISSING, dataclass, fields
from typing import Any, Literal

from softprompt import __version__
from softprompt.config import (
    CompareConfig,
    DistillConfig,
    EvalConfig,
    ExportConfig,
    GenerateRunConfig,
    InspectConfig,
    PushConfig,
    ServeConfig,
    SweepConfig,
    TrainConfig,
)
from softprompt.errors import SoftpromptError


@dataclass(frozen=True)
class Flag:
    """One command-line flag: a leaf field of a config, as its command shows it."""

    name: str
    type: Any  # the resolved annotation, e.g. int | None, Literal[...]
    default: Any
    metadata: dict


def flat_fields(cls) -> list[Flag]:
    """The leaf fields of a config as flags, nested configs expanded (as ``nested`` says)."""
    hints = typing.get_type_hints(cls)
    out: list[Flag] = []
    for f in fields(cls):
        if f.metadata.get("nested"):
            inner = {flag.name: flag for flag in flat_fields(type(f.default_factory()))}
            sample = f.default_factory()
            rewording = f.metadata["help_for"] or {}
            for name in f.metadata["only"] or list(inner):
                flag = inner[name]
                meta = {**flag.metadata, "help": rewording.get(name, flag.metadata["help"])}
                out.append(Flag(name, flag.type, getattr(sample, name), meta))
            continue
        default = f.default if f.default is not MISSING else f.default_factory()
        out.append(Flag(f.name, hints[f.name], default, dict(f.metadata)))
    return out


def unescape(text: str) -> str:
    """Read \\n and \\t typed in a shell as newline and tab."""
    return text.replace("\\n", "\n").replace("\\t", "\t")


def _argparse_kwargs(flag: Flag) -> dict:
    """type / choices / nargs for one flag, from its resolved annotation."""
    kind, optional = flag.type, False
    if typing.get_origin(kind) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(kind) if a is not type(None)]
        kind, optional = args[0], len(args) < len(typing.get_args(kind))
    if typing.get_origin(kind) is Literal:
        return {"type": str, "choices": typing.get_args(kind)}
    if typing.get_origin(kind) is list:  # positional: TEXT ...; a flag: repeated
        if flag.metadata.get("positional"):
            return {"type": str, "nargs": "*"}
        return {"type": str, "action": "append", "metavar": flag.metadata.get("metavar")}
    convert = unescape if flag.metadata.get("escapes") else kind
    if not optional:
        return {"type": convert}

    def or_none(text: str):
        return None if text.lower() == "none" else convert(text)

    or_none.__name__ = getattr(convert, "__name__", "value")  # argparse: "invalid int value"
    return {"type": or_none}


def add_config_args(parser: argparse.ArgumentParser, cls, skip: tuple[str, ...] = ()) -> None:
    """One ``--flag`` (or positional) per leaf field of ``cls``, with its help and default."""
    for flag in flat_fields(cls):
        if flag.name in skip:
            continue
        meta = flag.metadata
        if meta.get("positional"):
            parser.add_argument(
                flag.name, metavar=meta["metavar"], help=meta["help"], **_argparse_kwargs(flag)
            )
            continue
        name = "--" + flag.name.replace("_", "-")
        if flag.type is bool:
            parser.add_argument(name, action="store_true", help=meta["help"])
            continue
        kwargs = {"default": flag.default, **_argparse_kwargs(flag)}
        help_text = meta["help"]
        if kwargs.get("action") == "append":
            kwargs["default"] = None  # argparse would append to the default list itself
        if meta.get("required"):
            kwargs["required"] = True
        elif flag.default not in (None, "", []):
            help_text += f" (default: {flag.default!r})"
        parser.add_argument(name, help=help_text.replace("%", "%%"), **kwargs)


def build_config(cls, ns: argparse.Namespace):
    """Instantiate ``cls`` (and its nested configs) from parsed flags; validation runs here.
    Fields a command does not show as flags keep their defaults."""
    values = {}
    for f in fields(cls):
        if f.metadata.get("nested"):
            sample = f.default_factory()
            given = {
                sub.name: getattr(ns, sub.name) for sub in fields(sample) if hasattr(ns, sub.name)
            }
            if any(sub.metadata.get("nested") for sub in fields(sample)):
                values[f.name] = build_config(type(sample), ns)
            else:
                values[f.name] = dataclasses.replace(sample, **given)
        elif hasattr(ns, f.name):
            value = getattr(ns, f.name)
            if value is not None or f.default_factory is MISSING:  # a repeatable flag: []
                values[f.name] = value
    return cls(**values)


@dataclass(frozen=True)
class Command:
    """One subcommand: its help, its config (one flag per leaf field, less ``skip``) and the
    module of ``softprompt.commands`` whose ``main`` receives the validated config (imported
    when the command runs, so ``--help`` starts without loading torch)."""

    help: str
    description: str
    config: type
    module: str
    skip: tuple[str, ...] = ()
    formatter: type[argparse.HelpFormatter] = argparse.RawDescriptionHelpFormatter

    def run(self, cfg) -> None:
        """Run the command on its validated config."""
        importlib.import_module(f"softprompt.commands.{self.module}").main(cfg)


COMMANDS = {
    "train": Command(
        help="train a soft prompt on a data file",
        description="Train a soft prompt (the base model stays frozen) and save it as a "
        "PEFT-compatible folder with metrics.jsonl and loss.png.\n\nExample:\n  softprompt "
        "train --data examples/sentiment/train.jsonl --input-field review --target-field label "
        "--template 'Review: {input}\\nSentiment:' --output runs/sentiment",
        config=TrainConfig,
        module="train",
    ),
    "distill": Command(
        help="compile a long prompt (context, system message, few-shot examples) into a few "
        "virtual tokens",
        description="Train a soft prompt to make the frozen model answer as it does with a long "
        "context, without labels: the teacher (the model with the context) answers every "
        "input once, and the prompt learns its next-token distributions (KL over its top-k "
        "tokens and the rest). The answers are cached in OUTPUT/teacher/; the result is an "
        "ordinary prompt folder, compared with the teacher at the end "
        "(OUTPUT/teacher-agreement.json).\n\nExample:\n  softprompt distill --data "
        "inputs.jsonl --shots shots.jsonl --template 'Review: {input}\\nSentiment:' "
        "--output runs/distilled",
        config=DistillConfig,
        module="distill",
        skip=("choices", "choice_loss", "task_field", "ensemble"),
    ),
    "generate": Command(
        help="continue texts with the base model and/or a trained prompt",
        description="Generate continuations. With --prompt the saved template and base model "
        "are used unless overridden; --compare shows base and tuned side by side.\n\n"
        "Example:\n  softprompt generate --prompt runs/sentiment --compare "
        "'The battery died in a day.'",
        config=GenerateRunConfig,
        module="generate",
    ),
    "eval": Command(
        help="measure a prompt or the base model: loss, choice accuracy, generations",
        description="Measure the base model, or the base model with a trained prompt, on a data "
        "file: loss and perplexity of the targets, accuracy/macro-F1/confusion matrix with "
        "--choices, exact match and chrF with --generate; few-shot baselines with --shots.\n\n"
        "Example:\n  softprompt eval --prompt runs/sentiment --data "
        "examples/sentiment/test.jsonl --input-field review --target-field label "
        "--choices negative,positive --output runs/sentiment-eval",
        config=EvalConfig,
        module="eval",
        skip=("validation", "val_fraction"),
    ),
    "compare": Command(
        help="zero-shot, few-shot, prompt tuning, LoRA and full fine-tuning side by side",
        description="Run zero-shot, few-shot, prompt tuning, LoRA and full fine-tuning on the "
        "same train and test data and write report.md and a self-contained report.html with "
        "quality, trainable parameters, training time, peak memory, artifact size and inference "
        "cost per example.\n\nExample:\n  softprompt compare --data "
        "examples/sentiment/train.jsonl --validation examples/sentiment/validation.jsonl "
        "--test examples/sentiment/test.jsonl --input-field review --target-field label "
        "--template 'Review: {input}\\nSentiment:' --choices negative,positive --steps 30 "
        "--output runs/compare",
        config=CompareConfig,
        module="compare",
    ),
    "inspect": Command(
        help="nearest vocabulary tokens, norms and drift of a trained prompt",
        description="Show, per virtual token of a trained prompt, its nearest vocabulary tokens "
        "(cosine), its norm against the real tokens' norms, and its drift from the initial value.",
        config=InspectConfig,
        module="inspect",
        formatter=argparse.HelpFormatter,  # no example: let argparse wrap the description
    ),
    "sweep": Command(
        help="try a small grid of learning rates, initialisations and prompt lengths",
        description="Train one short run per recipe (prompt length x init x learning rate) and "
        "rank them on validation data: accuracy with --choices, exact match/chrF with "
        "--generate, else validation loss. Writes sweep.md and sweep.jsonl.\n\nExample:\n  "
        "softprompt sweep --data examples/sentiment/train.jsonl --validation "
        "examples/sentiment/validation.jsonl --input-field review --target-field label "
        "--template 'Review: {input}\\nSentiment:' --choices negative,positive --steps 20 "
        "--output runs/sweep",
        config=SweepConfig,
        module="sweep",
    ),
    "serve": Command(
        help="serve many prompts from one model over an OpenAI-compatible HTTP API",
        description="Serve the base model and every prompt in --prompts (one sub-folder each, "
        "named by the API's `model`) with dynamic batching across prompts. Endpoints: "
        "/v1/models, /v1/completions, /v1/chat/completions, /v1/prompts/NAME (POST loads, "
        "DELETE unloads), /v1/rescan, /health, /metrics, and a playground page at / (base and "
        "tuned answers side by side).\n\nExample:\n  softprompt serve "
        "--prompts runs --port 8000",
        config=ServeConfig,
        module="serve",
    ),
    "export": Command(
        help="write a prompt's rows for vLLM, SGLang or numpy",
        description="Write a trained prompt's virtual-token embeddings in the form an engine "
        "that takes embeddings reads: vLLM (--enable-prompt-embeds: a prompt_embeds content "
        "part), SGLang (input_embeds) or a numpy array, with deploy.json (model, shape, dtype, "
        "placement). Whole-sequence payloads for a given input come from the Python client "
        "softprompt.deploy.Deployment.\n\nExample:\n  softprompt export runs/sentiment --to "
        "vllm --output runs/sentiment-vllm",
        config=ExportConfig,
        module="export",
    ),
    "push": Command(
        help="share a prompt on the Hugging Face Hub, with a model card",
        description="Upload a trained prompt's files to a Hugging Face Hub repository with a "
        "model card written from its softprompt.json (base model, data, template, metrics, the "
        "loss plot). Others then use it with --prompt hf:owner/name (or --init hf:owner/name)."
        "\n\nExample:\n  softprompt push runs/sentiment me/sentiment-prompt",
        config=PushConfig,
        module="push",
    ),
}


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="softprompt",
        description="Train, use and share soft prompts for frozen causal language models.",
    )
    parser.add_argument("--version", action="version", version=f"softprompt {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, cmd in COMMANDS.items():
        p = sub.add_parser(
            name, help=cmd.help, description=cmd.description, formatter_class=cmd.formatter
        )
        add_config_args(p, cmd.config, skip=cmd.skip)
        p.set_defaults(command=name, func=cmd.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = make_parser()
    ns = parser.parse_args(argv)
    cmd = COMMANDS[ns.command]
    try:
        cmd.run(build_config(cmd.config, ns))
        return 0
    except SoftpromptError as err:
        print(f"softprompt: error: {err.cli_message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("softprompt: interrupted; a training run continues with --resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
