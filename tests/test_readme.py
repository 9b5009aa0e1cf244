"""The README is short and real: it opens with the two set-up commands, every `softprompt`
line parses with the actual CLI and is walked in the guides, and its Python quickstart
names only what the package exports and runs (on a tiny model)."""

from __future__ import annotations

import ast
import shlex

import pytest
from doc_commands import README, ROOT, blocks, commands

import softprompt
from softprompt.cli import make_parser


def test_readme_opens_with_the_two_commands():
    first = blocks(README, "bash")[0]
    assert "make demo" in first and "make test" in first


def test_readme_is_short():
    assert len(README.read_text(encoding="utf-8").splitlines()) <= 200


@pytest.mark.parametrize("command", [c for c, _ in commands(README)])
def test_readme_command_parses(command):
    ns = make_parser().parse_args(shlex.split(command)[1:])
    assert callable(ns.func)


def test_readme_has_commands():
    assert {c.split()[1] for c, _ in commands(README)} >= {"train", "generate"}


def test_readme_commands_are_walked_in_the_quickstart_guide():
    """test_docs.py runs the quickstart guide's commands in order; the README's are among
    them, so they are run too."""
    guide = {c for c, _ in commands(ROOT / "docs" / "guides" / "quickstart.md")}
    assert {c for c, _ in commands(README)} <= guide


def _quickstart() -> str:
    (code,) = [b for b in blocks(README, "python") if "from softprompt import" in b]
    return code


def test_python_quickstart_uses_exported_names():
    tree = ast.parse(_quickstart())
    names = [
        a.name
        for n in ast.walk(tree)
        if isinstance(n, ast.ImportFrom) and n.module == "softprompt"
        for a in n.names
    ]
    assert names and set(names) <= set(softprompt.__all__)
    for name in names:
        assert getattr(softprompt, name) is not None


def test_python_quickstart_runs(model_dirs, tmp_path, monkeypatch, capsys):
    """The README's Python block, as written, on a tiny model instead of the embedded one:
    it trains, loads the prompt and prints one answer per input."""
    (tmp_path / "examples").symlink_to(ROOT / "examples")
    monkeypatch.chdir(tmp_path)
    tiny = str(model_dirs["llama"])
    code = _quickstart().replace("load_model()", f"load_model(model={tiny!r})")
    code = code.replace("TrainConfig(", f"TrainConfig(model=ModelConfig(model={tiny!r}), ", 1)
    exec(compile("from softprompt import ModelConfig\n" + code, "README", "exec"), {})
    printed = capsys.readouterr().out.strip()
    answers = ast.literal_eval(printed)
    assert isinstance(answers, list) and len(answers) == 1
    assert (tmp_path / "runs" / "sentiment-py" / "adapter_model.safetensors").is_file()


def test_readmes_before_and_after_comes_from_the_recorded_demo():
    """The README (shown on GitHub, not built) quotes the demo's answers: each quoted line is
    in the demo's saved output that the site renders (docs/runs/demo.txt, `make record`),
    so a re-recorded demo that answers otherwise fails here instead of leaving a stale quote."""
    fenced, block, inside = [], [], False
    for line in README.read_text(encoding="utf-8").splitlines():
        if line.startswith("```"):
            if inside:
                fenced.append("\n".join(block))
            inside, block = not inside, []
        elif inside:
            block.append(line)
    (sample,) = [b for b in fenced if "  tuned   : " in b]
    recorded = (ROOT / "docs" / "runs" / "demo.txt").read_text(encoding="utf-8").splitlines()
    quoted = [line for line in sample.splitlines() if line.strip()]
    assert quoted and all(line in recorded for line in quoted), quoted
