"""The command blocks of README.md and docs/**/*.md, for test_readme.py and test_docs.py.

A bash block whose text holds ``# needs the network`` is parsed but never run; every
command that would reach the network (a hub model, an ``hf:`` data set or prompt, ``push``)
must stand in such a block."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
NETWORK = "# needs the network"


def pages() -> list[Path]:
    """README.md and every page of the site (docs/**/*.md)."""
    return [README, *sorted((ROOT / "docs").rglob("*.md"))]


def blocks(path: Path, lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", path.read_text(encoding="utf-8"), flags=re.S)


def lines(block: str) -> list[str]:
    """A block's lines with continuations joined and trailing comments cut."""
    return [line.split("  #")[0].strip() for line in block.replace("\\\n", " ").splitlines()]


def as_softprompt(line: str) -> str | None:
    """The `softprompt ...` command a line runs (also under torchrun / accelerate launch)."""
    if line.startswith("softprompt "):
        return line
    if " -m softprompt " in line:
        return "softprompt " + line.split(" -m softprompt ", 1)[1]
    return None


def commands(path: Path) -> list[tuple[str, bool]]:
    """(command, its block is marked as needing the network) for every softprompt command
    in the bash blocks of ``path``."""
    out = []
    for block in blocks(path, "bash"):
        marked = NETWORK in block
        for line in lines(block):
            if (command := as_softprompt(line)) is not None:
                out.append((command, marked))
    return out


def reaches_network(command: str) -> bool:
    """True for a command that would download: ``push``, an ``hf:`` name, or a --model that
    is a hub id (owner/name) rather than a bundled model or a file here."""
    argv = shlex.split(command)[1:]
    if argv and argv[0] == "push" or any(a.startswith("hf:") for a in argv):
        return True
    if "--model" in argv:
        model = argv[argv.index("--model") + 1]
        return "/" in model and not model.startswith(("runs/", "./", "/", "examples/"))
    return False
