"""The command line: each subcommand maps to one typed function of the library.

Flags are generated from the config dataclasses, so ``--help`` shows the same text as
the fields' documentation in the Python API. ``COMMANDS`` is the map: one entry per
subcommand (help, flags, handler), turned into argparse by ``make_parser``.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from dataclasses import MISSING, dataclass, fields
from pathlib import Path

from softprompt import __version__
from softprompt.config import (
    CompareConfig,
    EvalConfig,
    GenerateConfig,
    ModelConfig,
    ServeConfig,
    SweepConfig,
    TrainConfig,
    flat_fields,
)
from softprompt.errors import SoftpromptError

_TYPES = {"str": str, "int": int, "float": float}


def unescape(text: str) -> str:
    """Read \\n and \\t typed in a shell as newline and tab."""
    return text.replace("\\n", "\n").replace("\\t", "\t")


def _converter(annotation: str, escapes: bool = False):
    base = annotation.replace(" | None", "")
    convert = unescape if escapes else _TYPES[base]
    if "None" not in annotation:
        return convert
    return lambda s: None if s.lower() == "none" else convert(s)


def add_config_args(parser: argparse.ArgumentParser, cls, skip: tuple[str, ...] = ()) -> None:
    """One ``--flag`` per leaf field of ``cls``, with the field's help and default."""
    for f in flat_fields(cls):
        if f.name in skip:
            continue
        flag = "--" + f.name.replace("_", "-")
        meta = f.metadata
        if f.type == "bool":
            parser.add_argument(flag, action="store_true", help=meta["help"])
            continue
        default = f.default if f.default is not MISSING else None
        kwargs = {
            "type": _converter(f.type, meta.get("escapes", False)),
            "default": default,
            "choices": meta.get("choices"),
        }
        if meta.get("required"):
            kwargs["required"] = True
            help_text = meta["help"]
        else:
            help_text = meta["help"] + (
                f" (default: {default!r})" if default not in (None, "") else ""
            )
        parser.add_argument(flag, help=help_text.replace("%", "%%"), **kwargs)


def build_config(cls, ns: argparse.Namespace):
    """Instantiate ``cls`` (and its nested configs) from parsed flags; validation runs here."""
    values = {}
    for f in fields(cls):
        if f.metadata.get("help") is None:
            values[f.name] = build_config(f.default_factory, ns)
        elif hasattr(ns, f.name):
            values[f.name] = getattr(ns, f.name)
    return cls(**values)


def cmd_sweep(ns: argparse.Namespace) -> int:
    from softprompt.measure.sweep import format_sweep, run_sweep

    rows = run_sweep(build_config(SweepConfig, ns))
    print(format_sweep(rows))
    return 0


def cmd_compare(ns: argparse.Namespace) -> int:
    from softprompt.measure.compare import run_compare

    output = run_compare(build_config(CompareConfig, ns))
    print((output / "report.md").read_text(encoding="utf-8"))
    print(f"report: {output / 'report.html'}")
    return 0


def cmd_inspect(ns: argparse.Namespace) -> int:
    from softprompt.artifacts import read_meta
    from softprompt.loading import load_model
    from softprompt.measure.inspection import format_inspection, inspect_prompt

    if ns.top_k < 1:
        raise SoftpromptError("--top-k must be at least 1")
    if not Path(ns.prompt_dir).is_dir():
        raise SoftpromptError(f"{ns.prompt_dir} is not a folder; give the --output of a train run")
    meta = read_meta(ns.prompt_dir)
    loaded = load_model(ModelConfig(model=ns.model or _base_model_of(meta, ns.prompt_dir)))
    print(format_inspection(inspect_prompt(loaded, ns.prompt_dir, ns.top_k)))
    return 0


def cmd_eval(ns: argparse.Namespace) -> int:
    from softprompt.measure.eval_run import format_table, run_eval

    results = run_eval(build_config(EvalConfig, ns))
    print(format_table(results))
    return 0


def cmd_train(ns: argparse.Namespace) -> int:
    from softprompt.training import train

    train(build_config(TrainConfig, ns))
    return 0


def cmd_generate(ns: argparse.Namespace) -> int:
    from softprompt.artifacts import load_prompt, read_meta
    from softprompt.data import read_records
    from softprompt.generation import generate
    from softprompt.loading import load_model

    meta = read_meta(ns.prompt) if ns.prompt else {}
    texts, expected = list(ns.texts), [None] * len(ns.texts)
    if ns.file:
        field = ns.input_field or meta.get("data", {}).get("input_field") or "input"
        target = meta.get("data", {}).get("target_field") or "target"
        for i, (record, where) in enumerate(read_records(ns.file)):
            if ns.limit is not None and i >= ns.limit:
                break
            if field not in record:
                raise SoftpromptError(f"{where}: no field {field!r}; set --input-field")
            texts.append(str(record[field]))
            expected.append(record.get(target))
    if not texts:
        raise SoftpromptError("nothing to generate: give TEXT arguments or --file")
    if ns.compare and not ns.prompt:
        raise SoftpromptError("--compare needs --prompt DIR (the tuned prompt to compare)")
    if ns.model is None:
        ns.model = _base_model_of(meta, ns.prompt)
    loaded = load_model(build_config(ModelConfig, ns))
    prompt = None
    if ns.prompt:
        prompt, meta = load_prompt(ns.prompt, loaded.model, allow_mismatch=ns.allow_mismatch)
        prompt.to(loaded.model.device)
    template = None if ns.no_template else (ns.template or meta.get("template"))
    cfg = build_config(GenerateConfig, ns)
    tuned = generate(loaded, texts, prompt, cfg, template) if prompt is not None else None
    base = generate(loaded, texts, None, cfg, template) if (ns.compare or prompt is None) else None
    _print_generations(texts, base, tuned, expected)
    return 0


def cmd_serve(ns: argparse.Namespace) -> int:
    from softprompt.serving import serve

    serve(build_config(ServeConfig, ns))
    return 0


def _base_model_of(meta: dict, prompt_dir: str | None) -> str:
    if not prompt_dir:
        return ModelConfig().model
    name = meta.get("base_model", {}).get("name")
    if name is None:
        from softprompt.artifacts import ADAPTER_CONFIG, _read_json

        cfg_path = Path(prompt_dir) / ADAPTER_CONFIG
        name = _read_json(cfg_path).get("base_model_name_or_path") if cfg_path.exists() else None
    return name or ModelConfig().model


def _print_generations(texts, base, tuned, expected) -> None:
    for i, text in enumerate(texts):
        print(f"[{i + 1}] {text}")
        if base is not None:
            print(f"  base    : {base[i].strip()!r}")
        if tuned is not None:
            print(f"  tuned   : {tuned[i].strip()!r}")
        if expected[i] is not None:
            print(f"  expected: {expected[i]!r}")
    sys.stdout.flush()


def _generate_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("texts", nargs="*", metavar="TEXT", help="inputs to continue")
    parser.add_argument("--prompt", help="folder of a trained prompt (ours or a PEFT adapter)")
    parser.add_argument(
        "--compare",
        action="store_true",
        help="print the base model's output beside the tuned one's",
    )
    parser.add_argument("--file", help="also read inputs from a data file (its input field)")
    parser.add_argument(
        "--input-field",
        default=None,
        help="field of --file holding the inputs (default: the prompt's, or 'input')",
    )
    parser.add_argument(
        "--limit", type=int, default=None, help="use only the first N rows of --file"
    )
    parser.add_argument(
        "--template",
        default=None,
        type=unescape,
        help="template for the inputs (default: the one the prompt was trained with)",
    )
    parser.add_argument("--no-template", action="store_true", help="use the inputs as they are")
    parser.add_argument(
        "--allow-mismatch",
        action="store_true",
        help="load a prompt even if it was trained for another base model",
    )
    add_config_args(parser, ModelConfig, skip=("model",))
    model_help = next(f for f in flat_fields(ModelConfig) if f.name == "model").metadata["help"]
    parser.add_argument(
        "--model",
        default=None,
        help=f"{model_help} Default: the model --prompt was trained on, else 'embedded'.",
    )
    add_config_args(parser, GenerateConfig)


def _inspect_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("prompt_dir", metavar="DIR", help="folder of a trained prompt")
    parser.add_argument("--top-k", type=int, default=5, help="nearest tokens shown (default: 5)")
    parser.add_argument("--model", default=None, help="base model (default: the prompt's own)")


@dataclass(frozen=True)
class Command:
    """One subcommand: its help, its flags (a config's fields and/or its own) and its handler."""

    help: str
    description: str
    handler: Callable[[argparse.Namespace], int]
    config: type | None = None  # one flag per leaf field, less those in skip
    skip: tuple[str, ...] = ()
    flags: Callable[[argparse.ArgumentParser], None] | None = None  # flags of its own
    formatter: type[argparse.HelpFormatter] = argparse.RawDescriptionHelpFormatter


COMMANDS = {
    "train": Command(
        help="train a soft prompt on a data file",
        description="Train a soft prompt (the base model stays frozen) and save it as a "
        "PEFT-compatible folder with metrics.jsonl and loss.png.\n\nExample:\n  softprompt "
        "train --data examples/sentiment/train.jsonl --input-field review --target-field label "
        "--template 'Review: {input}\\nSentiment:' --output runs/sentiment",
        handler=cmd_train,
        config=TrainConfig,
    ),
    "generate": Command(
        help="continue texts with the base model and/or a trained prompt",
        description="Generate continuations. With --prompt the saved template and base model "
        "are used unless overridden; --compare shows base and tuned side by side.\n\n"
        "Example:\n  softprompt generate --prompt runs/sentiment --compare "
        "'The battery died in a day.'",
        handler=cmd_generate,
        flags=_generate_flags,
    ),
    "eval": Command(
        help="measure a prompt or the base model: loss, choice accuracy, generations",
        description="Measure the base model, or the base model with a trained prompt, on a data "
        "file: loss and perplexity of the targets, accuracy/macro-F1/confusion matrix with "
        "--choices, exact match and chrF with --generate; few-shot baselines with --shots.\n\n"
        "Example:\n  softprompt eval --prompt runs/sentiment --data "
        "examples/sentiment/test.jsonl --input-field review --target-field label "
        "--choices negative,positive --output runs/sentiment-eval",
        handler=cmd_eval,
        config=EvalConfig,
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
        handler=cmd_compare,
        config=CompareConfig,
    ),
    "inspect": Command(
        help="nearest vocabulary tokens, norms and drift of a trained prompt",
        description="Show, per virtual token of a trained prompt, its nearest vocabulary tokens "
        "(cosine), its norm against the real tokens' norms, and its drift from the initial value.",
        handler=cmd_inspect,
        flags=_inspect_flags,
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
        handler=cmd_sweep,
        config=SweepConfig,
    ),
    "serve": Command(
        help="serve many prompts from one model over an OpenAI-compatible HTTP API",
        description="Serve the base model and every prompt in --prompts (one sub-folder each, "
        "named by the API's `model`) with dynamic batching across prompts. Endpoints: "
        "/v1/models, /v1/completions, /v1/chat/completions, /v1/prompts/NAME (POST loads, "
        "DELETE unloads), /v1/rescan, /health, /metrics.\n\nExample:\n  softprompt serve "
        "--prompts runs --port 8000",
        handler=cmd_serve,
        config=ServeConfig,
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
        if cmd.flags is not None:
            cmd.flags(p)
        if cmd.config is not None:
            add_config_args(p, cmd.config, skip=cmd.skip)
        p.set_defaults(func=cmd.handler)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = make_parser()
    ns = parser.parse_args(argv)
    try:
        return ns.func(ns)
    except SoftpromptError as err:
        print(f"softprompt: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("softprompt: interrupted; a training run continues with --resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
