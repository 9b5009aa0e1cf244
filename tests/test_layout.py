"""The development guide's tree (docs/guides/development.md) names every module and package
of src/softprompt, and nothing that is gone; no kind name is compared outside kinds/."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "src" / "softprompt"


def _tree() -> str:
    text = (ROOT / "docs" / "guides" / "development.md").read_text()
    start = text.index("```\nsrc/softprompt/")
    return text[start : text.index("\ntests/", start)]  # the package's part of the tree


def _named(tree: str) -> set[str]:
    """Every file or folder name the tree shows ('kinds/', 'causal.py', ...)."""
    return set(re.findall(r"(?<![\w`])([a-z_0-9]+(?:\.py|/))(?=[\s,])", tree + "\n"))


def test_development_tree_matches_the_package():
    named = _named(_tree())
    present = {p.name + ("/" if p.is_dir() else "") for p in PACKAGE.rglob("*")
               if p.name != "__pycache__" and "__pycache__" not in p.parts
               and (p.is_dir() or p.suffix == ".py")}  # fmt: skip
    assert present - named == set(), "modules missing from the development guide's tree"
    stale = {n for n in named - present if not n.endswith("/") or n == "src/"} - {"src/"}
    assert stale == set(), "the development guide's tree names modules that do not exist"


def test_no_kind_name_is_compared_outside_kinds():
    pattern = re.compile(
        r"""(==|!=|\bin\b)\s*[(\[{]?\s*["'](causal|seq2seq|classify)["']"""
        r"""|["'](causal|seq2seq|classify)["']\s*(==|!=)"""
    )
    found = [
        f"{path.relative_to(ROOT)}:{n}"
        for path in PACKAGE.rglob("*.py")
        if "kinds" not in path.parts
        for n, line in enumerate(path.read_text().splitlines(), 1)
        if pattern.search(line)
    ]
    assert found == []
