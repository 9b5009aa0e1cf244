"""The training loop: only the soft prompt learns; the base model stays frozen.

Read top to bottom: set up (model, data, prompt, optimizer), measure the baseline,
loop over steps (forward, backward, clip, step, log, validate, checkpoint), then save
the best prompt as a PEFT-compatible artifact with its metrics and loss curve.
"""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import broadcast_object_list
from tqdm.auto import tqdm
from transformers import get_linear_schedule_with_warmup

import softprompt
from softprompt.artifacts import META, save_prompt
from softprompt.checkpoint import FOLDER as CKPT_FOLDER
from softprompt.checkpoint import load_latest_checkpoint, save_checkpoint
from softprompt.config import TrainConfig, parse_choices
from softprompt.data import (
    Example,
    Row,
    batch_order,
    collate,
    load_examples,
    split_validation,
    tokenize,
)
from softprompt.errors import ConfigError, TrainingError
from softprompt.loading import LoadedModel, load_model, say
from softprompt.measure.evaluate import check_choice_targets, choice_first_ids, evaluate_loss
from softprompt.prompt import IGNORE_INDEX, SoftPrompt, init_prompt, lm_loss, uses_shared_prefix
from softprompt.report import MetricsLog, plot_metrics

# Settings that may change between a run and its --resume (the rest must match).
RESUMABLE = {"epochs", "max_steps", "eval_every", "save_every", "patience", "resume", "overwrite"}


@dataclass
class RunState:
    """Counters that a checkpoint must restore to continue exactly where a run stopped."""

    epoch: int = 0
    group: int = 0  # next optimizer-step group within the epoch
    step: int = 0
    best_loss: float = math.inf
    best_step: int = 0
    bad_evals: int = 0
    stop_reason: str = ""
    extra: dict = field(default_factory=dict)


@dataclass
class TrainResult:
    output: Path
    prompt: SoftPrompt
    summary: dict


def train(
    cfg: TrainConfig, loaded: LoadedModel | None = None, progress: bool = True
) -> TrainResult:
    """Train a soft prompt as ``cfg`` says and save it to ``cfg.output``."""
    # One process, or one of many under `accelerate launch` / torchrun. Without a GPU,
    # accelerate uses gloo across CPU processes only when told cpu=True.
    accelerator = Accelerator(cpu=not torch.cuda.is_available())
    train_ex, val_ex = _load_examples(cfg)  # bad data fails before anything slow or written
    output = _prepare_output(cfg, accelerator)
    torch.manual_seed(cfg.seed)
    loaded = loaded or load_model(cfg.model)
    model, tokenizer = loaded.model, loaded.tokenizer
    model.to(accelerator.device)
    train_rows, val_rows, data_info = _tokenize(cfg, train_ex, val_ex, tokenizer)
    pad_id = tokenizer.pad_token_id
    choice_ids = _choice_ids(
        cfg, tokenizer, train_rows + val_rows, train_ex + val_ex, accelerator.device
    )

    # The prompt, its optimizer and the schedule.
    prompt = init_prompt(model, tokenizer, cfg.prompt, seed=cfg.seed)
    initial = prompt.embedding.detach().clone()
    batches_per_epoch = math.ceil(len(train_rows) / cfg.batch_size)
    steps_per_epoch = math.ceil(batches_per_epoch / cfg.grad_accum)
    total_steps = cfg.max_steps or cfg.epochs * steps_per_epoch
    n_epochs = math.ceil(total_steps / steps_per_epoch)
    optimizer = torch.optim.AdamW([prompt.embedding], lr=cfg.lr, weight_decay=cfg.weight_decay)
    scheduler = get_linear_schedule_with_warmup(
        optimizer, int(cfg.warmup_ratio * total_steps), total_steps
    )
    # Not wrapped in DDP: the gradient is all-reduced by hand in _forward_backward, which
    # keeps one code path (and the shared prefix) for one process or many.
    core = prompt.to(accelerator.device)

    state, best = RunState(), core.embedding.detach().clone()
    log = MetricsLog(output / "metrics.jsonl", enabled=accelerator.is_main_process)
    if cfg.resume:
        state, best, initial = _restore(output, cfg, core, optimizer, scheduler, log)
    else:
        log.write(kind="config", config=dataclasses.asdict(cfg), data=data_info)

    def validate() -> float | None:
        if not val_rows:
            return None
        result = evaluate_loss(model, core, val_rows, cfg.batch_size, pad_id, choice_ids)
        log.write(kind="val", step=state.step, epoch=state.epoch, **result)
        return result["loss"]

    if state.step == 0 and val_rows:  # the before: base model alone, and the initial prompt
        base = evaluate_loss(model, None, val_rows, cfg.batch_size, pad_id, choice_ids)
        log.write(kind="base", step=0, **base)
        state.extra["base_val_loss"] = base["loss"]
        state.extra["initial_val_loss"] = validate()
        say(
            f"validation loss before training: base model {base['loss']:.4f}, "
            f"with the initial prompt {state.extra['initial_val_loss']:.4f}"
        )

    def checkpoint() -> None:
        if accelerator.is_main_process:
            _save_checkpoint(output, cfg, state, core, best, initial, optimizer, scheduler)

    def after_validation(loss: float | None) -> None:
        if loss is None:
            return
        if loss < state.best_loss - 1e-6:
            state.best_loss, state.best_step, state.bad_evals = loss, state.step, 0
            best.copy_(core.embedding.detach())
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
            loss_sum, n_tok, processed = _forward_backward(
                accelerator, model, core, group, pad_id, choice_ids
            )
            tokens_seen += processed
            if not math.isfinite(loss_sum):
                optimizer.zero_grad()
                _stop_non_finite(cfg, output, state, core, best, loaded, data_info, log)
            grad_norm = _clip(accelerator, core, cfg.max_grad_norm)
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
                loss = validate()
                after_validation(loss)
                if loss is not None:
                    bar.set_postfix(loss=f"{step_loss:.4f}", val=f"{loss:.4f}")
            checkpoint()
    last_val = max((r["step"] for r in log.records if r.get("kind") == "val"), default=-1)
    if val_rows and 0 < state.step != last_val:  # e.g. --max-steps inside the first epoch
        after_validation(validate())
    bar.close()
    elapsed = time.perf_counter() - started

    final = best if val_rows else core.embedding.detach()
    core.embedding.data.copy_(final)
    summary = _summary(state, log, elapsed, tokens_seen)
    if accelerator.is_main_process:
        _save_artifact(output, cfg, core, initial, loaded, data_info, summary)
        plot_metrics(output / "metrics.jsonl", output / "loss.png")
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        say(_closing_line(summary, output))
    return TrainResult(output=output, prompt=core, summary=summary)


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
    examples = load_examples(d.data, d)
    if d.validation:
        return examples, load_examples(d.validation, d)
    return split_validation(examples, d.val_fraction, cfg.seed)


def _tokenize(
    cfg: TrainConfig, train_ex: list[Example], val_ex: list[Example], tokenizer
) -> tuple[list[Row], list[Row], dict]:
    d = cfg.data
    max_text = d.max_length - cfg.prompt.num_virtual_tokens
    train_rows = tokenize(train_ex, tokenizer, max_text, d.target_delimiter)
    val_rows = tokenize(val_ex, tokenizer, max_text, d.target_delimiter)
    if not any(_label_count([r]) for r in train_rows):
        raise ConfigError(f"{d.data}: no row has a target token to learn; check the fields")
    mode = "text" if train_ex[0].target is None else "pairs"
    info = {
        **dataclasses.asdict(d),
        "mode": mode,
        "train_examples": len(train_rows),
        "val_examples": len(val_rows),
    }
    say(f"data: {len(train_rows)} training and {len(val_rows)} validation examples ({mode})")
    return train_rows, val_rows, info


def _label_count(rows: list[Row], first_only: bool = False) -> int:
    # Labels at position 0 are never predicted (nothing comes before them but the prompt's
    # last virtual token, which does predict them), so every label counts.
    if first_only:  # classification mode: one answer position per row
        return len(rows)
    return sum(sum(1 for x in r.labels if x != IGNORE_INDEX) for r in rows)


def _forward_backward(
    accelerator: Accelerator,
    model,
    prompt: SoftPrompt,
    group: list[list[Row]],
    pad_id: int,
    choice_ids: torch.Tensor | None = None,
) -> tuple[float, int, int]:
    """Forward and backward for one optimizer step over ``group`` (its micro-batches).

    Each of the P processes takes rows rank, rank+P, ... of every micro-batch; the loss is
    divided by the label tokens of *all* rows, and the gradients are summed across
    processes, so P processes make the same step as one. Returns (summed loss, label
    tokens, positions the body ran), each over all processes.
    """
    rank, world = accelerator.process_index, accelerator.num_processes
    # the whole step's denominator (classification mode: one position per row)
    n_tok = sum(_label_count(rows, choice_ids is not None) for rows in group)
    loss_sum = torch.zeros((), device=accelerator.device)
    processed = torch.zeros((), dtype=torch.long, device=accelerator.device)
    for rows in group:
        mine = rows[rank::world]
        if not mine:
            continue
        batch = {k: v.to(accelerator.device) for k, v in collate(mine, pad_id).items()}
        loss, _ = lm_loss(model, prompt, batch, choice_ids=choice_ids)
        accelerator.backward(loss / n_tok)  # mean over the whole step's label tokens
        loss_sum += loss.detach()
        processed += _processed_tokens(model, batch, prompt.num_virtual_tokens)
    if world > 1:
        if prompt.embedding.grad is None:  # no rows here this step: contribute zeros
            prompt.embedding.grad = torch.zeros_like(prompt.embedding)
        prompt.embedding.grad = accelerator.reduce(prompt.embedding.grad, "sum")
        loss_sum, processed = (
            accelerator.reduce(loss_sum, "sum"),
            accelerator.reduce(processed, "sum"),
        )
    return float(loss_sum), n_tok, int(processed)


def _processed_tokens(model, batch: dict, n_virtual: int) -> int:
    """Positions the model body ran: padded text, plus the virtual tokens (once per batch
    when they are shared, else once per row)."""
    rows, width = batch["input_ids"].shape
    return rows * width + (n_virtual if uses_shared_prefix(model) else rows * n_virtual)


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


def _clip(accelerator: Accelerator, prompt: SoftPrompt, max_norm: float | None) -> float:
    if max_norm:
        return float(torch.nn.utils.clip_grad_norm_(prompt.parameters(), max_norm))
    return float(prompt.embedding.grad.norm()) if prompt.embedding.grad is not None else 0.0


# --- checkpoints ----------------------------------------------------------------------


def _save_checkpoint(output, cfg, state, prompt, best, initial, optimizer, scheduler) -> None:
    opt_state = optimizer.state_dict()
    tensors = {
        "prompt": prompt.embedding,
        "best": best,
        "initial": initial,
        "rng": torch.get_rng_state(),
    }
    moments = opt_state["state"].get(0, {})
    tensors.update({f"optim.{k}": torch.as_tensor(v) for k, v in moments.items()})
    record = {
        "run": dataclasses.asdict(state),
        "config": dataclasses.asdict(cfg),
        "param_groups": opt_state["param_groups"],
        "scheduler": scheduler.state_dict(),
    }
    save_checkpoint(output, state.step, record, tensors)


def _restore(output, cfg, prompt, optimizer, scheduler, log) -> tuple:
    found = load_latest_checkpoint(output)
    if found is None:
        raise ConfigError(f"--resume: no usable checkpoint in {output / CKPT_FOLDER}")
    record, tensors, folder = found
    _check_same_run(record["config"], dataclasses.asdict(cfg))
    state = RunState(**record["run"])
    prompt.embedding.data.copy_(tensors["prompt"])
    moments = {k.split(".", 1)[1]: v for k, v in tensors.items() if k.startswith("optim.")}
    optimizer.load_state_dict(
        {"state": {0: moments} if moments else {}, "param_groups": record["param_groups"]}
    )
    scheduler.load_state_dict(record["scheduler"])
    torch.set_rng_state(tensors["rng"])
    log.truncate_after(state.step)
    say(f"resuming from {folder.name}: epoch {state.epoch + 1}, step {state.step}")
    return state, tensors["best"].clone(), tensors["initial"].clone()


def _check_same_run(saved: dict, now: dict, prefix: str = "") -> None:
    diffs = _differences(saved, now)
    if diffs:
        raise ConfigError(
            "--resume needs the same settings as the interrupted run; these differ: "
            + ", ".join(f"{k} (was {a!r}, now {b!r})" for k, a, b in diffs)
        )


def _differences(saved: dict, now: dict, prefix: str = "") -> list[tuple[str, object, object]]:
    out = []
    for key, value in now.items():
        if key in RESUMABLE:
            continue
        old = saved.get(key)
        if isinstance(value, dict) and isinstance(old, dict):
            out += _differences(old, value, prefix + key + ".")
        elif old != value:
            out.append((prefix + key, old, value))
    return out


# --- the end ---------------------------------------------------------------------------


def _stop_non_finite(cfg, output, state, prompt, best, loaded, data_info, log) -> None:
    """Keep the last good prompt and stop with a message that says what to change."""
    good = best if state.best_step else prompt.embedding.detach()
    prompt.embedding.data.copy_(good)
    summary = _summary(state, log, 0.0, 0)
    summary["stopped"] = f"non-finite loss at step {state.step + 1}"
    _save_artifact(output, cfg, prompt, prompt.embedding.detach(), loaded, data_info, summary)
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


def _save_artifact(output, cfg, prompt, initial, loaded, data_info, summary) -> None:
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
    save_prompt(output, prompt, loaded.model, loaded.name, meta, initial=initial)


def _closing_line(summary: dict, output: Path) -> str:
    parts = [f"done: {summary['steps']} steps in {summary['train_seconds']:.0f}s"]
    if summary["best_val_loss"] is not None:
        parts.append(
            f"validation loss {summary['base_val_loss']:.4f} (base model) -> "
            f"{summary['best_val_loss']:.4f} (tuned)"
        )
    parts.append(f"saved to {output}")
    return "; ".join(parts)


def load_metrics(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
