"""Markdown tables from saved benchmark rows, with nothing heavier than the standard library
imported: `suite.py --table`, `bench_prompts.py --table` and the documentation's build hook
(docs/hooks/generated.py) print the same tables from the same JSONL files."""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from pathlib import Path


def run_facts() -> dict:
    """When and where a benchmark runs, for its saved header: date, machine, load average."""
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    machine = f"{platform.machine()}, {os.cpu_count()} cores"
    return {"date": time.strftime("%Y-%m-%d %H:%M"), "machine": machine, "load_average": load}


def cell(values: list[float], fmt: str) -> str:
    if not values:
        return "-"
    return f"{statistics.mean(values):{fmt}} ({min(values):{fmt}}-{max(values):{fmt}})"


def groups(rows: list[dict], tasks: list[str], names: list[str], key: str):
    """(task, name, rows) for each task and each name of ``key`` that has rows, in the order
    given: one table line each."""
    for task in tasks:
        for name in names:
            got = [r for r in rows if r["task"] == task and r[key] == name]
            if got:
                yield task, name, got


def suite_table(rows: list[dict]) -> str:
    """Mean (min-max) over seeds per task and method, then the suite's mean per method."""
    tasks = list(dict.fromkeys(r["task"] for r in rows))
    methods = list(dict.fromkeys(r["method"] for r in rows))
    lines = [
        "| task | method | seeds | accuracy | macro-F1 | chrF / BLEU | steps | train s | peak MB |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for task, method, got in groups(rows, tasks, methods, "method"):
        failed = [r for r in got if "error" in r]
        got = [r for r in got if "error" not in r]
        if failed:
            lines.append(f"| {task} | {method} | {len(failed)} failed: "
                         f"{failed[0]['error'][:80]} | | | | | | |")  # fmt: skip
        if not got:
            continue
        gen = "chrf" in got[0]
        texts = [cell([r[k] for r in got], ".1f") for k in ("chrf", "bleu")] if gen else []
        lines.append(
            f"| {task} | {method} | {len(got)} | "
            f"{'-' if gen else cell([r['accuracy'] for r in got], '.3f')} | "
            f"{'-' if gen else cell([r['macro_f1'] for r in got], '.3f')} | "
            + (" / ".join(texts) if gen else "-")
            + f" | {statistics.mean(r['steps'] for r in got):.0f} | "
            f"{cell([r['train_seconds'] for r in got], '.0f')} | "
            f"{cell([r['peak_memory_mb'] for r in got], '.0f')} |"
        )  # fmt: skip
    lines += ["", "Suite mean over the classification tasks every method ran (accuracy, "
              "macro-F1; per task the mean over seeds):", "",
              "| method | tasks | accuracy | macro-F1 | vs defaults (accuracy) |",
              "| --- | --- | --- | --- | --- |"]  # fmt: skip
    classify = [t for t in tasks if not any("chrf" in r for r in rows if r["task"] == t)]

    def task_mean(method, task, key):
        got = [r[key] for r in rows if r["task"] == task and r["method"] == method and key in r]
        return statistics.mean(got) if got else None

    common = [t for t in classify if all(task_mean(m, t, "accuracy") is not None for m in methods)]
    base = [task_mean("defaults", t, "accuracy") for t in common] if "defaults" in methods else None
    for method in methods:
        acc = [task_mean(method, t, "accuracy") for t in common]
        f1 = [task_mean(method, t, "macro_f1") for t in common]
        if not acc:
            continue
        diff = "-"
        if base and method != "defaults":
            per = [a - b for a, b in zip(acc, base)]
            diff = f"{statistics.mean(per):+.3f} (worst task {min(per):+.3f})"
        lines.append(f"| {method} | {len(common)} | {statistics.mean(acc):.3f} | "
                     f"{statistics.mean(f1):.3f} | {diff} |")  # fmt: skip
    return "\n".join(lines)


def prompts_table(
    rows: list[dict], tasks: list[str] | None = None, variants: list[str] | None = None
) -> str:
    """bench_prompts.py's rows: mean (min-max) over seeds per task and variant, in the order
    given (by default, the order the rows first name them)."""
    tasks = tasks or list(dict.fromkeys(r["task"] for r in rows))
    variants = variants or list(dict.fromkeys(r["variant"] for r in rows))
    lines = [
        "| task | variant | seeds | test accuracy | mean member accuracy | train s |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for task, variant, got in groups(rows, tasks, variants, "variant"):
        members = [statistics.mean(r["member_accuracy"]) for r in got if "member_accuracy" in r]
        lines.append(
            f"| {task} | {variant} | {len(got)} | "
            f"{cell([r['test_accuracy'] for r in got], '.3f')} | {cell(members, '.3f')} | "
            f"{cell([r['train_seconds'] for r in got], '.0f')} |"
        )
    return "\n".join(lines)


def mean_sd(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.3f}"
    return f"{statistics.mean(values):.3f} ± {statistics.stdev(values):.3f}"


def col(rows: list[dict], key: str) -> str:
    return mean_sd([r[key] for r in rows])


def distill_table(rows: list[dict]) -> str:
    """bench_distill's rows: per task, the teacher, the bare model, the prompt tuned on labels
    and the distilled prompt (mean ± sd over seeds), and the distilled prompt's targets."""
    out = []
    for task in dict.fromkeys(r["task"] for r in rows):
        mine = [r for r in rows if r["task"] == task]
        seeds = sorted({r["seed"] for r in mine})
        out += [f"\n{task} ({len(seeds)} seed{'s' if len(seeds) > 1 else ''}, "
                f"{mine[0]['inputs']} held-out inputs)",
                "| variant | task metric | answers = teacher | tokens = teacher | KL / token "
                "| prefill tokens | first token ms |", "|---|---|---|---|---|---|---|"]  # fmt: skip
        first = [r for r in mine if r["variant"].startswith("distilled")]
        t_metric = [r.get("teacher_metric", float("nan")) for r in first if r["variant"] ==
                    first[0]["variant"]]  # fmt: skip
        t_pre = statistics.mean(r["teacher_prefill_tokens"] for r in first)
        t_ms = statistics.mean(r["teacher_first_token_ms"] for r in first)
        out.append(f"| teacher (long prompt) | {mean_sd(t_metric)} | 1 | 1 | 0 | {t_pre:.0f} | "
                   f"{t_ms:.0f} |")  # fmt: skip
        for variant in dict.fromkeys(r["variant"] for r in mine):
            rs = [r for r in mine if r["variant"] == variant]
            metric = col(rs, "student_metric") if "student_metric" in rs[0] else "-"
            out.append(
                f"| {variant} | {metric} | {col(rs, 'answer_match')} | "
                f"{col(rs, 'token_match')} | {col(rs, 'kl_per_token')} | "
                f"{statistics.mean(r['student_prefill_tokens'] for r in rs):.0f} | "
                f"{statistics.mean(r['student_first_token_ms'] for r in rs):.0f} |"
            )
        out.append("")
        for variant in dict.fromkeys(r["variant"] for r in first):
            dist = [r for r in first if r["variant"] == variant]
            pre = statistics.mean(r["prefill_ratio"] for r in dist)
            ttft = statistics.mean(r["first_token_speedup"] for r in dist)
            agree = statistics.mean(r["answer_match"] for r in dist)
            lost = statistics.mean(r.get("teacher_metric", 0) - r.get("student_metric", 0)
                                   for r in dist)  # fmt: skip
            out.append(f"{variant} vs teacher: answers agree {agree:.1%} (target >= 90%), "
                       f"metric {-lost * 100:+.1f} points (target >= -1), prefill {pre:.1f}x "
                       f"fewer tokens (target >= 10x), first token {ttft:.1f}x faster "
                       "(target >= 3x)")  # fmt: skip
    return "\n".join(out)


def distill_sweep_table(rows: list[dict]) -> str:
    """distill's variants on one cached teacher: learning rate, epochs, validation KL, and
    the prompt against the teacher on the held-out inputs."""
    out = ["| task | lr | epochs | validation KL | answers = teacher | task metric | teacher's |",
           "|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in rows:
        out.append(
            f"| {r['task']} | {r.get('lr', 0.03):g} | {r.get('epochs', 3)} | "
            f"{r['best_val']:.3f} | {r['answer_match']:.2f} | {r['student_metric']:.3f} | "
            f"{r['teacher_metric']:.3f} |"
        )
    return "\n".join(out)


# --- pivots: tasks against named lines drawn from several saved runs -----------------------

FORMATS = {"chrf": ".1f", "bleu": ".1f", "train_seconds": ".0f", "run_seconds": ".0f",
           "wall_seconds": ".0f", "peak_memory_mb": ".0f"}  # fmt: skip
LABELS = {"accuracy": "accuracy", "macro_f1": "macro-F1", "chrf": "chrF", "bleu": "BLEU",
          "best_val_loss": "best validation loss", "train_seconds": "train s",
          "run_seconds": "train s with validation", "wall_seconds": "whole run s",
          "peak_memory_mb": "peak MB"}  # fmt: skip


def with_runs(records: list[dict]) -> list[dict]:
    """A suite JSONL's result rows, each with the run header ({"kind": "run", ...}) that
    precedes it under ``"_run"`` (None before the first header)."""
    run, out = None, []
    for record in records:
        if record.get("kind") == "run":
            run = record
        elif "task" in record:
            out.append({**record, "_run": run})
    return out


def _selected(rows: list[dict], sel: dict, task: str, seeds) -> list[dict]:
    if task not in sel.get("tasks", [task]):
        return []
    sel = {**sel, **sel.get("cells", {}).get(task, {})}
    seeds = sel.get("seeds", seeds)
    return [
        r for r in rows
        if r["task"] == task and r.get("method") == sel["method"]
        and (seeds is None or r.get("seed") in seeds)
        and (not sel.get("run") or sel["run"] in ((r["_run"] or {}).get("date") or ""))
    ]  # fmt: skip


def pivot_table(spec: dict, load) -> tuple[str, list[tuple[str, dict | None]]]:
    """Saved suite rows as a table of tasks against named lines, each line a method of one
    run or several runs' methods together, with means over tasks.

    ``spec``: ``tasks``; ``metrics`` (default ["accuracy"]: one column or row per task and
    metric); ``seeds`` (None: all); ``corner`` (the top-left cell); ``lines_as`` ("columns",
    the default, or "rows"); ``lines``: [{label, file, method, run?, tasks?, seeds?, cells?:
    {task: overrides}, bold?, compete?}] or [{label, from: [selections], ...}]; ``means``:
    [{label, tasks}] (a line's mean only where it has every one of those tasks); ``bold``:
    "max" to bold each column's best among the lines that compete (all but ``compete:
    false``). A cell is the mean over the matching rows, with its (min-max) when there are
    several, and "(seed N)" when its one row is of a seed the spec does not name.
    ``load(file)`` returns a file's records. Returns the markdown and the (file, run
    header) pairs the cells came from, by date."""
    tasks, metrics = spec["tasks"], spec.get("metrics", ["accuracy"])
    seeds, lines = spec.get("seeds"), spec["lines"]
    cache: dict[str, list[dict]] = {}
    used: dict[tuple[str, str], tuple[str, dict | None]] = {}

    def rows_for(line: dict, task: str) -> tuple[list[dict], bool]:
        got, failed = [], False
        for sel in line.get("from", [line]):
            if sel["file"] not in cache:
                cache[sel["file"]] = with_runs(load(sel["file"]))
            for r in _selected(cache[sel["file"]], sel, task, seeds):
                if "error" in r:
                    failed = True
                    continue
                got.append(r)
                run = r["_run"] or {}
                used.setdefault((sel["file"], f"{run.get('date')}|{run.get('command')}"),
                                (sel["file"], r["_run"]))  # fmt: skip
        return got, failed and not got

    grid = {(i, t): rows_for(line, t) for i, line in enumerate(lines) for t in tasks}
    keys = [(t, m) for t in tasks for m in metrics]
    keys += [(mean["label"], m) for mean in spec.get("means", []) for m in metrics]
    means = {mean["label"]: mean["tasks"] for mean in spec.get("means", [])}

    def value(i: int, key: tuple[str, str]) -> float | None:
        name, metric = key
        if name in means:
            per = [value(i, (t, metric)) for t in means[name]]
            return None if None in per else statistics.mean(per)
        got = [r[metric] for r in grid[i, name][0] if r.get(metric) is not None]
        return statistics.mean(got) if got else None

    def text(i: int, key: tuple[str, str]) -> str:
        name, metric = key
        fmt = FORMATS.get(metric, ".3f")
        if name in means:
            v = value(i, key)
            return "-" if v is None else f"{v:{fmt}}"
        got, failed = grid[i, name]
        vals = [r[metric] for r in got if r.get(metric) is not None]
        if failed or not vals:
            return "failed" if failed else "-"
        if len(vals) > 1:
            return cell(vals, fmt)
        seed = got[0].get("seed")
        return f"{vals[0]:{fmt}}" + (f" (seed {seed})" if seeds and seed not in seeds else "")

    def shown(i: int, key: tuple[str, str]) -> str:
        out, v = text(i, key), value(i, key)
        fmt = FORMATS.get(key[1], ".3f")
        rivals = [value(j, key) for j, line in enumerate(lines) if line.get("compete", True)]
        rivals = [x for x in rivals if x is not None]
        top = (spec.get("bold") == "max" and lines[i].get("compete", True) and v is not None
               and rivals and f"{v:{fmt}}" == f"{max(rivals):{fmt}}")  # fmt: skip
        strong = (lines[i].get("bold") or top) and out not in ("-", "failed")
        return f"**{out}**" if strong else out

    def label(key: tuple[str, str]) -> str:
        name, metric = key
        if len(metrics) == 1:
            return name
        shown = LABELS.get(metric, metric)
        return shown if len(tasks) == 1 and name not in means else f"{name} {shown}"

    corner = spec.get("corner", ", ".join(metrics))
    if spec.get("lines_as", "columns") == "rows":
        head = [corner] + [label(k) for k in keys]
        body = [[line["label"]] + [shown(i, k) for k in keys] for i, line in enumerate(lines)]
    else:
        head = [corner] + [line["label"] for line in lines]
        body = [[label(k)] + [shown(i, k) for i in range(len(lines))] for k in keys]
    out = ["| " + " | ".join(head) + " |", "| " + " | ".join("---" for _ in head) + " |"]
    out += ["| " + " | ".join(row) + " |" for row in body]
    by_date = sorted(used.values(), key=lambda u: ((u[1] or {}).get("date") or "", u[0]))
    return "\n".join(out), by_date


SOURCES = "sources"  # a spec file's named selections: {name: [selections]}


def _named(line: dict, sources: dict) -> dict:
    """A line whose ``from`` names one of the spec file's ``sources``, with that list."""
    if not isinstance(line.get("from"), str):
        return line
    if line["from"] not in sources:
        raise KeyError(f"line {line['label']!r}: no source {line['from']!r} in the spec file")
    return {**line, "from": sources[line["from"]]}


def pivot_file(name: str, read) -> tuple[str, list[tuple[str, dict | None]]]:
    """``SPECS#NAME``: the pivot table NAME of a JSON file of specs, whose files are named
    relative to it and read with ``read(path)``; the table and the (file, run header) pairs
    used, each file as a path beside the spec file. A line's ``from`` may name a list of
    selections kept once under the file's ``sources``, for lines that several tables share."""
    file, _, key = name.partition("#")
    specs = json.loads(Path(file).read_text())
    sources = specs.pop(SOURCES, {})
    if key not in specs:
        raise KeyError(f"{file} has no table {key!r} (it has: {', '.join(specs)})")
    folder = Path(file).parent
    spec = {**specs[key], "lines": [_named(line, sources) for line in specs[key]["lines"]]}
    body, used = pivot_table(spec, lambda rows: read(folder / rows))
    return body, [((folder / rows).as_posix(), run) for rows, run in used]
