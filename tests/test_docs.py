"""The documentation site: it builds with --strict, its generated pages hold every command
and flag and the measured tables with their sources, every `softprompt` line of every page
parses with the real CLI, and the guides' commands run in order on tiny models."""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
from doc_commands import (
    NETWORK,
    ROOT,
    blocks,
    commands,
    lines,
    pages,
    reaches_network,
)

from softprompt.cli import COMMANDS, main, make_parser

DOCS = ROOT / "docs"
SITE_PAGES = [p for p in pages() if p.parent.name != "hooks"]
# The guides whose commands the walk runs, in the order a reader meets them (the order of
# the README these pages came from). distill.md is parsed only: its teacher generates, which
# tests/test_distill.py covers on tiny models.
WALK = [
    "quickstart",
    "chat",
    "model-kinds",
    "deep-prompts",
    "data",
    "scaling",
    "tracking-sharing",
    "serving",
    "deploy",
    "evaluation",
]


def _all_commands() -> list[tuple[str, str, bool]]:
    return [
        (str(page.relative_to(ROOT)), command, marked)
        for page in SITE_PAGES
        for command, marked in commands(page)
    ]


@pytest.mark.parametrize(("page", "command", "marked"), _all_commands())
def test_every_command_of_every_page_parses(page, command, marked):
    ns = make_parser().parse_args(shlex.split(command)[1:])
    assert callable(ns.func)
    if reaches_network(command):  # such a block is never run, so it must say why
        assert marked, f"{page}: {command!r} needs the network: mark its block '{NETWORK}'"


def test_the_pages_have_commands_of_every_kind():
    used = {shlex.split(c)[1] for _, c, _ in _all_commands()}
    assert used >= set(COMMANDS)


def _harness_lines() -> list[str]:
    return [
        line
        for page in SITE_PAGES
        for block in blocks(page, "bash")
        for line in lines(block)
        if line.startswith("python -m softprompt.harness ")
    ]


@pytest.mark.parametrize("line", _harness_lines())
def test_harness_commands_parse_with_lm_evals_parser(line):
    pytest.importorskip("lm_eval", reason="the 'eval' extra (lm-evaluation-harness) is absent")
    from lm_eval._cli import HarnessCLI

    args = HarnessCLI()._parser.parse_args(shlex.split(line)[3:])
    assert args.model == "softprompt" and args.tasks


# --- the walk ------------------------------------------------------------------------------


def _walk() -> list[tuple[str, str, bool]]:
    """The guides' runnable pieces in order: ("bash", one line, marked) and ("python", a
    block, False)."""
    steps = []
    for name in WALK:
        text = (DOCS / "guides" / f"{name}.md").read_text(encoding="utf-8")
        for lang, block in re.findall(r"```(bash|python)\n(.*?)```", text, flags=re.S):
            if lang == "python":
                steps.append(("python", block, False))
                continue
            steps += [("bash", line, NETWORK in block) for line in lines(block)]
    return steps


def _runnable(line: str, models: dict[str, str], skipped: set) -> list[str] | None:
    """A guide's command as argv for the tiny models, or None where it cannot run here: not
    a softprompt command, a launcher (several processes), `serve` (runs until stopped), one
    that needs the network, or one reading the output of one that could not run
    (``skipped`` collects those outputs)."""
    if not line.startswith("softprompt "):
        return None
    argv = shlex.split(os.path.expandvars(line))[1:]
    value = {f: argv[argv.index(f) + 1] for f in ("--model", "--output", "--prompt") if f in argv}
    if argv[0] == "serve" or reaches_network(line) or value.get("--prompt") in skipped:
        if "--output" in value:
            skipped.add(value["--output"])
        return None
    if "--model" in argv:
        i = argv.index("--model") + 1
        argv[i] = models.get(argv[i]) or models["embedded"]
    elif argv[0] in ("train", "eval", "compare", "sweep") and "--prompt" not in argv:
        argv += ["--model", models["embedded"]]
    return argv


def test_guides_walk_in_order(model_dirs, chat_dir, kind_dirs, tmp_path, monkeypatch, capsys):
    """Every softprompt command of the walked guides and their Python quickstart, in the
    order shown, on tiny models (what the bundled models would do, in seconds): each one
    succeeds. Blocks marked as needing the network are parsed above, not run."""
    (tmp_path / "examples").symlink_to(ROOT / "examples")
    monkeypatch.chdir(tmp_path)
    tiny = str(model_dirs["llama"])
    models = {"embedded": tiny, "embedded-chat": str(chat_dir)}
    models["embedded-encoder"] = str(kind_dirs["bert"])
    ran, skipped = [], set()
    for kind, text, marked in _walk():
        if kind == "bash":
            if m := re.match(r"([A-Z_]+)='(.*)'$", text):
                monkeypatch.setenv(m.group(1), m.group(2))
            argv = None if marked else _runnable(text, models, skipped)
            if argv is None:
                if marked and "--output" in text:
                    skipped.add(shlex.split(text)[shlex.split(text).index("--output") + 1])
                continue
            assert main(argv) == 0, (text, capsys.readouterr().err[-800:])
            ran.append(argv[0])
        elif "from softprompt import" in text:
            code = text.replace("load_model()", f"load_model(model={tiny!r})")
            code = code.replace(
                "TrainConfig(", f"TrainConfig(model=ModelConfig(model={tiny!r}), ", 1
            )
            exec(compile("from softprompt import ModelConfig\n" + code, "guide", "exec"), {})
            ran.append("python quickstart")
    assert ran[:5] == ["train", "generate", "generate", "train", "python quickstart"]
    assert "holds a finished run" in capsys.readouterr().err  # the quickstart's --resume
    assert {"eval", "compare", "inspect", "sweep", "export"} <= set(ran)


# --- the site --------------------------------------------------------------------------------


def _missing_docs_packages() -> list[str]:
    wanted = ("mkdocs", "material", "mkdocstrings", "mkdocstrings_handlers.python")
    return [name for name in wanted if importlib.util.find_spec(name.split(".")[0]) is None]


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    missing = _missing_docs_packages()
    if missing:
        pytest.skip(f"the 'docs' extra is not installed ({', '.join(missing)} missing): "
                    "pip install -e '.[docs]' -c constraints.txt")  # fmt: skip
    out = tmp_path_factory.mktemp("site")
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "NO_MKDOCS_2_WARNING": "1"}
    done = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(out)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return out


def _text(html_file: Path) -> str:
    return re.sub(r"<[^>]+>", "", html_file.read_text(encoding="utf-8"))


def test_site_builds_strictly_offline(site):
    assert (site / "index.html").is_file() and (site / "guides" / "quickstart.html").is_file()
    for page in site.rglob("*.html"):  # every generated block was replaced
        assert "<!-- generated:" not in page.read_text(encoding="utf-8"), page


def test_cli_reference_has_every_command_and_flag(site):
    text = _text(site / "reference" / "cli.html")
    sub = next(a for a in make_parser()._actions if isinstance(a, argparse._SubParsersAction))
    for name, parser in sub.choices.items():
        assert f"softprompt {name}" in text
        section = text.split(f"softprompt {name}", 1)[1]
        for action in parser._actions:
            for option in action.option_strings:
                assert option in section, (name, option)
    assert "default: 'embedded'" not in text  # defaults have their own column
    assert "'embedded'" in text and "AVX-512 BF16" in text  # a default and a help, as --help says


def test_measured_tables_are_rendered_with_their_sources(site):
    text = _text(site / "measurements.html")
    for source in ("suite/choice-loss.jsonl", "suite/reference.jsonl", "bench-prompts.jsonl",
                   "compare-sentiment/metrics.jsonl", "suite/bench-prefix.jsonl"):  # fmt: skip
        assert f"Rendered at build time from {source}" in text, source
    # tables drawn from several runs name their spec and each run their cells came from
    assert "Rendered at build time by the spec steps of suite/pivots.json" in text
    assert "0.460 (0.450-0.470)" in text  # csabstruct at 160 steps, seeds 0 and 1
    assert "Pivoted by hand" not in text and "Typed by hand from the lines" not in text
    assert "| cr | restricted | 3 | 0.898 (0.890-0.905)" not in text  # a table, not text
    assert "0.898 (0.890-0.905)" in text and "benchmarks/suite.py --tasks" in text
    speed = _text(site / "guides" / "speed.html")
    assert "Rendered at build time from runs/bench-train.json" in speed
    train = json.loads((DOCS / "runs" / "bench-train.json").read_text())
    ratio = train["peft"]["wall_s"] / train["softprompt"]["wall_s"]
    assert f"{ratio:.2f}x" in speed  # PEFT's wall time over softprompt's, computed from the JSON
    for record in ("bench-train", "profile-step", "compile"):
        assert f"Rendered at build time from runs/{record}.txt" in speed, record
    scaling = _text(site / "guides" / "scaling.html")  # a benchmark's saved output, as printed
    assert "Rendered at build time from big/bench-big.txt" in scaling and "in PSS" in scaling
    # console records (benchmarks/record.py, `make record`): the demos and bench_eval
    assert "Rendered at build time from runs/demo.txt" in speed
    assert "at the start: make demo" in speed
    quick = _text(site / "guides" / "quickstart.html")
    assert "Rendered at build time from runs/demo.txt" in quick and "tuned   : " in quick
    chat = _text(site / "guides" / "chat.html")
    assert "Rendered at build time from runs/demo-chat.txt" in chat and "valid JSON" in chat
    assert "Rendered at build time from runs/bench-eval.txt" in text
    assert "Rendered at build time from runs/bench-chat.txt" in chat and "losses agree" in chat
    evaluation = _text(site / "guides" / "evaluation.html")
    for record in ("bench-generate", "bench-serve"):
        assert f"Rendered at build time from runs/{record}.txt" in evaluation, record
    kinds = _text(site / "guides" / "model-kinds.html")  # a markdown table, rendered as one
    assert "Rendered at build time from runs/bench-classify.txt" in kinds
    assert "| deep prompt + head |" not in kinds and "deep prompt + head" in kinds
    dev = _text(site / "guides" / "development.html")  # make test's closing line, recorded
    assert "Rendered at build time from runs/make-test.txt" in dev and " passed" in dev
    # every figure is rendered from a saved run: no page says it holds one typed by hand
    assert not [p for p in site.rglob("*.html") if "typed by hand" in _text(p).lower()]


def test_distill_guide_renders_its_numbers_or_says_they_are_pending(site):
    text = _text(site / "guides" / "distill.html")
    if (DOCS / "distill" / "bench-distill-methods.jsonl").is_file():
        assert "Rendered at build time from distill/bench-distill-methods.jsonl" in text
        assert "distilled (deep)" in text  # both methods, as the default was chosen
    else:
        assert "Numbers pending" in text


def test_python_reference_documents_every_export(site):
    import softprompt

    html = (site / "reference" / "python.html").read_text(encoding="utf-8")
    for name in softprompt.__all__:
        assert re.search(rf'id="softprompt\.[\w.]*\b{name}"', html), name


def _hook():
    spec = importlib.util.spec_from_file_location("docs_hook", DOCS / "hooks" / "generated.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_prose_quotes_only_figures_its_records_hold(tmp_path, monkeypatch):
    """A figure restated in prose must be in a record the page renders: when a record is
    re-run and its numbers change, the build fails on the sentences that quote the old ones."""
    hook = _hook()
    record = tmp_path / "run.txt"
    record.write_text("# 2026-12-03, x86_64: `python bench.py`\nratio = 1.45x, peak 2733 MB\n"
                      "accuracy 0.905 and 0.870\n")  # fmt: skip
    monkeypatch.setattr(hook, "DOCS", tmp_path)
    page = (
        "# Page\n\n<!-- generated: output run.txt -->\n\nEach process peaked at 1.45x (2733 "
        "MB); 0.905 is 3.5 points ahead (target 0.6x).\n\n```\nnot prose: 9.99\n```\n"
    )

    class Page:
        class file:
            src_uri = "guides/page.md"

    assert "| " not in hook.on_page_markdown(page, Page, None, None)  # it renders, no error
    record.write_text(record.read_text().replace("1.45x", "1.38x"))  # the record is re-run
    with pytest.raises(ValueError, match=r"(?s)1 figure.*line 5: '1.45' in: Each process"):
        hook.on_page_markdown(page, Page, None, None)
    stale = hook.unrendered_figures("typed 12.5 s and 7 % here, Python 3.10.1 on 127.0.0.1", "")
    assert [fig for _, fig, _ in stale] == ["12.5", "7"]


def test_no_block_of_the_site_is_typed_by_hand():
    """The check above has no escape: no page marks a block whose figures it skips."""
    assert not [p for p in DOCS.rglob("*.md") if "hand-typed" in p.read_text()]
