"""MkDocs hook: the parts of the site generated at build time, never typed by hand.

A page asks for one with an HTML comment on a line of its own (a page shown on GitHub keeps
it invisible):

    <!-- generated: cli -->                          every command, every flag (the parser)
    <!-- generated: api -->                          the exported names, through mkdocstrings
    <!-- generated: suite suite/prefix.jsonl -->     benchmarks/suite.py's table of a run
    <!-- generated: prompts bench-prompts.jsonl -->  benchmarks/bench_prompts.py's table
    <!-- generated: train bench-train-2026-11-25.json -->  bench_train.py's variants
    <!-- generated: prefix suite/bench-prefix.jsonl -->    bench_prefix.py's rows
    <!-- generated: compare compare-sentiment/metrics.jsonl -->  compare's report table
    <!-- generated: sweep sweep-antonyms/sweep.jsonl -->  sweep's ranking (its sweep.md)
    <!-- generated: distill distill/bench-distill.jsonl -->  rows, or a note while absent
    <!-- generated: output big/bench-big.txt -->        a benchmark's saved console output
    <!-- generated: pivot suite/pivots.json#steps -->   tasks against lines of several runs
    <!-- generated: console runs/demo.txt -->          a command's saved plain-text output

Paths are relative to docs/. Each table is followed by where it comes from: the file, and
the date, machine and command the file records (or that it records none).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import re
from pathlib import Path

DOCS = Path(__file__).resolve().parents[1]
ROOT = DOCS.parent
MARK = re.compile(r"^<!-- generated: (\w+)(?: (\S+))? -->$", re.M)


def _tables():
    """benchmarks/tables.py, loaded by path (benchmarks/ is scripts, not a package)."""
    spec = importlib.util.spec_from_file_location("bench_tables", ROOT / "benchmarks/tables.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def read_rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _source(name: str, runs: list[dict]) -> str:
    """The provenance line under a table: the file, and what its run records say."""
    text = f"Rendered at build time from [`{name}`]({_link(name)})"
    said = []
    for run in runs:
        bits = [run.get("date"), run.get("machine"), run.get("model")]
        if run.get("load_average") is not None:
            bits.append(f"load average {run['load_average']:.1f} at the start")
        line = ", ".join(str(b) for b in bits if b)
        if run.get("command"):
            line += (": " if line else "") + f"`python {run['command']}`"
        said.append(line)
    if not any(said):
        return text + " (the file records no date, machine or command: see the text above)."
    if not any(run.get("date") and run.get("machine") for run in runs):
        said.append("the file itself records no date or machine: see the text above")
    return text + ". " + "; ".join(dict.fromkeys(s for s in said if s)) + "."


def _link(name: str) -> str:
    """The file's address relative to the page that shows it (pages are under docs/ or
    docs/guides/, and use_directory_urls is off)."""
    return "{root}" + name


# --- the renderers: (file under docs/) -> markdown ---------------------------------------


def render_suite(name: str) -> str:
    rows = read_rows(DOCS / name)
    table = _tables().suite_table([r for r in rows if "task" in r])
    return table + "\n\n" + _source(name, [r for r in rows if r.get("kind") == "run"])


def render_prompts(name: str) -> str:
    rows = read_rows(DOCS / name)
    return _tables().prompts_table(rows) + "\n\n" + _source(name, [])


def render_train(name: str) -> str:
    """bench_train.py's JSON: one row per variant, its wall time, memory, accuracy and its
    speed against the PEFT recipe of the same run."""
    results = json.loads((DOCS / name).read_text())
    variants = {k: v for k, v in results.items() if isinstance(v, dict) and "variant" in v}
    peft = variants.get("peft")
    lines = [
        "| variant | train wall s | peak RSS GB | test accuracy | vs PEFT (wall) |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    for key, r in variants.items():
        ratio = f"{peft['wall_s'] / r['wall_s']:.2f}x" if peft else "-"
        lines.append(
            f"| {key} | {r['wall_s']:.1f} | {r['peak_rss_mb'] / 1000:.2f} | "
            f"{r['test_accuracy']:.3f} | {ratio} |"
        )
    cfg = results.get("config", {})
    flags = " ".join(
        f"--{k.replace('_', '-')}" + ("" if v is True else f" {v}")
        for k, v in cfg.items()
        if k in ("variants", "epochs", "batch_size") or (k.startswith("skip") and v)
    )
    run = dict(results.get("run") or {})  # date, machine and load since 2026-12-03
    if not run.get("date"):  # older files hold none; their name may
        date = re.search(r"\d{4}-\d{2}-\d{2}", name)
        run["date"] = f"{date.group(0)} (from the file's name)" if date else None
    run["command"] = f"benchmarks/bench_train.py {flags}"
    return "\n".join(lines) + "\n\n" + _source(name, [run])


def render_prefix(name: str) -> str:
    """bench_prefix.py's lines: seconds per step and peak memory per variant, per run."""
    out = []
    for run in read_rows(DOCS / name):
        rows = run["rows"]
        base = rows.get("prefix")
        out += [
            "| variant | s / step | x deep prompt | peak MB above the loaded model |",
            "| --- | ---: | ---: | ---: |",
        ]
        for key, r in rows.items():
            ratio = f"{r['step_s'] / base['step_s']:.2f}" if base else "-"
            out.append(f"| {key} | {r['step_s']:.2f} | {ratio} | {r['peak_above_model_mb']:,.0f} |")
        out += ["", _source(name, [{**run, "command": "benchmarks/bench_prefix.py"}]), ""]
    return "\n".join(out).rstrip()


def render_compare(name: str) -> str:
    """The table of compare's report.md, from the run's metrics.jsonl (as the report is)."""
    from softprompt.measure.report import COLUMNS, table_rows

    records = read_rows(DOCS / name)
    results = [r for r in records if r.get("kind") == "result"]
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(row) + " |" for row in table_rows(results)]
    config = next((r for r in records if r.get("kind") == "config"), {})
    git = (config.get("git") or {}).get("commit")
    run = {"model": config.get("model"), "date": f"commit {git[:10]}" if git else None}
    return "\n".join(lines) + "\n\n" + _source(name, [run])


def render_sweep(name: str) -> str:
    """The ranking `softprompt sweep` writes to sweep.md, from its sweep.jsonl."""
    from softprompt.commands.sweep import format_sweep

    records = read_rows(DOCS / name)
    rows = [{k: v for k, v in r.items() if k != "kind"} for r in records if r["kind"] == "recipe"]
    config = next((r["config"] for r in records if r.get("kind") == "config"), {})
    data = config.get("data", {})
    run = {"model": (config.get("model") or {}).get("model"), "date": None}
    line = _source(name, [run]).rstrip(".")
    return f"{format_sweep(rows)}\n\n{line}, data `{data.get('data')}`."


def render_distill(name: str) -> str:
    """distill's benchmark rows when they exist; until then, a note that says so."""
    path = DOCS / name
    if not path.is_file():
        return (
            '!!! note "Numbers pending"\n'
            f"    The measured numbers will be rendered here from `docs/{name}` (written by\n"
            "    `python benchmarks/bench_distill.py`) once that file is saved; none are\n"
            "    quoted until then."
        )
    rows = read_rows(path)
    table = _tables().distill_table([r for r in rows if r.get("kind") != "run"])
    return table + "\n\n" + _source(name, [r for r in rows if r.get("kind") == "run"])


# --- the CLI reference --------------------------------------------------------------------


def render_cli(_: str | None = None) -> str:
    """Every command of ``softprompt.cli.COMMANDS`` and every flag of its parser: name,
    type or choices, default and help, as ``--help`` shows them."""
    from softprompt.cli import COMMANDS, make_parser

    parser = make_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    out = []
    for name, cmd in COMMANDS.items():
        p = sub.choices[name]
        out += [f"## `softprompt {name}`", "", cmd.help[0].upper() + cmd.help[1:] + ".", ""]
        text, _, example = cmd.description.partition("\n\nExample:\n")
        out += ["```text", p.format_usage().strip(), "```", "", text, ""]
        if example:
            out += ["Example:", "", "```bash", example.strip(), "```", ""]
        out += ["| flag | value | default | what it does |", "| --- | --- | --- | --- |"]
        for action in p._actions:
            if isinstance(action, argparse._HelpAction):
                continue
            out.append("| " + " | ".join(_flag_cells(action)) + " |")
        out.append("")
    return "\n".join(out)


def _flag_cells(action: argparse.Action) -> list[str]:
    flag = ", ".join(f"`{o}`" for o in action.option_strings) or f"`{action.metavar}` (positional)"
    if action.choices:
        value = " \\| ".join(f"`{c}`" for c in action.choices)
    elif action.nargs == 0:
        value = "switch"
    else:
        value = f"`{action.metavar or action.dest.upper()}`"
        if action.required:
            value += " (required)"
    default = action.default
    shown = "-" if default in (None, "", [], False) or action.nargs == 0 else f"`{default!r}`"
    help_text = re.sub(r" \(default: .*?\)$", "", (action.help or "").replace("%%", "%"))
    return [flag, value, shown, _literal(help_text.replace("\n", " "))]


def _literal(text: str) -> str:
    """Help text as a table cell: markdown's characters escaped outside `code` (a `[` would
    start a link reference), a `|` escaped everywhere (it would end the cell)."""
    parts = text.split("`")
    for i in range(0, len(parts), 2):  # the even parts are outside backticks
        for char in "[]*_<":
            parts[i] = parts[i].replace(char, "\\" + char)
    return "`".join(parts).replace("|", "\\|")


def render_api(_: str | None = None) -> str:
    """One mkdocstrings block per name the package exports (``softprompt._EXPORTS``), in
    its order, so a new export appears here without editing the page."""
    from softprompt import _EXPORTS

    return "\n\n".join(f"::: softprompt.{module}.{name}" for name, module in _EXPORTS.items())


RENDER = {
    "api": render_api,
    "cli": render_cli,
    "suite": render_suite,
    "prompts": render_prompts,
    "train": render_train,
    "prefix": render_prefix,
    "compare": render_compare,
    "sweep": render_sweep,
    "distill": render_distill,
    "distill_sweep": lambda name: render_rows(name, "distill_sweep_table"),
    "output": lambda name: render_output(name),
    "pivot": lambda name: render_pivot(name),
    "console": lambda name: render_output(name, fenced=True),
}


def render_output(name: str, fenced: bool = False) -> str:
    """A command's saved console output as it printed it (benchmarks/record.py writes such
    files): markdown tables and lines, its sections as sub-headings, or with ``fenced`` plain
    text in a code block; its first line (what ran, where, when) is the source line."""
    lines = (DOCS / name).read_text(encoding="utf-8").splitlines()
    said = lines[0].lstrip("# ").strip() if lines and lines[0].startswith("# ") else ""
    if fenced:
        body = ["```text", *(lines[1:] if said else lines), "```"]
    else:
        body = []
        for line in lines[1:] if said else lines:
            if line.startswith("|") and body and body[-1].strip() and not body[-1].startswith("|"):
                body.append("")  # a table needs a blank line before it to be one
            body.append(("###" + line[1:]) if line.startswith("## ") else line)
    text = f"Rendered at build time from [`{name}`]({_link(name)})"
    text += f": {said}." if said else " (the file says no more about its run)."
    return "\n".join(body).strip() + "\n\n" + text


def render_pivot(name: str) -> str:
    """A table of suite rows from several runs, as ``FILE#TABLE`` of a JSON file of specs
    describes it (benchmarks/tables.py's pivot_table), then every run its cells came from."""
    file, _, table = name.partition("#")
    body, used = _tables().pivot_file(str(DOCS / name), read_rows)
    said = []
    for rows, run in used:
        rows, run = Path(rows).relative_to(DOCS).as_posix(), run or {}
        bits = [run.get("date"), run.get("machine"), run.get("model")]
        line = f"[`{rows}`]({_link(rows)})" + "".join(f", {b}" for b in bits if b)
        if run.get("command"):
            line += f": `python {run['command']}`"
        said.append(f"- {line}")
    return (
        f"{body}\n\nRendered at build time by the spec `{table}` of [`{file}`]({_link(file)}) "
        "from the rows of these runs:\n\n" + "\n".join(said)
    )


def render_rows(name: str, table: str) -> str:
    """A saved JSONL's rows through one of benchmarks/tables.py's functions, with its source."""
    rows = read_rows(DOCS / name)
    body = getattr(_tables(), table)([r for r in rows if r.get("kind") != "run"])
    return body + "\n\n" + _source(name, [r for r in rows if r.get("kind") == "run"])


def on_page_markdown(markdown: str, page, config, files) -> str:
    """Replace every ``<!-- generated: KIND [FILE] -->`` line of a page with its table, after
    checking that the page's prose quotes no figure its records do not hold."""
    root = "../" * page.file.src_uri.count("/")

    blocks = []

    def replace(match: re.Match) -> str:
        kind, name = match.group(1), match.group(2)
        if kind not in RENDER:
            raise ValueError(f"{page.file.src_uri}: unknown generated block {kind!r}")
        blocks.append(RENDER[kind](name).replace("{root}", root))
        return blocks[-1]

    out = MARK.sub(replace, markdown)
    if page.file.src_uri not in RECORDS:  # a tool's own output file is a record itself
        stale = unrendered_figures(markdown, "\n".join(blocks))
        if stale:
            shown = "\n".join(f"  line {n}: {fig!r} in: {line.strip()[:90]}" for n, fig, line
                               in stale[:12])  # fmt: skip
            raise ValueError(
                f"{page.file.src_uri}: {len(stale)} figure(s) in the prose are in none of the "
                f"page's rendered records (a record was re-run, or a figure was typed): quote "
                f"the record's figure, render it, or drop it\n{shown}"
            )
    return out


# --- figures in prose: only those the page's records hold --------------------------------------

# Pages that are a tool's output (its records): compare's report, sweep's ranking, the
# architecture matrix (tests/matrix.py --write-docs).
RECORDS = {"compare-sentiment/report.md", "sweep-antonyms/sweep.md",
           "sweep-sentiment/sweep.md", "architectures.md"}  # fmt: skip
# A measured figure: a decimal, or a number with a unit of time, memory, share or ratio.
FIGURE = re.compile(
    r"(?<![\w.\-])(\d[\d,]*\.\d+(?![.\d])|\d[\d,]*(?=x\b| ?(?:%|s\b|ms\b|MB\b|GB\b)))"
)  # (not a version or an address: 3.10.1, 127.0.0.1)
# Words just before a figure that make it a setting, a target, a version or an address,
# not a measurement.
NOT_MEASURED = re.compile(
    r"(target|lr|rate|rates|temperature|between 0 and|python|peft|llama|transformers|torch"
    r"|version|limit|--[\w-]+|=|\d\.|at most|at least|up to|<=|>=|≥|≤)"
    r"(?:\W+(?:of|is|was|at|a))?\W{0,3}$",
    re.I,
)


def unrendered_figures(markdown: str, rendered: str) -> list[tuple[int, str, str]]:
    """(line, figure, text) of each measured figure in the page's prose (outside code,
    tables, headings and generated blocks) that no
    number of ``rendered`` (the page's records as rendered) equals, to the figure's
    precision (a share may be quoted as a percentage of a fraction)."""
    numbers = set()
    for token in re.findall(r"\d[\d,]*(?:\.\d+)?(?:e-?\d+)?", rendered):
        try:
            numbers.add(float(token.replace(",", "")))
        except ValueError:
            continue
    found, fenced = [], False
    for n, line in enumerate(markdown.splitlines(), 1):
        if line.lstrip().startswith(("```", "~~~")):
            fenced = not fenced
            continue
        if fenced or line.startswith(("#", "|", "    ")) or MARK.match(line):
            continue
        prose = re.sub(r"`[^`]*`|\[[^\]]*\]\([^)]*\)|https?://\S+", " ", line)
        for m in FIGURE.finditer(prose):
            if NOT_MEASURED.search(prose[max(0, m.start() - 28) : m.start()]):
                continue
            if not _held(m.group(1), numbers, prose):
                found.append((n, m.group(1), line))
    return found


def _held(figure: str, numbers: set[float], line: str) -> bool:
    """Whether a record holds the figure: one of its numbers, or (a figure quoted in points
    or as a gap: "+3.5", "12.5 points behind") the difference of two, in points."""
    text = figure.replace(",", "")
    places = len(text.split(".")[1]) if "." in text else 0
    value = float(text)
    if any(round(x, places) == value or round(x * 100, places) == value for x in numbers):
        return True
    if not re.search(rf"[+-]{re.escape(figure)}\b|{re.escape(figure)} points", line):
        return False
    fractions = sorted(x for x in numbers if x <= 1)
    return any(round(abs(a - b) * 100, places) == value for a in fractions for b in fractions)
