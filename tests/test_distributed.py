"""Data-parallel training: 2 processes (gloo on CPU) make the same steps as one process
with the same global batch (the same losses and prompt); with --shard-model each process
builds the model empty and reads only its rows of each layer (softprompt.shards)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file


def _train_args(model_dir: Path, data: Path, out: Path, **flags) -> list[str]:
    """`softprompt train` arguments for the tiny model; ``flags`` override the defaults
    (a value of None drops the flag). float32: one process and two must give the same
    numbers, on a host with native bf16 too."""
    flags = {
        "dtype": "float32",
        "input_field": "review",
        "target_field": "label",
        "num_virtual_tokens": 4,
        "batch_size": 6,
        "epochs": 3,
        "lr": 0.3,
        "val_fraction": 0.25,
        **flags,
    }
    args = ["train", "--model", str(model_dir), "--data", str(data)]
    for name, value in flags.items():
        if value is not None:
            args += [f"--{name.replace('_', '-')}", str(value)]
    return args + ["--output", str(out)]


def _env() -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.pop("WORLD_SIZE", None)
    return env


def _tasks_file(path: Path, reviews: Path) -> Path:
    """The reviews as two tasks: the label, and the label of the next review."""
    records = [json.loads(x) for x in reviews.read_text().splitlines()]
    shifted = [
        {**r, "task": "b", "label": records[(i + 1) % len(records)]["label"]}
        for i, r in enumerate(records)
    ]
    path.write_text(
        "".join(json.dumps(r) + "\n" for r in [{**r, "task": "a"} for r in records] + shifted)
    )
    return path


def _prompts(out: Path, tasks: bool) -> dict[str, torch.Tensor]:
    folders = {"a": out / "a", "b": out / "b"} if tasks else {"": out}
    return {
        name: load_file(str(f / "adapter_model.safetensors"))["prompt_embeddings"]
        for name, f in folders.items()
    }


CASES = {
    # data parallelism: 6 rows per batch split 3 + 3
    "data-parallel": [],
    # FSDP2 layers: 9 rows in batches of 4 leave one process without a row in the last
    # batch (it still runs the forward, for the collective weight gathers)
    "sharded": ["--shard-model", "--batch-size", "4"],
    # two tasks' prompts, mixed batches, a task's gradient summed only where it has rows
    "multi-task": ["--task-field", "task"],
    # both, launched by accelerate with the shipped config file
    "accelerate-config": ["--task-field", "task", "--shard-model"],
}
CONFIG = Path(__file__).resolve().parents[1] / "examples" / "launch" / "cpu-2proc.yaml"


@pytest.mark.skipif(
    shutil.which("torchrun", path=str(Path(sys.executable).parent)) is None
    and shutil.which("torchrun") is None,
    reason="torchrun not installed",
)
@pytest.mark.parametrize("case", list(CASES))
def test_two_processes_equal_one(tiny_dir, pairs_file, tmp_path, case):
    torchrun = Path(sys.executable).parent / "torchrun"
    tasks = "--task-field" in CASES[case]
    data = _tasks_file(tmp_path / "tasks.jsonl", pairs_file) if tasks else pairs_file
    extra = CASES[case]
    one_extra = [x for x in extra if x != "--shard-model"]  # one process: nothing to shard
    one = subprocess.run(
        [
            sys.executable,
            "-m",
            "softprompt",
            *_train_args(tiny_dir, data, tmp_path / "one"),
            *one_extra,
        ],
        env=_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert one.returncode == 0, one.stderr[-2000:]
    port = str(29517 + list(CASES).index(case))
    if case == "accelerate-config":
        launcher = [
            str(Path(sys.executable).parent / "accelerate"),
            "launch",
            "--config_file",
            str(CONFIG),
            "--main_process_port",
            port,
        ]
    else:
        launcher = [str(torchrun), "--nproc_per_node", "2", "--master_port", port]
    two = subprocess.run(
        [*launcher, "-m", "softprompt", *_train_args(tiny_dir, data, tmp_path / "two"), *extra],
        env=_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert two.returncode == 0, two.stderr[-3000:]
    a, b = _prompts(tmp_path / "one", tasks), _prompts(tmp_path / "two", tasks)
    initial = _initial(tmp_path / "one", tasks)
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=1e-4, atol=1e-5)
        assert not torch.equal(a[name], initial[name])
    # Only rank 0 writes: one metrics file with one line per step, one closing message.
    lines = (tmp_path / "two" / "metrics.jsonl").read_text().splitlines()
    ref = (tmp_path / "one" / "metrics.jsonl").read_text().splitlines()
    steps = sum('"kind": "train"' in x for x in ref)
    assert steps == {"data-parallel": 6, "sharded": 9}.get(case, 9)
    assert sum('"kind": "train"' in x for x in lines) == steps
    assert two.stderr.count("[softprompt] done:") == 1
    losses = [
        [json.loads(x)["loss"] for x in run if '"kind": "train"' in x] for run in (ref, lines)
    ]
    torch.testing.assert_close(losses[1], losses[0], rtol=1e-5, atol=1e-6)
    if "--shard-model" in extra:
        assert "sharded 2 decoder layers across 2 processes (FSDP2)" in two.stderr
        # the first process read its half of every layer from the file, never the whole model
        assert "--shard-model: this process read 50% of the decoder layers'" in two.stderr


def _initial(out: Path, tasks: bool) -> dict[str, torch.Tensor]:
    folders = {"a": out / "a", "b": out / "b"} if tasks else {"": out}
    return {
        name: load_file(str(f / "initial_prompt.safetensors"))["prompt_embeddings"]
        for name, f in folders.items()
    }


def test_shard_model_needs_several_processes(tiny_dir, pairs_file, tmp_path):
    from softprompt.cli import main

    args = _train_args(tiny_dir, pairs_file, tmp_path / "run") + ["--shard-model"]
    assert main(args) == 2
    assert not (tmp_path / "run").exists()  # refused before anything was written


def test_sigkill_then_resume_ends_with_the_same_prompt(tiny_dir, pairs_file, tmp_path):
    """Kill -9 a training process after a few checkpoints, resume it with --resume, and
    end with the prompt of a run that was never interrupted."""
    import signal
    import time

    def args(out: Path) -> list[str]:
        flags = dict(batch_size=3, epochs=60, save_every=5, lr=0.1, val_fraction=None)
        return [
            sys.executable,
            "-m",
            "softprompt",
            *_train_args(tiny_dir, pairs_file, out, **flags),
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


def test_sharded_layers_are_gathered_only_while_they_run(tiny_dir, tmp_path, monkeypatch):
    """Each decoder layer is its own FSDP root; FSDP keeps a root's gathered weights after
    forward unless told, which would leave every process holding every layer whole after
    the first step. After a forward (and a backward) each layer holds its shard again."""
    from types import SimpleNamespace

    import torch.distributed as dist
    from torch.distributed.tensor import DTensor

    from softprompt.loading import decoder_layers, load_model
    from softprompt.training import parallel
    from softprompt.training.parallel import shard_layers

    told = []  # glibc's setting is the process's: asked for here, tested in its own process
    monkeypatch.setattr(parallel, "return_freed_memory", lambda: told.append(1))

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0,
                            world_size=1)  # fmt: skip
    try:
        model = load_model(model=str(tiny_dir)).model
        shard_layers(model, SimpleNamespace(num_processes=1, device=torch.device("cpu")))
        embeds = model.get_input_embeddings()(torch.tensor([[1, 2, 3]])).requires_grad_(True)
        model.model(inputs_embeds=embeds).last_hidden_state.sum().backward()
        layers = decoder_layers(model)
        assert all(isinstance(p, DTensor) for layer in layers for p in layer.parameters())
        with torch.no_grad():
            model.model(inputs_embeds=embeds)
        assert all(isinstance(p, DTensor) for layer in layers for p in layer.parameters())
        assert embeds.grad is not None and embeds.grad.abs().sum() > 0
        assert told == [1]  # on a CPU, freed layer buffers go back to the system
    finally:
        dist.destroy_process_group()


def test_freed_memory_goes_back_to_the_system_on_glibc():
    code = ("import platform; from softprompt.training.parallel import return_freed_memory; "
            "print(return_freed_memory(), platform.libc_ver()[0])")  # fmt: skip
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env=_env(), timeout=120, check=True).stdout.split()  # fmt: skip
    assert out[0] == ("True" if out[1:] == ["glibc"] else "False")
