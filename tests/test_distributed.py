"""Data-parallel training: 2 processes (gloo on CPU) make the same steps as one process
with the same global batch."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file


def _train_args(model_dir: Path, data: Path, out: Path) -> list[str]:
    return [
        "train",
        "--model",
        str(model_dir),
        "--data",
        str(data),
        "--input-field",
        "review",
        "--target-field",
        "label",
        "--num-virtual-tokens",
        "4",
        "--batch-size",
        "6",
        "--epochs",
        "3",
        "--lr",
        "0.3",
        "--val-fraction",
        "0.25",
        "--output",
        str(out),
    ]


def _env() -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.pop("WORLD_SIZE", None)
    return env


@pytest.mark.skipif(
    shutil.which("torchrun", path=str(Path(sys.executable).parent)) is None
    and shutil.which("torchrun") is None,
    reason="torchrun not installed",
)
def test_two_processes_equal_one(tiny_dir, pairs_file, tmp_path):
    torchrun = Path(sys.executable).parent / "torchrun"
    one = subprocess.run(
        [sys.executable, "-m", "softprompt", *_train_args(tiny_dir, pairs_file, tmp_path / "one")],
        env=_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert one.returncode == 0, one.stderr[-2000:]
    two = subprocess.run(
        [
            str(torchrun),
            "--nproc_per_node",
            "2",
            "--master_port",
            "29517",
            "-m",
            "softprompt",
            *_train_args(tiny_dir, pairs_file, tmp_path / "two"),
        ],
        env=_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert two.returncode == 0, two.stderr[-3000:]
    a = load_file(str(tmp_path / "one" / "adapter_model.safetensors"))["prompt_embeddings"]
    b = load_file(str(tmp_path / "two" / "adapter_model.safetensors"))["prompt_embeddings"]
    torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5)
    assert not torch.equal(
        a, load_file(str(tmp_path / "one" / "initial_prompt.safetensors"))["prompt_embeddings"]
    )
    # Only rank 0 writes: one metrics file with one line per step, one closing message.
    lines = (tmp_path / "two" / "metrics.jsonl").read_text().splitlines()
    assert sum('"kind": "train"' in x for x in lines) == 6
    assert two.stderr.count("[softprompt] done:") == 1


def test_sigkill_then_resume_ends_with_the_same_prompt(tiny_dir, pairs_file, tmp_path):
    """Kill -9 a training process after a few checkpoints, resume it with --resume, and
    end with the prompt of a run that was never interrupted."""
    import signal
    import time

    def args(out: Path) -> list[str]:
        return [
            sys.executable,
            "-m",
            "softprompt",
            "train",
            "--model",
            str(tiny_dir),
            "--data",
            str(pairs_file),
            "--input-field",
            "review",
            "--target-field",
            "label",
            "--num-virtual-tokens",
            "4",
            "--batch-size",
            "3",
            "--epochs",
            "60",
            "--save-every",
            "5",
            "--lr",
            "0.1",
            "--output",
            str(out),
        ]

    ref = subprocess.run(args(tmp_path / "ref"), env=_env(), capture_output=True, text=True)
    assert ref.returncode == 0, ref.stderr[-2000:]

    cut = tmp_path / "cut"
    proc = subprocess.Popen(
        args(cut), env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        done = (
            sorted((cut / "checkpoints").glob("step-*")) if (cut / "checkpoints").exists() else []
        )
        if done and int(done[-1].name.split("-")[1]) >= 10:
            break
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    assert not (cut / "adapter_model.safetensors").exists()

    resumed = subprocess.run(args(cut) + ["--resume"], env=_env(), capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resuming from step-" in resumed.stderr
    final = load_file(str(cut / "adapter_model.safetensors"))["prompt_embeddings"]
    expected = load_file(str(tmp_path / "ref" / "adapter_model.safetensors"))["prompt_embeddings"]
    torch.testing.assert_close(final, expected, rtol=1e-5, atol=1e-6)
