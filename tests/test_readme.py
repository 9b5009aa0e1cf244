"""The README's commands are real: every `softprompt ...` line parses with the actual CLI,
and the Python quickstart names only what the package exports."""

from __future__ import annotations

import ast
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
