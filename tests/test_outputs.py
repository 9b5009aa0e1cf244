"""Issue 23, cases 1-3: an output folder's marker is checked, never trusted; one kind of
output never replaces another; a claim is atomic across processes."""

from __future__ import annotations

import json
import multiprocessing

import pytest
from conftest import train_config

from softprompt.cli import main
from softprompt.errors import ConfigError
from softprompt.outputs import FORMAT, MARKER, claim_output, write_text
from softprompt.training import train


def _error_line(capsys) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = [x for x in err.splitlines() if x.startswith("softprompt: error:")]
    assert len(lines) == 1, err
    return lines[0]


def _run(tiny_dir, pairs_file, out):
    train(train_config(tiny_dir, pairs_file, out, max_steps=1), progress=False)
    return sorted(p.name for p in out.iterdir())


# --- 1. eval and export never delete a run -------------------------------------------------


def test_eval_into_a_run_folder_is_refused_and_keeps_the_run(tiny_dir, pairs_file, tmp_path,
                                                             capsys):  # fmt: skip
    run = tmp_path / "r"
    before = _run(tiny_dir, pairs_file, run)
    code = main(["eval", "--prompt", str(run), "--model", str(tiny_dir), "--data",
                 str(pairs_file), "--input-field", "review", "--target-field", "label",
                 "--output", str(run)])  # fmt: skip
    assert code == 2
    assert "holds a run, not results" in _error_line(capsys)
    assert sorted(p.name for p in run.iterdir()) == before


def test_export_overwrite_into_a_run_folder_is_refused(tiny_dir, pairs_file, tmp_path, capsys):
    run = tmp_path / "r"
    before = _run(tiny_dir, pairs_file, run)
    code = main(["export", str(run), "--to", "numpy", "--output", str(run), "--overwrite"])
    assert code == 2
    assert "holds a run, not an export" in _error_line(capsys)
    assert sorted(p.name for p in run.iterdir()) == before


def test_eval_overwrites_only_its_own_results(tmp_path):
    out = tmp_path / "e"
    claim_output(out, "results", overwrite=True)
    write_text(out / "results.json", "{}")
    (out / "notes.txt").write_text("mine")
    claim_output(out, "results", overwrite=True)
    assert sorted(p.name for p in out.iterdir() if not p.name.startswith(".")) == ["notes.txt"]


# --- 2. the marker is checked ---------------------------------------------------------------


def _forged(out, entries, **extra):
    out.mkdir(parents=True)
    body = {"format": FORMAT, "kind": "run", "entries": entries, **extra}
    (out / MARKER).write_text(json.dumps(body))


@pytest.mark.parametrize(
    "entries",
    [["/abs/victim"], ["../victim2"], "abc", ["a/b"], [5], ["thesis.tex"], ["."], [".."]],
)
def test_a_marker_naming_anything_but_its_own_files_removes_nothing(tmp_path, entries):
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "keep").write_text("x")
    out = tmp_path / "sub" / "out"
    if entries == ["/abs/victim"]:
        entries = [str(victim)]
    _forged(out, entries)
    for name in ("a", "b", "c", "thesis.tex"):
        (out / name).write_text("user")
    with pytest.raises(ConfigError, match="remove the folder's files by hand"):
        claim_output(out, "a run", overwrite=True)
    assert (victim / "keep").read_text() == "x"
    assert sorted(p.name for p in out.iterdir()) == sorted([MARKER, "a", "b", "c", "thesis.tex"])


@pytest.mark.parametrize(
    "body",
    [
        {"entries": ["metrics.jsonl"]},  # no format: not proven to be softprompt's
        {"written_by": "softprompt", "entries": ["metrics.jsonl"]},
        {"format": "softprompt-output/9", "kind": "run", "entries": ["metrics.jsonl"]},
        {"format": FORMAT, "kind": "bogus", "entries": ["metrics.jsonl"]},
        [1, 2],
    ],
)
def test_a_marker_without_proof_removes_nothing(tmp_path, body):
    out = tmp_path / "out"
    out.mkdir()
    (out / MARKER).write_text(json.dumps(body))
    (out / "metrics.jsonl").write_text("mine\n")
    with pytest.raises(ConfigError, match="by hand"):
        claim_output(out, "a run", overwrite=True)
    assert (out / "metrics.jsonl").read_text() == "mine\n"


def test_a_marker_that_is_deeply_nested_or_a_folder_is_damaged(tmp_path):
    for i, text in enumerate(["[" * 100_000 + "]" * 100_000, None]):
        out = tmp_path / str(i)
        out.mkdir()
        if text is None:
            (out / MARKER).mkdir()
        else:
            (out / MARKER).write_text(text)
        (out / "metrics.jsonl").write_text("mine\n")
        with pytest.raises(ConfigError, match="damaged|not written by"):
            claim_output(out, "a run", overwrite=True)
        assert (out / "metrics.jsonl").read_text() == "mine\n"


def test_a_user_folder_that_looks_like_an_old_run_is_never_adopted(tmp_path):
    out = tmp_path / "mine"
    (out / "checkpoints").mkdir(parents=True)
    (out / "checkpoints" / "model.bin").write_text("weights")
    (out / "results.json").write_text("{}")
    with pytest.raises(ConfigError, match="did not write"):
        claim_output(out, "a run", overwrite=True)
    assert (out / "checkpoints" / "model.bin").read_text() == "weights"


def test_a_listed_task_folder_holding_user_files_is_not_removed(tmp_path):
    out = tmp_path / "run"
    _forged(out, ["negative", "metrics.jsonl"])
    (out / "negative").mkdir()
    (out / "negative" / "thesis.tex").write_text("mine")
    (out / "metrics.jsonl").write_text("{}\n")
    with pytest.raises(ConfigError, match="not a folder a run writes"):
        claim_output(out, "a run", overwrite=True)
    assert (out / "negative" / "thesis.tex").exists() and (out / "metrics.jsonl").exists()


def test_a_listed_link_is_removed_not_followed(tmp_path):
    target = tmp_path / "elsewhere"
    target.mkdir()
    (target / "keep").write_text("x")
    out = tmp_path / "run"
    _forged(out, ["checkpoints"])
    (out / "checkpoints").symlink_to(target)
    claim_output(out, "a run", overwrite=True)
    assert (target / "keep").read_text() == "x" and not (out / "checkpoints").exists()


def test_the_marker_records_kind_and_format(tiny_dir, pairs_file, tmp_path):
    run = tmp_path / "r"
    _run(tiny_dir, pairs_file, run)
    body = json.loads((run / MARKER).read_text())
    assert body["format"] == FORMAT and body["kind"] == "run"
    assert "adapter_model.safetensors" in body["entries"]


# --- 3. two processes claiming one folder ---------------------------------------------------


def _claim(folder: str, barrier, results) -> None:
    barrier.wait()
    try:
        claim_output(folder, "a run")
        results.put("ok")
    except ConfigError as err:
        results.put(str(err))
    barrier.wait()  # hold the claim until both have tried


def test_two_processes_claiming_one_folder_one_wins(tmp_path):
    ctx = multiprocessing.get_context("fork")  # the claim runs no threads
    for i in range(3):
        folder = str(tmp_path / f"race{i}")
        barrier, results = ctx.Barrier(2), ctx.Queue()
        procs = [ctx.Process(target=_claim, args=(folder, barrier, results)) for _ in range(2)]
        for p in procs:
            p.start()
        got = sorted(results.get(timeout=120) for _ in procs)
        for p in procs:
            p.join(timeout=120)
        assert got[0] != "ok" or got[1] != "ok", got
        assert "ok" in got, got
        loser = next(g for g in got if g != "ok")
        assert "another softprompt process" in loser or "already holds a run" in loser
