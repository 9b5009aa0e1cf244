"""The training loop: only the soft prompt learns; the base model stays frozen.

Read top to bottom: set up (model, data, prompt, optimizer), measure the baseline,
loop over steps (forward, backward, clip, step, log, validate, checkpoint), then save
the best prompt as a PEFT-compatible artifact with its metrics and loss curve.

With ``--task-field`` one run trains one prompt per task: the tasks' rows are mixed in
batches (each row meets its own task's prompt), each task keeps its own best prompt, and
each is saved in ``OUTPUT/<task>/``. A single task is the one-prompt case of the same loop.
"""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import psutil
import torch
from accelerate import Accelerator
from accelerate.utils import broadcast_object_list
from tqdm.auto import tqdm
from transformers import get_linear_schedule_with_warmup

import softprompt
from softprompt.artifacts import META, save_prompt, write_json
from softprompt.checkpoint import FOLDER as CKPT_FOLDER
from softprompt.checkpoint import RunState, restore_run, save_run
from softprompt.config import TrainConfig, parse_choices
from softprompt.data import (
    Example,
    Row,
    batch_order,
    load_examples,
    split_validation,
    tokenize,
)
from softprompt.errors import ConfigError, TrainingError
from softprompt.loading import LoadedModel, load_model, say
from softprompt.measure.evaluate import check_choice_targets, choice_first_ids, evaluate_loss
from softprompt.parallel import forward_backward, label_count, shard_layers
from softprompt.prompt import PromptSet, SoftPrompt, init_prompt
from softprompt.report import MetricsLog, plot_metrics


@dataclass
class TrainResult:
    output: Path
    prompt: SoftPrompt  # the trained prompt (a multi-task run: its first task's)
    summary: dict
    prompts: dict[str, SoftPrompt] = field(default_factory=dict)  # multi-task: task -> prompt


def train(
    cfg: TrainConfig, loaded: LoadedModel | None = None, progress: bool = True
) -> TrainResult:
    """Train a soft prompt as ``cfg`` says and save it to ``cfg.output``."""
    # One process, or one of many under `accelerate launch` / torchrun. Without a GPU,
    # accelerate uses gloo across CPU processes only when told cpu=True.
    accelerator = Accelerator(cpu=not torch.cuda.is_available())
    if cfg.shard_model and accelerator.num_processes == 1:
        raise ConfigError(
            "--shard-model splits the model across processes: launch with torchrun or "
            "accelerate launch and 2 or more processes (README, 'Scaling out')"
        )
    train_ex, val_ex = _load_examples(cfg)  # bad data fails before anything slow or written
    output = _prepare_output(cfg, accelerator)
    torch.manual_seed(cfg.seed)
    loaded = loaded or load_model(cfg.model)
    model, tokenizer = loaded.model, loaded.tokenizer
    model.to(accelerator.device)
    if cfg.shard_model:
        shard_layers(model, accelerator)
    tasks = sorted({ex.task for ex in train_ex}) if cfg.task_field else []
    train_rows, val_rows, data_info = _tokenize(cfg, train_ex, val_ex, tokenizer, tasks)
    pad_id = tokenizer.pad_token_id
    choice_ids = _choice_ids(
        cfg, tokenizer, train_rows + val_rows, train_ex + val_ex, accelerator.device
    )
    # validation rows per task (a single task: all of them)
    val_by_task = [[r for r in val_rows if r.task == i] for i in range(max(len(tasks), 1))]

    # The prompts (one, or one per task), the optimizer and the schedule.
    first = init_prompt(model, tokenizer, cfg.prompt, seed=cfg.seed)
    core = PromptSet(
        tasks or [""], [SoftPrompt(first.embedding) for _ in range(max(len(tasks), 1))]
    ).to(accelerator.device)
    initial = core.stacked().clone()  # (K, N, H)
    batches_per_epoch = math.ceil(len(train_rows) / cfg.batch_size)
    steps_per_epoch = math.ceil(batches_per_epoch / cfg.grad_accum)
    total_steps = cfg.max_steps or cfg.epochs * steps_per_epoch
    n_epochs = math.ceil(total_steps / steps_per_epoch)
    # One parameter per task: a task absent from a step has no gradient and AdamW skips it.
    optimizer = torch.optim.AdamW(core.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    scheduler = get_linear_schedule_with_warmup(
        optimizer, int(cfg.warmup_ratio * total_steps), total_steps
    )
    # Not wrapped in DDP: the gradient is all-reduced by hand in forward_backward, which
    # keeps one code path (and the shared prefix) for one process or many.

    state, best = RunState(), core.stacked().clone()
    log = MetricsLog(output / "metrics.jsonl", enabled=accelerator.is_main_process)
    if cfg.resume:
        state, best, initial = restore_run(output, cfg, core, optimizer, scheduler, log)
    else:
        log.write(kind="config", config=dataclasses.asdict(cfg), data=data_info)
        state.extra["task_best"] = [[None, 0] for _ in core.names]  # per task: [loss, step]

    def measure(prompts: PromptSet | None, kind: str) -> tuple[float, list] | None:
        """Validation loss of every task, logged: (pooled over tasks, per task)."""
        if not val_rows:
            return None
        per_task, total, count = [], 0.0, 0
        for i, rows in enumerate(val_by_task):
            if not rows:
                per_task.append(None)
                continue
            prompt = prompts.prompts[i] if prompts is not None else None
            result = evaluate_loss(model, prompt, rows, cfg.batch_size, pad_id, choice_ids)
            per_task.append(result["loss"])
            total, count = total + result["loss"] * result["tokens"], count + result["tokens"]
            if tasks:
                log.write(kind=f"task_{kind}", task=tasks[i], step=state.step, **result)
        pooled = total / max(count, 1)
        ppl = math.exp(min(pooled, 50.0))
        log.write(kind=kind, step=state.step, epoch=state.epoch, loss=pooled, ppl=ppl, tokens=count)
        return pooled, per_task

    def validate() -> tuple[float, list] | None:
        return measure(core, "val")

    if state.step == 0 and val_rows:  # the before: base model alone, and the initial prompt
        base, base_tasks = measure(None, "base")
        state.extra["base_val_loss"], state.extra["task_base"] = base, base_tasks
        initial_loss, initial_tasks = validate()
        state.extra["initial_val_loss"], state.extra["task_initial"] = initial_loss, initial_tasks
        say(
            f"validation loss before training: base model {base:.4f}, "
            f"with the initial prompt{'s' if tasks else ''} {initial_loss:.4f}"
        )

    def checkpoint() -> None:
        if accelerator.is_main_process:
            save_run(output, cfg, state, core, best, initial, optimizer, scheduler)

    def after_validation(result: tuple[float, list] | None) -> None:
        if result is None:
            return
        loss, per_task = result
        for i, task_loss in enumerate(per_task):  # each task keeps its own best prompt
            record = state.extra["task_best"][i]
            if task_loss is not None and (record[0] is None or task_loss < record[0] - 1e-6):
                record[:] = [task_loss, state.step]
                best[i].copy_(core.prompts[i].embedding.detach())
        if loss < state.best_loss - 1e-6:
            state.best_loss, state.best_step, state.bad_evals = loss, state.step, 0
        else:
            state.bad_evals += 1
            if cfg.patience and state.bad_evals >= cfg.patience:
                state.stop_reason = (
                    f"early stop: no better validation loss in {cfg.patience} checks"
                )

    bar = tqdm(
        total=total_steps,
        initial=state.step,
        desc="training",
        unit="step",
        disable=not (progress and accelerator.is_main_process),
        dynamic_ncols=True,
    )
    started, tokens_seen, step_loss = time.perf_counter(), 0, math.nan
    lengths = [len(r.input_ids) for r in train_rows]
    while state.epoch < n_epochs and state.step < total_steps and not state.stop_reason:
        order = batch_order(lengths, cfg.batch_size, cfg.seed, state.epoch)
        groups = [order[i : i + cfg.grad_accum] for i in range(0, len(order), cfg.grad_accum)]
        while state.group < len(groups) and state.step < total_steps and not state.stop_reason:
            group = [[train_rows[i] for i in b] for b in groups[state.group]]
            t0 = time.perf_counter()
            loss_sum, n_tok, processed = forward_backward(
                accelerator, model, core, group, pad_id, choice_ids
            )
            tokens_seen += processed
            if not math.isfinite(loss_sum):
                optimizer.zero_grad()
                _stop_non_finite(cfg, output, state, core, best, loaded, data_info, log)
            grad_norm = _clip(core, cfg.max_grad_norm)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad()
            state.step, state.group = state.step + 1, state.group + 1
            step_loss = loss_sum / max(n_tok, 1)
            if "first_step_s" not in state.extra:  # cold start: command -> first step done
                state.extra["first_step_s"] = round(time.time() - softprompt.STARTED, 2)
            log.write(
                kind="train",
                step=state.step,
                epoch=state.epoch,
                loss=step_loss,
                lr=scheduler.get_last_lr()[0],
                grad_norm=grad_norm,
                step_s=time.perf_counter() - t0,
                rss_mb=round(psutil.Process().memory_info().rss / 2**20, 1),
            )
            bar.update(1)
            bar.set_postfix(loss=f"{step_loss:.4f}", epoch=state.epoch + 1)
            if cfg.eval_every and state.step % cfg.eval_every == 0:
                after_validation(validate())
            if cfg.save_every and state.step % cfg.save_every == 0:
                checkpoint()
        if state.group >= len(groups):  # the epoch is complete
            state.epoch, state.group = state.epoch + 1, 0
            if not (cfg.eval_every and state.step % cfg.eval_every == 0):
                result = validate()
                after_validation(result)
                if result is not None:
                    bar.set_postfix(loss=f"{step_loss:.4f}", val=f"{result[0]:.4f}")
            checkpoint()
    last_val = max((r["step"] for r in log.records if r.get("kind") == "val"), default=-1)
    if val_rows and 0 < state.step != last_val:  # e.g. --max-steps inside the first epoch
        after_validation(validate())
    bar.close()
    elapsed = time.perf_counter() - started

    for i, rows in enumerate(val_by_task):  # each task's best prompt (or last, if unvalidated)
        if rows and state.extra["task_best"][i][0] is not None:
            core.prompts[i].embedding.data.copy_(best[i])
    summary = _summary(state, log, elapsed, tokens_seen)
    if accelerator.is_main_process:
        _save_artifacts(output, cfg, core, initial, loaded, data_info, summary, state)
        plot_metrics(output / "metrics.jsonl", output / "loss.png")
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        say(_closing_line(summary, output, tasks))
    prompts = dict(zip(tasks, core.prompts)) if tasks else {}
    return TrainResult(output=output, prompt=core.prompts[0], summary=summary, prompts=prompts)


# --- set-up ---------------------------------------------------------------------------


def _prepare_output(cfg: TrainConfig, accelerator: Accelerator) -> Path:
    """The main process checks and prepares the folder; every process learns the verdict."""
    output = Path(cfg.output or time.strftime("runs/softprompt-%Y%m%d-%H%M%S"))
    verdict = [""]
    if accelerator.is_main_process:
        try:
            _check_output(cfg, output)
        except ConfigError as err:
            verdict = [str(err)]
    if accelerator.num_processes > 1:
        verdict = broadcast_object_list(verdict)
    if verdict[0]:
        raise ConfigError(verdict[0])
    return output


def _check_output(cfg: TrainConfig, output: Path) -> None:
    has_run = any((output / name).exists() for name in (META, CKPT_FOLDER, "metrics.jsonl"))
    if cfg.resume:
        if not (output / CKPT_FOLDER).is_dir():
            raise ConfigError(f"--resume: {output} has no checkpoints; run without --resume")
    elif has_run:
        if not cfg.overwrite:
            raise ConfigError(
                f"{output} already holds a run; pass --resume to continue it, --overwrite to "
                "replace it, or choose another --output"
            )
        shutil.rmtree(output)
    output.mkdir(parents=True, exist_ok=True)


def _load_examples(cfg: TrainConfig) -> tuple[list[Example], list[Example]]:
    d = cfg.data
    examples = load_examples(d.data, d, cfg.task_field)
    if d.validation:
        val = load_examples(d.validation, d, cfg.task_field)
        unknown = sorted({ex.task for ex in val} - {ex.task for ex in examples} - {None})
        if unknown:
            raise ConfigError(
                f"{d.validation}: task {unknown[0]!r} has no training examples in {d.data}"
            )
        return examples, val
    return split_validation(examples, d.val_fraction, cfg.seed)


def _tokenize(
    cfg: TrainConfig, train_ex: list[Example], val_ex: list[Example], tokenizer, tasks: list[str]
) -> tuple[list[Row], list[Row], dict]:
    d = cfg.data
    max_text = d.max_length - cfg.prompt.num_virtual_tokens
    ids = {name: i for i, name in enumerate(tasks)}
    train_rows = tokenize(train_ex, tokenizer, max_text, d.target_delimiter, ids)
    val_rows = tokenize(val_ex, tokenizer, max_text, d.target_delimiter, ids)
    if not any(label_count([r]) for r in train_rows):
        raise ConfigError(f"{d.data}: no row has a target token to learn; check the fields")
    mode = "text" if train_ex[0].target is None else "pairs"
    info = {
        **dataclasses.asdict(d),
        "mode": mode,
        "train_examples": len(train_rows),
        "val_examples": len(val_rows),
    }
    if tasks:
        info["tasks"] = {
            name: {
                "train_examples": sum(r.task == i for r in train_rows),
                "val_examples": sum(r.task == i for r in val_rows),
            }
            for name, i in ids.items()
        }
        counts = ", ".join(f"{n} {v['train_examples']}" for n, v in info["tasks"].items())
        say(f"multi-task: {len(tasks)} tasks, one prompt each, mixed in batches ({counts})")
    say(f"data: {len(train_rows)} training and {len(val_rows)} validation examples ({mode})")
    return train_rows, val_rows, info


def _choice_ids(
    cfg: TrainConfig, tokenizer, rows: list[Row], examples: list[Example], device
) -> torch.Tensor | None:
    """(C,) first-token ids of --choices for the restricted loss, or None for the full one."""
    if cfg.choices is None or cfg.choice_loss == "full":
        return None
    ids = choice_first_ids(tokenizer, parse_choices(cfg.choices), cfg.data.target_delimiter)
    check_choice_targets(rows, examples, ids)
    say(f"classification mode: loss over the first tokens of {cfg.choices} only")
    return torch.tensor(ids, device=device)


def _clip(prompts: PromptSet, max_norm: float | None) -> float:
    """Clip each task's gradient on its own (the prompts are independent); return the norm
    over all of them before clipping."""
    norms = []
    for p in prompts.parameters():
        if p.grad is not None:
            norms.append(
                torch.nn.utils.clip_grad_norm_([p], max_norm) if max_norm else p.grad.norm()
            )
    return float(torch.stack(norms).norm()) if norms else 0.0


# --- the end ---------------------------------------------------------------------------


def _stop_non_finite(cfg, output, state, prompt, best, loaded, data_info, log) -> None:
    """Keep the last good prompts and stop with a message that says what to change."""
    if state.best_step:
        prompt.load_stacked(best)
    summary = _summary(state, log, 0.0, 0)
    summary["stopped"] = f"non-finite loss at step {state.step + 1}"
    _save_artifacts(output, cfg, prompt, prompt.stacked(), loaded, data_info, summary, state)
    raise TrainingError(
        f"the loss became NaN or infinite at step {state.step + 1}; the last good prompt is "
        f"saved in {output}. Lower --lr (now {cfg.lr}) or set --max-grad-norm"
    )


def _summary(state: RunState, log: MetricsLog, elapsed: float, tokens: int) -> dict:
    train_losses = [r["loss"] for r in log.records if r.get("kind") == "train"]
    return {
        "steps": state.step,
        "epochs_completed": state.epoch,
        "base_val_loss": state.extra.get("base_val_loss"),
        "initial_val_loss": state.extra.get("initial_val_loss"),
        "best_val_loss": None if math.isinf(state.best_loss) else state.best_loss,
        "best_step": state.best_step,
        "final_train_loss": train_losses[-1] if train_losses else None,
        "train_seconds": round(elapsed, 2),
        "tokens": tokens,
        "first_step_s": state.extra.get("first_step_s"),
        "tokens_per_second": round(tokens / elapsed, 1) if elapsed > 0 else None,
        "stop_reason": state.stop_reason or "finished",
    }


def _save_artifacts(output, cfg, prompts, initial, loaded, data_info, summary, state) -> None:
    """One prompt folder: OUTPUT itself, or OUTPUT/<task>/ per task (and tasks.json)."""
    meta = {
        "template": cfg.data.template,
        "target_delimiter": cfg.data.target_delimiter,
        "data": data_info,
        "prompt": dataclasses.asdict(cfg.prompt),
        "training": {
            k: v for k, v in dataclasses.asdict(cfg).items() if k not in ("model", "data", "prompt")
        },
        "metrics": summary,
    }
    if not cfg.task_field:
        save_prompt(output, prompts.prompts[0], loaded.model, loaded.name, meta, initial[0])
        return
    index = {}
    for i, task in enumerate(prompts.names):
        best_loss, best_step = state.extra["task_best"][i]
        task_metrics = {
            "task": task,
            **data_info["tasks"][task],
            "base_val_loss": _at(state.extra.get("task_base"), i),
            "initial_val_loss": _at(state.extra.get("task_initial"), i),
            "best_val_loss": best_loss,
            "best_step": best_step,
        }
        task_meta = {**meta, "task": task, "metrics": {**summary, "task": task_metrics}}
        save_prompt(
            output / task, prompts.prompts[i], loaded.model, loaded.name, task_meta, initial[i]
        )
        index[task] = {"folder": task, **task_metrics}
    write_json(output / "tasks.json", {"tasks": index})


def _at(values: list | None, i: int):
    return values[i] if values else None


def _closing_line(summary: dict, output: Path, tasks: list[str]) -> str:
    parts = [f"done: {summary['steps']} steps in {summary['train_seconds']:.0f}s"]
    if summary["best_val_loss"] is not None:
        parts.append(
            f"validation loss {summary['base_val_loss']:.4f} (base model) -> "
            f"{summary['best_val_loss']:.4f} (tuned)"
        )
    if tasks:
        parts.append(f"{len(tasks)} prompts saved in {output}/<task>/: {', '.join(tasks)}")
    else:
        parts.append(f"saved to {output}")
    return "; ".join(parts)


def load_metrics(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
