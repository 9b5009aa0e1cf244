"""`softprompt compare`: the quality/compute trade-off table, measured on the user's data.

Zero-shot, few-shot, prompt tuning, LoRA and full fine-tuning run on the same train and
test examples; each gets quality, trainable parameters, training time, peak memory,
artifact size and inference cost per example. Everything goes to one metrics.jsonl, and
report.md / report.html are made from that file alone.
"""

from __future__ import annotations

import ctypes
import gc
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import psutil
import torch
from torch import nn

from softprompt.config import CompareConfig, EvalConfig, PromptConfig, TrainConfig
from softprompt.data import Example
from softprompt.loading import LoadedModel
from softprompt.loss import with_rest
from softprompt.measure.baselines import few_shot
from softprompt.measure.evaluate import evaluate_examples
from softprompt.measure.finetune import (
    add_lora,
    count_trainable,
    remove_lora,
    state_bytes,
    train_weights,
    trainable_copy,
)
from softprompt.outputs import record
from softprompt.prompt import SoftPrompt
from softprompt.rows import tokenize
from softprompt.scoring import check_choice_targets, choice_first_ids
from softprompt.tracking import MetricsLog
from softprompt.training import train


def release_freed() -> None:
    """Hand memory that was freed back to the system (glibc keeps it otherwise), so that the
    resident set at the start of a measurement holds only what is still in use: without it a
    method measured after another reuses the first one's pages and looks free."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to hand back this way
        pass


class PeakMemory:
    """Peak memory above the level at entry: CUDA allocations on a GPU, else the process's
    resident set, sampled every 10 ms by a thread (torch's CPU allocator has no counter),
    after ``release_freed``."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.peak_mb = 0.0

    def __enter__(self) -> PeakMemory:
        if self.cuda:
            torch.cuda.reset_peak_memory_stats()
            self._start = torch.cuda.memory_allocated()
            return self
        release_freed()
        proc = psutil.Process()
        self._start, self._peak, self._stop = proc.memory_info().rss, 0, threading.Event()

        def sample() -> None:
            while not self._stop.wait(0.01):
                self._peak = max(self._peak, proc.memory_info().rss)

        self._thread = threading.Thread(target=sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        if self.cuda:
            peak = torch.cuda.max_memory_allocated()
        else:
            self._stop.set()
            self._thread.join()
            peak = max(self._peak, psutil.Process().memory_info().rss)
        self.peak_mb = max(peak - self._start, 0) / 2**20


@dataclass
class Context:
    cfg: CompareConfig
    loaded: LoadedModel
    train: list[Example]  # what the trained methods learn from
    test: list[Example]
    output: Path
    log: MetricsLog
    choices: list[str] | None


def measure(ctx: Context, model: nn.Module, prompt: SoftPrompt | None, examples) -> dict:
    """Quality on the test examples and inference seconds per example."""
    cfg = ctx.cfg
    ecfg = EvalConfig(
        model=cfg.model,
        data=cfg.data,
        batch_size=cfg.batch_size,
        context=cfg.context,
        choices=cfg.choices,
    )
    loaded = LoadedModel(model=model, tokenizer=ctx.loaded.tokenizer, name=ctx.loaded.name)
    start = time.perf_counter()
    quality, _ = evaluate_examples(loaded, prompt, examples, ecfg, ctx.choices)
    per_example = quality.pop("seconds_per_example", None)
    if per_example is None:  # no choices: the loss pass is the inference
        per_example = (time.perf_counter() - start) / len(examples)
    return {"quality": quality, "seconds_per_example": per_example}


def _row(trainable: int, seconds: float, artifact: int, **extra) -> dict:
    return {
        "trainable_params": trainable,
        "train_seconds": seconds,
        "artifact_bytes": artifact,
        **extra,
    }


def run_zero_shot(ctx: Context) -> dict:
    return {**measure(ctx, ctx.loaded.model, None, ctx.test), **_row(0, 0.0, 0)}


def run_few_shot(ctx: Context) -> dict:
    cfg = ctx.cfg
    shown, k = few_shot(
        ctx.test,
        ctx.train,
        ctx.loaded.tokenizer,
        cfg.shots,
        cfg.context,
        cfg.data.target_delimiter,
        cfg.seed,
    )
    return {**measure(ctx, ctx.loaded.model, None, shown), **_row(0, 0.0, 0, shots=k)}


def run_prompt_tuning(ctx: Context, method: str = "prompt") -> dict:
    """softprompt's prompt (``method`` prefix: a deep prompt) at the comparison's budget."""
    name = f"{method}-tuning"
    cfg, folder = ctx.cfg, ctx.output / name
    tcfg = TrainConfig(
        method=method,
        model=cfg.model,
        data=cfg.data,
        prompt=PromptConfig(num_virtual_tokens=cfg.num_virtual_tokens),
        output=str(folder),
        max_steps=cfg.steps,
        batch_size=cfg.batch_size,
        lr=cfg.prompt_lr,
        choices=cfg.choices or "none",  # the choices every method uses, never detected here
        choice_loss=cfg.choice_loss,
        eval_every=max(1, cfg.steps // 2),  # each validation costs several steps on a CPU
        seed=cfg.seed,
        overwrite=True,
    )
    result = train(tcfg, loaded=ctx.loaded)  # its bar: steps, elapsed, estimate
    for rec in MetricsLog(folder / "metrics.jsonl").records:
        if rec.get("kind") in ("train", "val"):
            ctx.log.write(kind=rec["kind"], method=name, step=rec["step"], loss=rec["loss"])
    size = sum(
        (folder / f).stat().st_size for f in ("adapter_model.safetensors", "adapter_config.json")
    )
    trainable = result.prompt.embedding.numel()
    return {
        **measure(ctx, ctx.loaded.model, result.prompt, ctx.test),
        **_row(trainable, result.summary["train_seconds"], size),
    }


def _rows_and_choices(ctx: Context):
    tok, d = ctx.loaded.tokenizer, ctx.cfg.data
    fmt = d.prompt_format(chat=ctx.train[0].messages is not None)
    delimiter = "" if fmt.chat else d.target_delimiter  # an answer follows its turn's header
    rows = tokenize(ctx.train, tok, d.max_length, delimiter, None, fmt, d.loss_on)
    if not ctx.choices or ctx.cfg.choice_loss == "full":
        return rows, None
    ids = choice_first_ids(tok, ctx.choices, delimiter)
    check_choice_targets(rows, ctx.train, ids)
    device = ctx.loaded.model.get_input_embeddings().weight.device
    choice_ids = torch.tensor(ids, device=device)
    if ctx.cfg.choice_loss == "restricted+rest":  # as prompt tuning trains with this setting
        choice_ids = with_rest(choice_ids)
    return rows, choice_ids


def train_reference(ctx: Context, model: nn.Module, lr: float, method: str) -> float:

    rows, choice_ids = _rows_and_choices(ctx)
    cfg = ctx.cfg
    return train_weights(
        model,
        rows,
        steps=cfg.steps,
        lr=lr,
        batch_size=cfg.batch_size,
        pad_id=ctx.loaded.tokenizer.pad_token_id,
        seed=cfg.seed,
        choice_ids=choice_ids,
        log=lambda s, loss: ctx.log.write(kind="train", method=method, step=s, loss=loss),
        desc=method,
    )


def run_lora(ctx: Context) -> dict:

    peft_model = add_lora(ctx.loaded.model, ctx.cfg.seed, ctx.cfg.lora_r)
    try:
        inner = peft_model.get_base_model()  # the causal LM with the adapters injected
        seconds = train_reference(ctx, inner, ctx.cfg.lora_lr, "lora")
        quality = measure(ctx, inner, None, ctx.test)
        folder = ctx.output / "lora"
        record(folder)
        peft_model.save_pretrained(str(folder))
        size = sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())
        return {**quality, **_row(count_trainable(peft_model), seconds, size)}
    finally:
        remove_lora(peft_model)  # the frozen base serves the other methods unchanged


def run_full_ft(ctx: Context) -> dict:

    model = trainable_copy(ctx.loaded.model)
    seconds = train_reference(ctx, model, ctx.cfg.full_lr, "full-ft")
    quality = measure(ctx, model, None, ctx.test)
    # Not written to disk (a full copy of the model): its size is what saving would take.
    row = {**quality, **_row(count_trainable(model), seconds, state_bytes(model))}
    del model
    gc.collect()
    return row


RUNNERS = {
    "zero-shot": run_zero_shot,
    "few-shot": run_few_shot,
    "prompt-tuning": run_prompt_tuning,
    "prefix-tuning": lambda ctx: run_prompt_tuning(ctx, "prefix"),
    "lora": run_lora,
    "full-ft": run_full_ft,
}
