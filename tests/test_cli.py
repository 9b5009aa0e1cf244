"""The command line: flags generated from the configs, and one-line errors (exit 2)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from softprompt import __version__
from softprompt.cli import build_config, flat_fields, main, make_parser
from softprompt.config import (
    DataConfig,
    GenerateConfig,
    ModelConfig,
    PromptConfig,
    TrainConfig,
)


def _norm(text: str) -> str:
    return " ".join(text.split())


def _help(argv, capsys, monkeypatch) -> str:
    """Run ``argv`` (which asks for help) and return its stdout, whitespace-normalised."""
    monkeypatch.setenv("COLUMNS", "3000")  # no wrapping, so help texts stay whole
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 0
    return _norm(capsys.readouterr().out)


def _fails(argv, capsys) -> str:
    """Run ``argv``, expect exit 2 with a softprompt error and no traceback; return it."""
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2
    assert "Traceback" not in err
    last = err.strip().splitlines()[-1]
    assert last.startswith("softprompt: error: ")
    return last


# --- help and version -----------------------------------------------------------------


def test_top_level_help_lists_commands(capsys, monkeypatch):
    """`softprompt --help` names both subcommands."""
    out = _help(["--help"], capsys, monkeypatch)
    assert "usage: softprompt" in out
    assert "train train a soft prompt on a data file" in out
    assert "generate continue texts with the base model" in out


@pytest.mark.parametrize(
    "command,classes",
    [("train", [TrainConfig]), ("generate", [ModelConfig, GenerateConfig])],
)
def test_subcommand_help_shows_every_field(capsys, monkeypatch, command, classes):
    """Every leaf config field is a --flag whose help is the field's help text."""
    out = _help([command, "--help"], capsys, monkeypatch)
    for cls in classes:
        for f in flat_fields(cls):
            flag = "--" + f.name.replace("_", "-")
            assert flag in out, flag
            assert _norm(f.metadata["help"]) in out, flag


def test_train_help_shows_defaults_and_choices(capsys, monkeypatch):
    """Defaults are appended to the help; choices are shown."""
    out = _help(["train", "--help"], capsys, monkeypatch)
    assert "(default: 0.06)" in out and "(default: 256)" in out
    assert "{float32,bfloat16,auto}" in out
    assert "--data DATA" in out


def test_generate_help_has_own_flags(capsys, monkeypatch):
    """generate's own flags are documented next to the config ones."""
    out = _help(["generate", "--help"], capsys, monkeypatch)
    for flag in ("--prompt", "--compare", "--file", "--limit", "--no-template", "TEXT"):
        assert flag in out, flag


def test_module_version_subprocess():
    """`python -m softprompt --version` prints the package version and exits 0."""
    proc = subprocess.run(
        [sys.executable, "-m", "softprompt", "--version"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == f"softprompt {__version__}"


# --- flags -> configs -----------------------------------------------------------------


def _train_cfg(*argv: str) -> TrainConfig:
    return build_config(TrainConfig, make_parser().parse_args(["train", *argv]))


def test_build_config_defaults_equal_dataclass_defaults():
    """Only --data given: the config equals the library's defaults."""
    assert _train_cfg("--data", "d.jsonl") == TrainConfig(data=DataConfig(data="d.jsonl"))


def test_build_config_maps_flags_to_nested_fields():
    """Flags land in the nested dataclasses, with their types converted."""
    cfg = _train_cfg(
        "--data",
        "d.jsonl",
        "--model",
        "some/model",
        "--dtype",
        "bfloat16",
        "--template",
        "Review: {input}\\nSentiment:",
        "--target-delimiter",
        "\\t",
        "--input-field",
        "review",
        "--target-field",
        "label",
        "--max-length",
        "64",
        "--num-virtual-tokens",
        "8",
        "--init",
        "text",
        "--init-text",
        "classify it",
        "--lr",
        "0.1",
        "--epochs",
        "2",
        "--max-steps",
        "7",
        "--max-grad-norm",
        "none",
        "--val-fraction",
        "0",
        "--resume",
        "--output",
        "out",
    )
    assert cfg.model == ModelConfig(model="some/model", dtype="bfloat16")
    assert cfg.data.template == "Review: {input}\nSentiment:"
    assert cfg.data.target_delimiter == "\t"
    assert (cfg.data.input_field, cfg.data.target_field) == ("review", "label")
    assert cfg.data.max_length == 64 and cfg.data.val_fraction == 0.0
    assert cfg.prompt == PromptConfig(num_virtual_tokens=8, init="text", init_text="classify it")
    assert (cfg.lr, cfg.epochs, cfg.max_steps) == (0.1, 2, 7)
    assert cfg.max_grad_norm is None
    assert cfg.resume is True and cfg.overwrite is False
    assert cfg.output == "out"


def test_build_config_generate():
    """generate's flags build ModelConfig (model None until resolved) and GenerateConfig."""
    ns = make_parser().parse_args(
        ["generate", "--temperature", "0.7", "--top-p", "0.9", "--max-new-tokens", "5", "hi"]
    )
    assert ns.texts == ["hi"] and ns.model is None
    assert build_config(GenerateConfig, ns) == GenerateConfig(
        max_new_tokens=5, temperature=0.7, top_p=0.9
    )


# --- errors ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "extra,fragment",
    [
        (
            ["--max-length", "5", "--num-virtual-tokens", "20"],
            "--max-length 5 leaves no room for text after 20 virtual tokens",
        ),
        (["--lr", "0"], "--lr must be a positive number, not 0.0"),
        (["--val-fraction", "1.5"], "--val-fraction must be in [0, 1), not 1.5"),
        (["--init", "text"], "--init text needs --init-text"),
        (["--batch-size", "0"], "--batch-size must be at least 1"),
        (["--warmup-ratio", "1"], "--warmup-ratio must be in [0, 1), not 1.0"),
        (["--max-length", "1"], "--max-length must be at least 2, not 1"),
    ],
)
def test_train_bad_values_one_line_error(tmp_path, capsys, extra, fragment):
    """A bad value exits 2 with one line naming the flag, before any model loads."""
    code = main(["train", "--data", "d.jsonl", "--output", str(tmp_path / "run"), *extra])
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("softprompt: error: ")
    assert err.count("\n") == 1 and fragment in err and "Traceback" not in err
    assert not (tmp_path / "run").exists()


def test_train_init_missing_folder(tmp_path, capsys):
    """--init naming a folder that does not exist is an error naming --init and the path."""
    missing = str(tmp_path / "no_prompt_here")
    line = _fails(
        ["train", "--data", "d.jsonl", "--init", missing, "--output", str(tmp_path / "run")], capsys
    )
    assert "--init must be one of random, text, vocab or a folder with a saved prompt" in line
    assert repr(missing) in line


@pytest.mark.parametrize(
    "extra,fragment",
    [
        ([], "the following arguments are required: --data"),
        (["--data", "d.jsonl", "--epochs", "two"], "argument --epochs: invalid int value: 'two'"),
        (["--data", "d.jsonl", "--dtype", "float16"], "argument --dtype: invalid choice"),
    ],
)
def test_train_argparse_errors(capsys, extra, fragment):
    """Missing or unparsable flags are argparse usage errors (exit 2, no traceback)."""
    with pytest.raises(SystemExit) as exc:
        main(["train", *extra])
    err = capsys.readouterr().err
    assert exc.value.code == 2
    assert fragment in err and "Traceback" not in err


def test_train_missing_data_file(tiny_dir, tmp_path, capsys):
    """A missing --data file is reported (after the model loads) as one error line."""
    missing = tmp_path / "missing.jsonl"
    line = _fails(
        [
            "train",
            "--model",
            str(tiny_dir),
            "--data",
            str(missing),
            "--output",
            str(tmp_path / "run"),
        ],
        capsys,
    )
    assert line.startswith(f"softprompt: error: data file {missing} not found")


def test_train_bad_data_line(tiny_dir, tmp_path, capsys):
    """Malformed JSON in --data is reported with file and line, without a traceback."""
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"input": "a", "target": "b"}) + "\n{oops\n")
    line = _fails(
        ["train", "--model", str(tiny_dir), "--data", str(data), "--output", str(tmp_path / "run")],
        capsys,
    )
    assert f"{data}:2: not valid JSON" in line


def test_train_unbalanced_template_brace(tiny_dir, tmp_path, capsys):
    """An unbalanced brace in --template should be a one-line error, not a traceback."""
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"input": "a", "target": "b"}) + "\n")
    line = _fails(
        [
            "train",
            "--model",
            str(tiny_dir),
            "--data",
            str(data),
            "--template",
            "Review: {input",
            "--output",
            str(tmp_path / "run"),
        ],
        capsys,
    )
    assert line.startswith("softprompt: error: --template 'Review: {input' is malformed")


def test_generate_without_inputs(capsys):
    """generate with no TEXT and no --file says what to give."""
    line = _fails(["generate"], capsys)
    assert line == "softprompt: error: nothing to generate: give TEXT arguments or --file"


def test_generate_compare_needs_prompt(capsys):
    """--compare without --prompt is refused before any model loads."""
    line = _fails(["generate", "--compare", "the movie was great"], capsys)
    assert line == ("softprompt: error: --compare needs --prompt DIR (the tuned prompt to compare)")


def test_generate_file_without_input_field(tmp_path, capsys):
    """--file rows lacking the input field name the location and --input-field."""
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"review": "x"}) + "\n")
    line = _fails(["generate", "--file", str(data)], capsys)
    assert line == f"softprompt: error: {data}:1: no field 'input'; set --input-field"
