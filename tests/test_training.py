"""Training end to end on a tiny model: files written, determinism, resume, bad numbers."""

from __future__ import annotations

import importlib
import json

import pytest
import torch
from conftest import interrupted_at, train_config
from safetensors.torch import load_file

from softprompt.artifacts import load_prompt
from softprompt.cli import main
from softprompt.errors import ConfigError, TrainingError
from softprompt.loading import load_model
from softprompt.training import train

step_mod = importlib.import_module("softprompt.kinds.causal")  # where the step calls lm_loss


def _final(out) -> torch.Tensor:
    return load_file(str(out / "adapter_model.safetensors"))["prompt_embeddings"]


def test_train_writes_the_artifact(tiny_dir, pairs_file, tmp_path):
    """A run writes exactly the documented files, logs every step, and learns."""
    out = tmp_path / "run"
    result = train(train_config(tiny_dir, pairs_file, out, epochs=8), progress=False)
    files = {p.name for p in out.iterdir()}
    assert files == {
        "adapter_config.json",
        "adapter_model.safetensors",
        "softprompt.json",
        "initial_prompt.safetensors",
        "metrics.jsonl",
        "loss.png",
        "checkpoints",
        ".softprompt-output.json",  # what softprompt wrote here, so --overwrite removes only that
    }
    owned = json.loads((out / ".softprompt-output.json").read_text())["entries"]
    assert set(owned) == files - {".softprompt-output.json"}
    assert len(list((out / "checkpoints").iterdir())) == 2  # the newest two are kept
    records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    kinds = [r["kind"] for r in records]
    assert kinds[0] == "config" and kinds.count("base") == 1
    assert kinds.count("train") == result.summary["steps"] == 8 * 3  # 9 rows / 3 per batch
    assert kinds.count("val") == 1 + 8  # the initial prompt, then each epoch
    s = result.summary
    assert s["best_val_loss"] < s["initial_val_loss"]
    # the optimizer steps' own time (as a bare loop is timed) is part of the whole loop's
    steps_s = sum(r["step_s"] for r in records if r["kind"] == "train")
    assert 0 < s["step_seconds"] == pytest.approx(steps_s, abs=0.01)
    assert s["step_seconds"] <= s["train_seconds"]
    meta = json.loads((out / "softprompt.json").read_text())
    assert meta["template"] == "review : {input} sentiment :"
    assert meta["data"]["train_examples"] == 9 and meta["data"]["val_examples"] == 3
    assert meta["metrics"]["best_val_loss"] == s["best_val_loss"]
    assert (out / "loss.png").read_bytes()[:4] == b"\x89PNG"
    prompt, _ = load_prompt(out, load_model(model=str(tiny_dir)).model)
    torch.testing.assert_close(prompt.embedding, result.prompt.embedding.detach())


def test_same_seed_same_prompt(tiny_dir, pairs_file, tmp_path):
    """Training the same data twice with the same seed gives the same prompt; another seed not."""
    a = train(train_config(tiny_dir, pairs_file, tmp_path / "a", epochs=2), progress=False)
    b = train(train_config(tiny_dir, pairs_file, tmp_path / "b", epochs=2), progress=False)
    c = train(train_config(tiny_dir, pairs_file, tmp_path / "c", epochs=2, seed=1), progress=False)
    assert torch.equal(_final(tmp_path / "a"), _final(tmp_path / "b"))
    assert not torch.equal(_final(tmp_path / "a"), _final(tmp_path / "c"))
    assert a.summary["best_val_loss"] == b.summary["best_val_loss"] != c.summary["best_val_loss"]


def test_grad_accum_matches_bigger_batch(tiny_dir, pairs_file, tmp_path):
    """Two accumulated batches of 6 make the same steps as one batch of 12 (every step sees
    all 12 rows either way, so only float summation order differs)."""
    kw = dict(max_steps=3, val_fraction=0.0, warmup_ratio=0.0)
    train(train_config(tiny_dir, pairs_file, tmp_path / "big", batch_size=12, **kw), progress=False)
    train(
        train_config(tiny_dir, pairs_file, tmp_path / "acc", batch_size=6, grad_accum=2, **kw),
        progress=False,
    )
    torch.testing.assert_close(
        _final(tmp_path / "acc"), _final(tmp_path / "big"), rtol=1e-4, atol=1e-5
    )
    train(train_config(tiny_dir, pairs_file, tmp_path / "one", batch_size=6, **kw), progress=False)
    assert not torch.allclose(_final(tmp_path / "one"), _final(tmp_path / "big"), atol=1e-3)


def test_interrupted_run_resumes_to_the_same_prompt(tiny_dir, pairs_file, tmp_path):
    """Interrupt mid-epoch, then --resume: the final prompt equals an uninterrupted run's."""
    train(train_config(tiny_dir, pairs_file, tmp_path / "ref", epochs=3), progress=False)

    with interrupted_at(5):  # in epoch 2 (3 batches per epoch), after the step-4 checkpoint
        train(
            train_config(tiny_dir, pairs_file, tmp_path / "cut", epochs=3, save_every=2),
            progress=False,
        )
    assert not (tmp_path / "cut" / "adapter_model.safetensors").exists()
    resumed = train(
        train_config(tiny_dir, pairs_file, tmp_path / "cut", epochs=3, save_every=2, resume=True),
        progress=False,
    )
    torch.testing.assert_close(_final(tmp_path / "cut"), _final(tmp_path / "ref"))
    assert resumed.summary["steps"] == 9
    steps = [
        json.loads(x).get("step")
        for x in (tmp_path / "cut" / "metrics.jsonl").read_text().splitlines()
        if json.loads(x)["kind"] == "train"
    ]
    assert steps == list(range(1, 10))  # no step logged twice


def test_corrupt_checkpoint_falls_back(tiny_dir, pairs_file, tmp_path, capsys):
    out = tmp_path / "run"
    train(train_config(tiny_dir, pairs_file, out, epochs=2), progress=False)
    newest = sorted((out / "checkpoints").iterdir())[-1]
    (newest / "tensors.safetensors").write_bytes(b"broken")
    train(train_config(tiny_dir, pairs_file, out, epochs=2, resume=True), progress=False)
    assert "is corrupt" in capsys.readouterr().err


def test_resume_refuses_changed_settings(tiny_dir, pairs_file, tmp_path):
    out = tmp_path / "run"
    train(train_config(tiny_dir, pairs_file, out, epochs=1), progress=False)
    with pytest.raises(ConfigError, match=r"lr \(was 0.3, now 0.1\)"):
        train(
            train_config(tiny_dir, pairs_file, out, epochs=2, lr=0.1, resume=True), progress=False
        )


def test_resume_compares_the_dtype_the_weights_ran_in(tiny_dir, pairs_file, tmp_path,
                                                     monkeypatch):  # fmt: skip
    """`--dtype auto` is the default: a run trained with --dtype float32 resumes under auto
    where auto is float32, and where auto is bfloat16 it is refused, saying what resumes it;
    a run under auto records the dtype it chose, so it resumes with --dtype float32 there."""
    from dataclasses import replace

    from softprompt import loading

    def config(out, dtype, **kw):
        cfg = train_config(tiny_dir, pairs_file, out, **kw)
        return replace(cfg, model=replace(cfg.model, dtype=dtype))

    assert train_config(tiny_dir, pairs_file, tmp_path).model.dtype == "auto"
    with interrupted_at(5):
        train(config(tmp_path / "run", "float32", save_every=2), progress=False)
    monkeypatch.setattr(loading, "_cpu_has_bf16", lambda: True)  # a host with native bf16
    with pytest.raises(ConfigError) as err:
        train(config(tmp_path / "run", "auto", save_every=2, resume=True), progress=False)
    assert "model.dtype (was 'float32', now 'bfloat16'); --dtype 'float32' resumes it" in (
        err.value.cli_message)  # fmt: skip
    assert str(err.value).endswith("; dtype='float32' resumes it")  # from Python
    monkeypatch.setattr(loading, "_cpu_has_bf16", lambda: False)  # one without
    resumed = train(config(tmp_path / "run", "auto", save_every=2, resume=True), progress=False)
    assert resumed.summary["steps"] == 9

    with interrupted_at(5):  # auto, where it is float32: resumes under --dtype float32
        train(config(tmp_path / "auto", "auto", save_every=2), progress=False)
    again = train(config(tmp_path / "auto", "float32", save_every=2, resume=True), progress=False)
    assert again.summary["steps"] == 9


def test_existing_run_is_not_overwritten(tiny_dir, pairs_file, tmp_path):
    out = tmp_path / "run"
    train(train_config(tiny_dir, pairs_file, out, max_steps=1), progress=False)
    with pytest.raises(ConfigError, match="already holds a run.*resume=True.*overwrite=True"):
        train(train_config(tiny_dir, pairs_file, out, max_steps=1), progress=False)
    train(train_config(tiny_dir, pairs_file, out, max_steps=2, overwrite=True), progress=False)
    with pytest.raises(ConfigError, match="no checkpoints"):
        train(
            train_config(tiny_dir, pairs_file, tmp_path / "new", max_steps=1, resume=True),
            progress=False,
        )


def _nan_at(monkeypatch, call: int) -> None:
    """Make the training step's ``call``-th loss NaN."""
    real_loss, calls = step_mod.lm_loss, {"n": 0}

    def poisoned(*args, **kwargs):
        loss, n = real_loss(*args, **kwargs)
        calls["n"] += 1
        return (loss * float("nan"), n) if calls["n"] == call else (loss, n)

    monkeypatch.setattr(step_mod, "lm_loss", poisoned)


def test_nan_loss_stops_and_keeps_the_last_good_prompt(tiny_dir, pairs_file, tmp_path, monkeypatch):
    _nan_at(monkeypatch, 3)
    out = tmp_path / "run"
    with pytest.raises(TrainingError, match="NaN or infinite at step 3.*Lower --lr"):
        train(train_config(tiny_dir, pairs_file, out, epochs=2, val_fraction=0.0), progress=False)
    saved = _final(out)
    assert torch.isfinite(saved).all()
    meta = json.loads((out / "softprompt.json").read_text())
    assert meta["metrics"]["stopped"] == "non-finite loss at step 3"


def test_nan_stop_saves_the_true_initial_prompt(tiny_dir, pairs_file, tmp_path, monkeypatch):
    """A run stopped by a NaN loss writes the prompt it started from as the initial prompt,
    not its last good prompt (they differ after two steps)."""
    kw = dict(epochs=2, val_fraction=0.0)
    train(train_config(tiny_dir, pairs_file, tmp_path / "ref", max_steps=1, **kw), progress=False)
    start = load_file(str(tmp_path / "ref" / "initial_prompt.safetensors"))["prompt_embeddings"]
    _nan_at(monkeypatch, 3)
    out = tmp_path / "run"
    with pytest.raises(TrainingError):
        train(train_config(tiny_dir, pairs_file, out, **kw), progress=False)
    initial = load_file(str(out / "initial_prompt.safetensors"))["prompt_embeddings"]
    assert torch.equal(initial, start)  # the same seed starts from the same prompt
    assert not torch.allclose(_final(out), initial)  # two steps were taken after it


def test_early_stopping(tiny_dir, pairs_file, tmp_path):
    """With a learning rate too small to help, patience ends the run early."""
    cfg = train_config(tiny_dir, pairs_file, tmp_path / "run", epochs=20, patience=1, lr=1e-9)
    result = train(cfg, progress=False)
    assert result.summary["stop_reason"].startswith("early stop")
    assert result.summary["epochs_completed"] < 20


def test_max_length_below_prompt_is_refused(tiny_dir, pairs_file, tmp_path):
    with pytest.raises(ConfigError, match="max_length=5 leaves no room"):
        train_config(tiny_dir, pairs_file, tmp_path, max_length=5)


def test_resume_of_a_finished_run_says_so(tiny_dir, pairs_file, tmp_path, capsys):
    out = tmp_path / "run"
    first = train(train_config(tiny_dir, pairs_file, out, epochs=2), progress=False)
    before = (out / "metrics.jsonl").read_text()
    again = train(train_config(tiny_dir, pairs_file, out, epochs=2, resume=True), progress=False)
    err = capsys.readouterr().err
    assert "holds a finished run (6 steps" in err and "resuming from" not in err
    assert (out / "metrics.jsonl").read_text() == before
    assert again.summary == first.summary
    torch.testing.assert_close(again.prompt.embedding, first.prompt.embedding)


def test_epochs_count_from_one_in_the_log(tiny_dir, pairs_file, tmp_path):
    """metrics.jsonl and the progress bar say the same epoch: 1 for the first epoch's steps
    and its closing validation, 0 before any step."""
    out = tmp_path / "run"
    train(train_config(tiny_dir, pairs_file, out, epochs=2), progress=False)
    records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    steps = {r["step"]: r["epoch"] for r in records if r["kind"] == "train"}
    assert steps == {1: 1, 2: 1, 3: 1, 4: 2, 5: 2, 6: 2}
    assert [r["epoch"] for r in records if r["kind"] == "val"] == [0, 1, 2]


def test_config_errors_name_arguments_or_flags(tiny_dir, pairs_file, tmp_path, capsys):
    """From Python a ConfigError names the argument; the CLI prints the flag."""
    out = tmp_path / "run"
    train(train_config(tiny_dir, pairs_file, out, max_steps=1), progress=False)
    with pytest.raises(ConfigError) as err:
        train(train_config(tiny_dir, pairs_file, out, max_steps=1), progress=False)
    assert "pass resume=True to continue it, overwrite=True to replace it" in str(err.value)
    args = ["train", "--model", str(tiny_dir), "--data", str(pairs_file), "--input-field",
            "review", "--target-field", "label", "--output", str(out)]  # fmt: skip
    assert main(args) == 2
    assert "pass --resume to continue it, --overwrite to replace it" in capsys.readouterr().err
