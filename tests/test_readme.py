"""The README's commands are real: every `softprompt ...` line parses with the actual CLI,
and the Python quickstart names only what the package exports."""

from __future__ import annotations

import ast
import os
import re
import shlex
from pathlib import Path

import pytest

import softprompt
from softprompt.cli import make_parser

README = Path(__file__).resolve().parents[1] / "README.md"


def _blocks(lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", README.read_text(), flags=re.S)


def _commands() -> list[str]:
    commands = []
    for block in _blocks("bash"):
        joined = block.replace("\\\n", " ")
        for line in joined.splitlines():
            line = line.split("  #")[0].strip()
            if line.startswith("softprompt "):
                commands.append(line)
            elif " -m softprompt " in line:  # under accelerate launch / torchrun
                commands.append("softprompt " + line.split(" -m softprompt ", 1)[1])
    return commands


def test_readme_opens_with_the_two_commands():
    first = _blocks("bash")[0]
    assert "make demo" in first and "make test" in first


@pytest.mark.parametrize("command", _commands())
def test_readme_command_parses(command):
    ns = make_parser().parse_args(shlex.split(command)[1:])
    assert callable(ns.func)


def test_readme_has_commands():
    assert {c.split()[1] for c in _commands()} >= {"train", "generate"}


def test_python_quickstart_uses_exported_names():
    (code,) = [b for b in _blocks("python") if "from softprompt import" in b]
    tree = ast.parse(code)
    names = [
        a.name
        for n in ast.walk(tree)
        if isinstance(n, ast.ImportFrom) and n.module == "softprompt"
        for a in n.names
    ]
    assert names and set(names) <= set(softprompt.__all__)
    for name in names:
        assert getattr(softprompt, name) is not None


def _walk() -> list[tuple[str, str]]:
    """The README's runnable pieces in order: ("bash", one command) and ("python", a block)."""
    steps = []
    for lang, block in re.findall(r"```(bash|python)\n(.*?)```", README.read_text(), flags=re.S):
        if lang == "python":
            steps.append(("python", block))
            continue
        for line in block.replace("\\\n", " ").splitlines():
            steps.append(("bash", line.split("  #")[0].strip()))
    return steps


def _runnable(
    line: str, tiny: str, chat: str, encoder: str = "", skipped: set | None = None
) -> list[str] | None:
    """A README command as argv for the tiny models, or None where it cannot run here: not a
    softprompt command, a launcher (several processes), `serve` (runs until stopped), a hub
    model or `push` (network), or a command reading the output of one that could not run
    (``skipped`` collects those outputs)."""
    skipped = set() if skipped is None else skipped
    if not line.startswith("softprompt "):
        return None
    argv = shlex.split(os.path.expandvars(line))[1:]
    value = {f: argv[argv.index(f) + 1] for f in ("--model", "--output", "--prompt") if f in argv}
    network = argv[0] == "push" or "/" in value.get("--model", "")
    if argv[0] == "serve" or network or value.get("--prompt") in skipped:
        if "--output" in value:
            skipped.add(value["--output"])
        return None
    if "--model" in argv:
        i = argv.index("--model") + 1
        models = {"embedded-chat": chat, "embedded-encoder": encoder}
        argv[i] = models.get(argv[i]) or tiny
    elif argv[0] in ("train", "eval", "compare", "sweep") and "--prompt" not in argv:
        argv += ["--model", tiny]
    return argv


def test_readme_walks_in_order(model_dirs, chat_dir, kind_dirs, tmp_path, monkeypatch, capsys):
    """Every softprompt command of the README and its Python quickstart, in the order shown,
    on tiny models (what the embedded models would do, in seconds): each one succeeds."""
    from softprompt.cli import main

    root = README.parent
    (tmp_path / "examples").symlink_to(root / "examples")
    monkeypatch.chdir(tmp_path)
    tiny = str(model_dirs["llama"])
    ran, skipped = [], set()
    for kind, text in _walk():
        if kind == "bash":
            if m := re.match(r"([A-Z_]+)='(.*)'$", text):
                monkeypatch.setenv(m.group(1), m.group(2))
            argv = _runnable(text, tiny, str(chat_dir), str(kind_dirs["bert"]), skipped)
            if argv is None:
                continue
            assert main(argv) == 0, (text, capsys.readouterr().err[-800:])
            ran.append(argv[0])
        elif "from softprompt import" in text:
            code = text.replace("load_model()", f"load_model(model={tiny!r})")
            code = code.replace(
                "TrainConfig(\n", f"TrainConfig(\n    model=ModelConfig(model={tiny!r}),\n"
            )
            exec(compile("from softprompt import ModelConfig\n" + code, "README", "exec"), {})
            ran.append("python quickstart")
    assert ran[:5] == ["train", "generate", "generate", "train", "python quickstart"]
    assert "holds a finished run" in capsys.readouterr().err  # the quickstart's --resume
    assert {"eval", "compare", "inspect", "sweep"} <= set(ran)
