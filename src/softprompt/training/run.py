"""The training loop: only the soft prompt learns; the base model stays frozen.

Read ``train`` top to bottom: set a run up (``Run.start``: data, output folder, model,
prompts, optimizer, or a resumed run's state), measure where it starts, loop over optimizer
steps (forward and backward, clip, step, log; validate and checkpoint when due), then save
the best prompt as a PEFT-compatible artifact with its metrics and loss curve.

With ``--task-field`` one run trains one prompt per task: the tasks' rows are mixed in
batches (each row meets its own task's prompt), each task keeps its own best prompt, and
each is saved in ``OUTPUT/<task>/``. A single task is the one-prompt case of the same loop.
"""

from __future__ import annotations

import dataclasses
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import psutil
import torch
from accelerate import Accelerator
from torch import Tensor
from tqdm.auto import tqdm

import softprompt
from softprompt.config import TrainConfig
from softprompt.console import say
from softprompt.loading import LoadedModel
from softprompt.prompt import (
    PromptSet,
    SoftPrompt,
)
from softprompt.rows import Row, batch_order
from softprompt.scoring import perplexity
from softprompt.templates import PromptFormat
from softprompt.tracking import MetricsLog
from softprompt.training.checkpoint import RunState, TaskBest, save_run
from softprompt.training.parallel import forward_backward


@dataclass
class Measured:
    """One validation: the loss pooled over tasks, the accuracy pooled over their rows
    (None unless every scored row can be right or wrong: classification), and each task's
    ``evaluate_loss`` result (None for a task without validation rows)."""

    loss: float
    accuracy: float | None
    per_task: list[dict | None]

    @property
    def task_losses(self) -> list[float | None]:
        return [None if t is None else t["loss"] for t in self.per_task]


def keeps(select: str, loss: float, accuracy: float | None, kept: TaskBest) -> bool:
    """Whether a validation (``loss``, ``accuracy``) replaces the ``kept`` one by --select:
    a lower loss; a higher accuracy, or the same with a lower loss; or always ('last')."""
    if select == "last" or kept.loss is None or math.isinf(kept.loss):
        return True
    lower = loss < kept.loss - 1e-6
    if select == "accuracy" and accuracy is not None and kept.accuracy is not None:
        if abs(accuracy - kept.accuracy) > 1e-9:
            return accuracy > kept.accuracy
    return lower


def _best_so_far(state: RunState, select: str) -> str:
    if select == "accuracy" and state.best_accuracy is not None:
        return f" (best {state.best_accuracy:.3f} at step {state.best_step})"
    return f" (best {state.best_loss:.4f} at step {state.best_step})"


@dataclass
class TrainData:
    """A run's token rows and what was learned about them."""

    train_rows: list[Row]
    val_by_task: list[list[Row]]  # validation rows of each task (a single task: one list)
    tasks: list[str]  # task names, one prompt each (a single-task run: [""])
    info: dict  # recorded in metrics.jsonl and softprompt.json
    choice_ids: Tensor | None  # (C,) first tokens of --choices (+ REST), for the restricted loss
    fmt: PromptFormat  # how inputs become text around the prompt (saved with it)
    choices: list[str] | None = None  # the label words (given, or found by --choices auto)
    ensemble: int = 1  # --ensemble K: the K "tasks" are members that see every row

    @property
    def classifying(self) -> bool:
        """Whether the run learns labels: label words (--choices, given or detected) or a
        classifier's head. Its kind's default --select is the one for classifying."""
        return bool(self.choices) or self.counts_right

    @property
    def counts_right(self) -> bool:
        """Whether validation counts right answers (logs an ``accuracy``): the restricted
        loss over the choices, or a classifier's head. ``--choice-loss full`` scores every
        token of the vocabulary, so it counts none."""
        return self.choice_ids is not None or self.info.get("mode") == "labels"

    @property
    def several_prompts(self) -> bool:
        """One prompt per task (--task-field) or per ensemble member, each saved in its own
        folder (OUTPUT/<name>/), rather than one prompt in OUTPUT."""
        return len(self.tasks) > 1 or "tasks" in self.info


@dataclass(eq=False)
class Run:
    """One training run: its settings, model, data, prompts, optimizer and where it stands.

    ``checkpoint.save_run`` / ``restore_run`` read and write the parts a checkpoint holds.
    """

    cfg: TrainConfig
    accelerator: Accelerator
    output: Path
    loaded: LoadedModel
    data: TrainData
    prompts: PromptSet  # (K tasks) x (N, H), float32
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    total_steps: int
    epochs: int
    log: MetricsLog
    state: RunState = field(default_factory=RunState)
    best: Tensor | None = None  # (K, N, H): each task's best prompt so far
    initial: Tensor | None = None  # (K, N, H): each task's starting prompt
    tokens_seen: int = 0
    last_loss: float = math.nan
    last_val: float | None = None
    bar: tqdm | None = None  # the progress bar while the loop runs
    head: list[Tensor] = field(default_factory=list)  # classify: the head's parameters
    best_head: list[Tensor] = field(default_factory=list)  # ... at the best validation
    init_info: dict = field(default_factory=dict)  # how the starting prompts were chosen

    # --- the loop's parts ------------------------------------------------------------

    @property
    def done(self) -> bool:
        return self.state.step >= self.total_steps or bool(self.state.stop_reason)

    @property
    def lr(self) -> float:
        """The peak learning rate: --lr, or the model kind's default."""
        return self.optimizer.defaults["lr"]

    @property
    def finished(self) -> bool:
        """The run had ended (all its steps or epochs, or an early stop)."""
        return self.done or self.state.epoch >= self.epochs

    @property
    def current_epoch(self) -> int:
        """The epoch the run is in, counted from 1 (0 before the first step); an epoch's
        closing validation belongs to it. The bar and metrics.jsonl both use this."""
        return self.state.epoch + (1 if self.state.group else 0)

    def show(self) -> None:
        """The bar's postfix: last step's loss, last validation loss, epoch."""
        if self.bar is not None:
            val = {} if self.last_val is None else {"val": f"{self.last_val:.4f}"}
            self.bar.set_postfix(loss=f"{self.last_loss:.4f}", **val, epoch=self.current_epoch)

    def note(self, msg: str) -> None:
        """A progress line that does not break the bar."""
        if self.bar is not None and not self.bar.disable:
            self.bar.write(f"[softprompt] {msg}", file=sys.stderr)
        elif self.bar is None:
            say(msg)

    @property
    def has_validation(self) -> bool:
        return any(self.data.val_by_task)

    @property
    def last_validated(self) -> int:
        return max((r["step"] for r in self.log.records if r.get("kind") == "val"), default=-1)

    def epoch_groups(self) -> list[list[list[Row]]]:
        """This epoch's optimizer steps, each a group of ``grad_accum`` batches of rows."""
        rows, cfg = self.data.train_rows, self.cfg
        lengths = [len(r.input_ids) for r in rows]
        order = batch_order(lengths, cfg.batch_size, cfg.seed, self.state.epoch)
        groups = [order[i : i + cfg.grad_accum] for i in range(0, len(order), cfg.grad_accum)]
        k = self.data.ensemble  # an ensemble: every row once per member, in the same batch
        return [
            [[dataclasses.replace(rows[i], task=m) for m in range(k) for i in batch]
             if k > 1 else [rows[i] for i in batch] for batch in group]
            for group in groups
        ]  # fmt: skip

    def step(self, group: list[list[Row]]) -> bool:
        """One optimizer step over ``group``: forward, backward, clip, update, log. False,
        with nothing updated, when the loss was not finite."""
        t0 = time.perf_counter()
        loss_sum, n_tok, processed = forward_backward(
            self.accelerator, self.loaded.kind, self.loaded.model, self.prompts, group,
            self.loaded.tokenizer.pad_token_id, self.data.choice_ids, self.cfg.shard_model,
            self.cfg.gradient_checkpointing,
        )  # fmt: skip
        self.tokens_seen += processed
        if not math.isfinite(loss_sum):
            self.optimizer.zero_grad()
            return False
        if self.data.ensemble > 1:  # each member's gradient: the mean over its own tokens
            for p in self.prompts.parameters():
                if p.grad is not None:
                    p.grad.mul_(self.data.ensemble)
        grad_norm = _clip(self.prompts, self.cfg.max_grad_norm, self.head)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad()
        state = self.state
        state.step, state.group = state.step + 1, state.group + 1
        self.last_loss = loss_sum / max(n_tok, 1)
        if state.first_step_s is None:  # cold start: command -> first step done
            state.first_step_s = round(time.time() - softprompt.STARTED, 2)
        self.log.write(
            kind="train",
            step=state.step,
            epoch=self.current_epoch,
            loss=self.last_loss,
            lr=self.scheduler.get_last_lr()[0],
            grad_norm=grad_norm,
            step_s=time.perf_counter() - t0,
            rss_mb=round(psutil.Process().memory_info().rss / 2**20, 1),
        )
        return True

    def measure(self, prompts: PromptSet | None, kind: str) -> Measured | None:
        """Validation loss (and, for classification, accuracy) of every task, with
        ``prompts`` or the base model, logged; None without validation data."""
        if not self.has_validation:
            return None
        model, pad_id = self.loaded.model, self.loaded.tokenizer.pad_token_id
        per_task: list[dict | None] = []
        total, count, right, rows = 0.0, 0, 0.0, 0
        for i, task_rows in enumerate(self.data.val_by_task):
            if not task_rows:
                per_task.append(None)
                continue
            prompt = prompts.prompts[i] if prompts is not None else None
            result = self.loaded.kind.evaluate_loss(
                model, prompt, task_rows, self.cfg.batch_size, pad_id, self.data.choice_ids
            )
            per_task.append(result)
            total, count = total + result["loss"] * result["tokens"], count + result["tokens"]
            if "accuracy" in result:
                right, rows = right + result["accuracy"] * len(task_rows), rows + len(task_rows)
            if self.data.several_prompts:
                self.log.write(kind=f"task_{kind}", task=self.data.tasks[i], step=self.state.step,
                               **result)  # fmt: skip
        pooled = total / max(count, 1)
        accuracy = right / rows if rows else None
        extra = {} if accuracy is None else {"accuracy": accuracy}
        self.log.write(kind=kind, step=self.state.step, epoch=self.current_epoch, loss=pooled,
                       ppl=perplexity(pooled), tokens=count, **extra)  # fmt: skip
        return Measured(pooled, accuracy, per_task)

    def measure_start(self) -> None:
        """Validation loss of the base model alone and with the initial prompts."""
        if not self.has_validation:
            return
        state = self.state
        base, initial = self.measure(None, "base"), self.measure(self.prompts, "val")
        state.base_val_loss, state.task_base = base.loss, base.task_losses
        state.initial_val_loss, state.task_initial = initial.loss, initial.task_losses
        say(
            f"validation loss before training: base model {state.base_val_loss:.4f}, with the "
            f"initial prompt{'s' if self.data.several_prompts else ''} {state.initial_val_loss:.4f}"
            + ("" if initial.accuracy is None else f" (accuracy {initial.accuracy:.3f})")
        )

    def validate(self) -> float | None:
        """Validate the current prompts; keep each task's prompt by --select; count towards
        --patience. Returns the pooled validation loss (None without validation data)."""
        result = self.measure(self.prompts, "val")
        if result is None:
            return None
        state, select = self.state, self.cfg.select
        for i, task in enumerate(result.per_task):  # each task keeps its own prompt
            record = state.task_best[i]
            if task is not None and keeps(select, task["loss"], task.get("accuracy"), record):
                record.loss, record.accuracy, record.step = (
                    task["loss"],
                    task.get("accuracy"),
                    state.step,
                )
                self.best[i].copy_(self.prompts.prompts[i].embedding.detach())
                for best, p in zip(self.best_head, self.head):  # classify: one task, one head
                    best.copy_(p.detach())
        loss, accuracy = result.loss, result.accuracy
        pooled_best = TaskBest(state.best_loss, state.best_step, state.best_accuracy)
        better = keeps("loss" if select == "last" else select, loss, accuracy, pooled_best)
        self.last_val = loss
        shown = "" if accuracy is None else f", accuracy {accuracy:.3f}"
        self.note(
            f"step {state.step}, epoch {self.current_epoch}: validation loss {loss:.4f}"
            f"{shown}" + (" (best so far)" if better else _best_so_far(state, select))
        )
        self.show()
        if better:
            state.best_loss, state.best_accuracy = loss, accuracy
            state.best_step, state.bad_evals = state.step, 0
        else:
            state.bad_evals += 1
            if self.cfg.patience and state.bad_evals >= self.cfg.patience:
                rule = "accuracy" if select == "accuracy" else "loss"
                state.stop_reason = (
                    f"early stop: no better validation {rule} in {self.cfg.patience} checks"
                )
        return loss

    def put_best(self) -> None:
        """Each task's best prompt (and a classifier's head at the best validation) in place
        of the current one; a task never validated keeps its last."""
        for i, record in enumerate(self.state.task_best):
            if self.data.val_by_task[i] and record.loss is not None:
                self.prompts.put(i, self.best[i])
                for best, p in zip(self.best_head, self.head):
                    p.data.copy_(best)

    def checkpoint(self) -> None:
        if self.accelerator.is_main_process:
            save_run(self)

    # --- the end ---------------------------------------------------------------------


# --- set-up ---------------------------------------------------------------------------


def _clip(prompts: PromptSet, max_norm: float | None, head: list[Tensor] = ()) -> float:
    """Clip each task's gradient on its own (the prompts are independent; a residual prompt's
    P and MLP together), and a classification head's as one group; return the norm over all
    of them before clipping."""
    norms = []
    groups = [list(prompt.parameters()) for prompt in prompts.prompts]
    for group in groups + ([list(head)] if head else []):
        params = [p for p in group if p.grad is not None]
        if params:
            norms.append(
                torch.nn.utils.clip_grad_norm_(params, max_norm)
                if max_norm
                else torch.stack([p.grad.norm() for p in params]).norm()
            )
    return float(torch.stack(norms).norm()) if norms else 0.0


@dataclass
class TrainResult:
    output: Path
    prompt: SoftPrompt  # the trained prompt (a multi-task run: its first task's)
    summary: dict
    prompts: dict[str, SoftPrompt] = field(default_factory=dict)  # multi-task: task -> prompt
