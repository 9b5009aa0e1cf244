"""The end of a run: each task's best prompt put in place and saved as a PEFT-compatible
folder with its metrics, loss curve and summary; a run that had already ended; a run
stopped by a non-finite loss."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

from softprompt.artifacts import ENSEMBLE_INDEX, read_meta, save_prompt
from softprompt.console import say
from softprompt.errors import TrainingError
from softprompt.outputs import write_json
from softprompt.tracking import plot_metrics
from softprompt.training.run import Run, TrainData, TrainResult


def _closing_line(summary: dict, output: Path, data: TrainData) -> str:
    parts = [f"done: {summary['steps']} steps in {summary['train_seconds']:.0f}s"]
    select, kept = summary.get("select", "loss"), summary.get("kept_val_loss")
    if select != "loss" and kept is not None:  # the saved prompt's own validation
        accuracy = summary.get("kept_val_accuracy")
        shown = "" if accuracy is None else f", accuracy {accuracy:.3f}"
        parts.append(
            f"validation loss {summary['base_val_loss']:.4f} (base model) -> {kept:.4f} "
            f"(the prompt kept by --select {select}: step {summary['kept_step']}{shown})"
        )
    elif summary["best_val_loss"] is not None:
        parts.append(
            f"validation loss {summary['base_val_loss']:.4f} (base model) -> "
            f"{summary['best_val_loss']:.4f} (tuned)"
        )
    if data.several_prompts:
        parts.append(
            f"{len(data.tasks)} prompts saved in {output}/<task>/: {', '.join(data.tasks)}"
        )
    else:
        parts.append(f"saved to {output}")
    return "; ".join(parts)


def already_finished(run: Run) -> TrainResult:
    """The result of a run that had ended: nothing is trained or written again."""
    run.put_best()
    folder = run.output / run.data.tasks[0] if run.data.several_prompts else run.output
    summary = read_meta(folder).get("metrics") or run_summary(run, 0.0)
    say(
        f"{run.output} holds a finished run ({run.state.step} steps, "
        f"{run.state.stop_reason or 'all epochs done'}); its prompt is in {folder}. "
        "Nothing to resume: pass --overwrite to train it again"
    )
    prompts = run.prompts.plain()
    named = dict(zip(run.data.tasks, prompts)) if run.data.several_prompts else {}
    return TrainResult(output=run.output, prompt=prompts[0], summary=summary, prompts=named)


def finish(run: Run, elapsed: float) -> TrainResult:
    """Put each task's best prompt (or its last, if never validated) in place and save."""
    run.put_best()
    summary = run_summary(run, elapsed)
    if run.accelerator.is_main_process:
        save_prompts(run, summary)
        plot_metrics(run.output / "metrics.jsonl", run.output / "loss.png")
        run.log.close(run.output / "loss.png")
    run.accelerator.wait_for_everyone()
    say(_closing_line(summary, run.output, run.data))
    prompts = run.prompts.plain()
    named = dict(zip(run.data.tasks, prompts)) if run.data.several_prompts else {}
    return TrainResult(output=run.output, prompt=prompts[0], summary=summary, prompts=named)


def run_summary(run: Run, elapsed: float) -> dict:
    """What the run did, for softprompt.json and the closing line."""
    state, tokens = run.state, run.tokens_seen
    trained = [r for r in run.log.records if r.get("kind") == "train"]
    kept = next((t for t in state.task_best if t.loss is not None), None)
    train_losses = [r["loss"] for r in trained]
    return {
        "steps": state.step,
        "epochs_completed": state.epoch,
        "base_val_loss": state.base_val_loss,
        "initial_val_loss": state.initial_val_loss,
        "best_val_loss": None if math.isinf(state.best_loss) else state.best_loss,
        "best_step": state.best_step,
        "best_val_accuracy": state.best_accuracy,
        # the prompt saved (--select): the first task's kept validation (per task in tasks.json)
        "select": run.cfg.select,
        "kept_step": kept.step if kept is not None else None,
        "kept_val_loss": kept.loss if kept is not None else None,
        "kept_val_accuracy": kept.accuracy if kept is not None else None,
        "final_train_loss": train_losses[-1] if train_losses else None,
        "train_seconds": round(elapsed, 2),
        # the optimizer steps alone (forward, backward, update): the loop less validation and
        # checkpoints, what a bare training loop (compare's LoRA) times
        "step_seconds": round(sum(r.get("step_s", 0.0) for r in trained), 2),
        "tokens": tokens,
        "first_step_s": state.first_step_s,
        "tokens_per_second": round(tokens / elapsed, 1) if elapsed > 0 else None,
        "stop_reason": state.stop_reason or "finished",
    }


def save_prompts(run: Run, summary: dict) -> None:
    """One prompt folder: OUTPUT itself, or OUTPUT/<task>/ per task (and tasks.json)."""
    cfg, data, model, name = run.cfg, run.data, run.loaded.model, run.loaded.name
    plain = run.prompts.plain()  # a residual prompt is saved as its mapped value
    training = {
        k: v for k, v in dataclasses.asdict(cfg).items() if k not in ("model", "data", "prompt")
    }
    # eval and serve read the label words from here: what was used, not 'auto'
    training["choices"] = ",".join(data.choices) if data.choices else None
    training["lr"] = run.lr  # what was used: the kind's default when --lr was not given
    meta = {
        "template": cfg.data.template,
        "target_delimiter": cfg.data.target_delimiter,
        "prompt_format": data.fmt.to_meta(),
        "placement": data.fmt.position_name,
        "peft_compatible": data.fmt.peft_compatible,
        "data": data.info,
        "prompt": dataclasses.asdict(cfg.prompt),
        "init": run.init_info,
        "choices": {"requested": cfg.choices, "used": data.choices},
        "training": training,
        "metrics": summary,
    }
    if run.head:  # a classifier's head, trained and saved with the prompt
        meta["labels"] = run.loaded.labels
        meta["trainable_parameters"] = {
            "prompt": run.prompts.stacked()[0].numel(),
            "head": sum(p.numel() for p in run.head),
        }
    if not data.several_prompts:
        save_prompt(run.output, plain[0], model, name, meta, run.initial[0])
        return
    index = {}
    for i, task in enumerate(data.tasks):
        state = run.state
        task_metrics = {
            "task": task,
            **data.info["tasks"][task],
            "base_val_loss": state.task_base[i] if state.task_base else None,
            "initial_val_loss": state.task_initial[i] if state.task_initial else None,
            "best_val_loss": state.task_best[i].loss,
            "best_step": state.task_best[i].step,
            "best_val_accuracy": state.task_best[i].accuracy,
        }
        task_meta = {**meta, "task": task, "metrics": {**summary, "task": task_metrics}}
        folder = run.output / task
        save_prompt(folder, plain[i], model, name, task_meta, run.initial[i])
        index[task] = {"folder": task, **task_metrics}
    write_json(run.output / "tasks.json", {"tasks": index})
    if data.ensemble > 1:
        write_json(run.output / ENSEMBLE_INDEX, {
            "members": data.tasks,
            "vote": "majority" if data.choices else "mean-logprob",
            "choices": data.choices,
        })  # fmt: skip


def stop_non_finite(run: Run) -> None:
    """Keep the last good prompts (and the true initial ones) and stop, saying what to
    change."""
    if run.state.best_step:
        run.prompts.load_stacked(run.best)
    summary = run_summary(run, 0.0)
    summary["stopped"] = f"non-finite loss at step {run.state.step + 1}"
    if run.accelerator.is_main_process:
        save_prompts(run, summary)
    raise TrainingError(
        f"the loss became NaN or infinite at step {run.state.step + 1}; the last good "
        f"prompt is saved in {run.output}. Lower --lr (now {run.lr}) or set "
        "--max-grad-norm"
    )
