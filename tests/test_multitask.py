"""Multi-task training: one prompt per task on one frozen model, tasks mixed in batches."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import REVIEWS, interrupted_at, train_config
from safetensors.torch import load_file

from softprompt.artifacts import load_prompt
from softprompt.config import TrainConfig
from softprompt.errors import ConfigError, DataError
from softprompt.loading import load_model
from softprompt.loss import lm_loss
from softprompt.prompt import PromptSet, SoftPrompt
from softprompt.rows import Row, collate, tokenize
from softprompt.training import train
from softprompt.training.parallel import forward_backward

FLIP = {"positive": "negative", "negative": "positive"}


@pytest.fixture
def tasks_file(tmp_path):
    """Two tasks on the same reviews: the label, and its opposite. No single prompt can do
    both; each task needs its own."""
    path = tmp_path / "tasks.jsonl"
    records = [{"task": "sentiment", "review": r, "label": y} for r, y in REVIEWS]
    records += [{"task": "flipped", "review": r, "label": FLIP[y]} for r, y in REVIEWS]
    path.write_text("".join(json.dumps(x) + "\n" for x in records))
    return path


def _cfg(model_dir, data, out, **kw) -> TrainConfig:
    kw.setdefault("task_field", "task")
    kw.setdefault("batch_size", 4)
    return train_config(model_dir, data, out, **kw)


def _rows(tok, n_tasks: int) -> list[Row]:
    from softprompt.data import Example

    exs = [Example(f"review : {r} sentiment :", y, "t") for r, y in REVIEWS[:6]]
    rows = tokenize(exs, tok, 64)
    for i, row in enumerate(rows):
        row.task = i % n_tasks
    return rows


@pytest.mark.parametrize("kind", ["llama", "gemma3", "gpt2"])
@pytest.mark.parametrize("fast", [True, False])
def test_mixed_batch_equals_each_task_alone(model_dirs, kind, fast):
    """A batch mixing three tasks gives the loss and per-prompt gradients of each task's rows
    run alone with its own prompt, on the shared-prefix path and on the plain one."""
    loaded = load_model(model=str(model_dirs[kind]))
    model, tok = loaded.model, loaded.tokenizer
    gen = torch.Generator().manual_seed(0)
    prompts = PromptSet(
        ["a", "b", "c"], [SoftPrompt(torch.randn(5, 16, generator=gen)) for _ in range(3)]
    )
    rows = _rows(tok, 3)
    mixed, _ = lm_loss(model, prompts, collate(rows, tok.pad_token_id), fast, fast)
    mixed.backward()
    mixed_grads = [p.embedding.grad.clone() for p in prompts.prompts]
    alone = []
    for i, p in enumerate(prompts.prompts):
        single = SoftPrompt(p.embedding.detach())
        mine = [r for r in rows if r.task == i]
        loss, _ = lm_loss(model, single, collate(mine, tok.pad_token_id), fast, fast)
        loss.backward()
        alone.append(loss.detach())
        torch.testing.assert_close(mixed_grads[i], single.embedding.grad, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(mixed.detach(), torch.stack(alone).sum(), rtol=1e-4, atol=1e-5)


def test_task_absent_from_a_step_is_not_touched(tiny_dir):
    """A task with no row in a step gets no gradient, so AdamW moves neither its prompt nor
    its moments (a dense (K, N, H) parameter would keep drifting on momentum)."""
    loaded = load_model(model=str(tiny_dir))
    gen = torch.Generator().manual_seed(0)
    prompts = PromptSet(["a", "b"], [SoftPrompt(torch.randn(4, 16, generator=gen)) for _ in "ab"])
    rows = [r for r in _rows(loaded.tokenizer, 2) if r.task == 0]
    optimizer = torch.optim.AdamW(prompts.parameters(), lr=0.1)
    before = prompts.stacked().clone()
    from accelerate import Accelerator

    loss, n_tok, _ = forward_backward(
        Accelerator(cpu=True),
        loaded.kind,
        loaded.model,
        prompts,
        [rows],
        loaded.tokenizer.pad_token_id,
    )
    assert n_tok > 0 and loss > 0
    assert prompts.prompts[0].embedding.grad is not None
    assert prompts.prompts[1].embedding.grad is None
    optimizer.step()
    after = prompts.stacked()
    assert not torch.equal(after[0], before[0])
    torch.testing.assert_close(after[1], before[1], rtol=0, atol=0)
    assert len(optimizer.state_dict()["state"]) == 1  # moments for task a only


def test_multitask_run_saves_a_prompt_per_task(tiny_dir, tasks_file, tmp_path):
    """One run, two tasks: OUTPUT/<task>/ is a complete prompt folder per task, tasks.json
    indexes them, metrics.jsonl logs each task's validation, each prompt learns its task."""
    out = tmp_path / "run"
    result = train(_cfg(tiny_dir, tasks_file, out, epochs=6), progress=False)
    assert sorted(result.prompts) == ["flipped", "sentiment"]
    index = json.loads((out / "tasks.json").read_text())["tasks"]
    assert sorted(index) == ["flipped", "sentiment"]
    model = load_model(model=str(tiny_dir)).model
    for task, info in index.items():
        folder = out / info["folder"]
        assert {"adapter_config.json", "adapter_model.safetensors", "softprompt.json"} <= {
            p.name for p in folder.iterdir()
        }
        meta = json.loads((folder / "softprompt.json").read_text())
        assert meta["task"] == task and meta["metrics"]["task"]["train_examples"] == 9
        assert info["val_examples"] == 3  # the validation split is taken per task
        assert info["best_val_loss"] < info["initial_val_loss"]
        prompt, _ = load_prompt(folder, model)
        torch.testing.assert_close(prompt.embedding, result.prompts[task].embedding.detach())
    a = load_file(str(out / "sentiment" / "adapter_model.safetensors"))["prompt_embeddings"]
    b = load_file(str(out / "flipped" / "adapter_model.safetensors"))["prompt_embeddings"]
    assert not torch.allclose(a, b)  # same start, different tasks, different prompts
    records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    task_vals = [r for r in records if r["kind"] == "task_val"]
    assert {r["task"] for r in task_vals} == {"flipped", "sentiment"}
    assert sum(r["kind"] == "val" for r in records) == len(task_vals) // 2
    assert (out / "loss.png").is_file() and not (out / "adapter_model.safetensors").exists()
    # `softprompt serve --prompts OUTPUT` serves every task under its name
    from softprompt.serving.registry import PromptStore, base_model_of

    assert base_model_of(out) == str(tiny_dir)
    store = PromptStore(out, load_model(model=str(tiny_dir)))
    assert store.rescan()["added"] == ["flipped", "sentiment"]


def test_multitask_resume_equals_uninterrupted(tiny_dir, tasks_file, tmp_path):
    """Interrupted mid-epoch and resumed, every task's prompt equals an uninterrupted run's."""
    train(_cfg(tiny_dir, tasks_file, tmp_path / "ref", epochs=2), progress=False)
    with interrupted_at(7):  # in epoch 2 (5 batches per epoch), after the step-6 checkpoint
        train(_cfg(tiny_dir, tasks_file, tmp_path / "cut", epochs=2, save_every=3), progress=False)
    train(
        _cfg(tiny_dir, tasks_file, tmp_path / "cut", epochs=2, save_every=3, resume=True),
        progress=False,
    )
    for task in ("sentiment", "flipped"):
        name = f"{task}/adapter_model.safetensors"
        a = load_file(str(tmp_path / "cut" / name))["prompt_embeddings"]
        b = load_file(str(tmp_path / "ref" / name))["prompt_embeddings"]
        torch.testing.assert_close(a, b)


def test_bad_task_name_names_file_and_line(tiny_dir, tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text(
        json.dumps({"task": "ok", "review": "great", "label": "positive"})
        + "\n"
        + json.dumps({"task": "../up", "review": "awful", "label": "negative"})
        + "\n"
    )
    with pytest.raises(DataError, match=r"bad.jsonl:2: task name '../up' cannot name a folder"):
        train(_cfg(tiny_dir, path, tmp_path / "run"), progress=False)
    with pytest.raises(DataError, match=r"no field 'topic'.*--task-field"):
        train(_cfg(tiny_dir, path, tmp_path / "run", task_field="topic"), progress=False)


def test_validation_task_must_be_trained(tiny_dir, tasks_file, tmp_path):
    val = tmp_path / "val.jsonl"
    val.write_text(json.dumps({"task": "other", "review": "great", "label": "positive"}) + "\n")
    cfg = _cfg(tiny_dir, tasks_file, tmp_path / "run")
    cfg.data.validation = str(val)
    with pytest.raises(ConfigError, match="task 'other' has no training examples"):
        train(cfg, progress=False)
