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
from accelerate.utils import broadcast_object_list
from torch import Tensor
from tqdm.auto import tqdm
from transformers import get_linear_schedule_with_warmup

import softprompt
from softprompt.artifacts import ENSEMBLE_INDEX, load_prompt, read_meta, save_prompt
from softprompt.checkpoint import FOLDER as CKPT_FOLDER
from softprompt.checkpoint import RunState, TaskBest, restore_run, save_run
from softprompt.config import TrainConfig
from softprompt.console import say
from softprompt.data import (
    Example,
    Row,
    batch_order,
    detect_labels,
    load_examples,
    split_validation,
)
from softprompt.errors import ConfigError, TrainingError
from softprompt.kinds import CAUSAL
from softprompt.library import pick_prompt
from softprompt.loading import LoadedModel, load_model
from softprompt.loss import with_rest
from softprompt.outputs import claim_output, write_json
from softprompt.parallel import forward_backward, label_count, shard_layers
from softprompt.prompt import (
    PromptSet,
    ResidualPrompt,
    SoftPrompt,
    init_prompt,
    max_positions,
    words_used,
)
from softprompt.scoring import check_choice_targets, choice_first_ids, perplexity
from softprompt.templates import PromptFormat, template_fields
from softprompt.tracking import MetricsLog, open_trackers, plot_metrics


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
    run = Run.start(cfg, loaded)
    if run.finished:  # --resume of a run that had already ended
        return run.already_finished()
    if run.state.step == 0:
        run.measure_start()  # the before: the base model alone, and the initial prompt
    state = run.state
    bar = run.bar = tqdm(
        total=run.total_steps,
        initial=state.step,
        desc="training",
        unit="step",
        disable=not (progress and run.accelerator.is_main_process),
        dynamic_ncols=True,
        smoothing=0.05,  # validation pauses would make a short-memory ETA jump about
    )
    started = time.perf_counter()
    try:  # an error ends the bar's line first, so its message stands on a line of its own
        while state.epoch < run.epochs and not run.done:
            groups = run.epoch_groups()
            while state.group < len(groups) and not run.done:
                run.step(groups[state.group])
                bar.update(1)
                run.show()
                if _due(state.step, cfg.eval_every):
                    run.validate()
                if _due(state.step, cfg.save_every):
                    run.checkpoint()
            if state.group >= len(groups):  # the epoch is complete
                state.epoch, state.group = state.epoch + 1, 0
                if not _due(state.step, cfg.eval_every):
                    run.validate()
                run.checkpoint()
        if run.has_validation and 0 < state.step != run.last_validated:
            run.validate()  # e.g. --max-steps inside the first epoch
    finally:
        bar.close()
        run.bar = None
    return run.finish(time.perf_counter() - started)


def _due(step: int, every: int | None) -> bool:
    return bool(every) and step % every == 0


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
    def multi_task(self) -> bool:
        return "tasks" in self.info


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

    @classmethod
    def start(cls, cfg: TrainConfig, loaded: LoadedModel | None = None) -> Run:
        """Everything set up; a resumed run restored from its newest good checkpoint."""
        # One process, or one of many under `accelerate launch` / torchrun. Without a GPU,
        # accelerate uses gloo across CPU processes only when told cpu=True.
        accelerator = Accelerator(cpu=not torch.cuda.is_available())
        if cfg.shard_model and accelerator.num_processes == 1:
            raise ConfigError(
                "--shard-model splits the model across processes: launch with torchrun or "
                "accelerate launch and 2 or more processes (README, 'Scaling out')"
            )
        examples = _load_examples(cfg)  # bad data fails before anything slow or written
        output = _prepare_output(cfg, accelerator)
        torch.manual_seed(cfg.seed)
        loaded = loaded or load_model(cfg.model, labels=_data_labels(examples[0]))
        loaded.kind.check_training(cfg, loaded, accelerator.num_processes, examples[0])
        loaded.model.to(accelerator.device)
        if cfg.shard_model:
            shard_layers(loaded.model, accelerator)
        limit = max_positions(loaded.model)
        if limit is not None and cfg.data.max_length > limit:
            raise ConfigError(
                f"--max-length {cfg.data.max_length} is longer than the {limit} positions "
                f"{loaded.name} can hold; give --max-length {limit} or less"
            )
        data = _prepare_data(cfg, *examples, loaded.tokenizer, accelerator.device, loaded)
        starts, init_info = _starting_prompts(cfg, loaded, data)
        if cfg.reparam == "residual":
            starts = [ResidualPrompt(p.embedding, cfg.reparam_hidden, cfg.seed + k)
                      for k, p in enumerate(starts)]  # fmt: skip
        prompts = PromptSet(data.tasks, starts)
        prompts.to(accelerator.device)
        steps_per_epoch = math.ceil(
            math.ceil(len(data.train_rows) / cfg.batch_size) / cfg.grad_accum
        )
        total_steps = cfg.max_steps or cfg.epochs * steps_per_epoch
        # One parameter per task: a task absent from a step has no gradient and AdamW skips it.
        # A classification model's head learns beside the prompt (its parameters come last).
        head = loaded.kind.trainable(loaded.model)
        optimizer = torch.optim.AdamW(
            [*prompts.parameters(), *head], lr=cfg.lr, weight_decay=cfg.weight_decay
        )
        scheduler = get_linear_schedule_with_warmup(
            optimizer, int(cfg.warmup_ratio * total_steps), total_steps
        )
        # Not wrapped in DDP: forward_backward all-reduces the gradient itself, which keeps
        # one code path (and the shared prefix) for one process or many.
        main = accelerator.is_main_process
        trackers = open_trackers(cfg.report_to, output, output.name) if main else []
        log = MetricsLog(output / "metrics.jsonl", enabled=main, trackers=trackers)
        run = cls(cfg, accelerator, output, loaded, data, prompts, optimizer, scheduler,
                  total_steps, math.ceil(total_steps / steps_per_epoch), log)  # fmt: skip
        run.init_info = init_info
        run.best, run.initial = prompts.stacked().clone(), prompts.stacked().clone()
        run.head, run.best_head = head, [p.detach().clone() for p in head]
        if head:
            say(f"classification head: {sum(p.numel() for p in head):,} trainable parameters "
                f"beside the prompt's {prompts.stacked().numel():,}")  # fmt: skip
        if cfg.resume:
            folder = restore_run(run)
            log.truncate_after(run.state.step)
            if not run.finished:
                say(
                    f"resuming from {folder.name}: epoch {run.current_epoch}, step {run.state.step}"
                )
        else:
            log.write(kind="config", config=dataclasses.asdict(cfg), data=data.info)
            run.state.task_best = [TaskBest() for _ in data.tasks]
        return run

    # --- the loop's parts ------------------------------------------------------------

    @property
    def done(self) -> bool:
        return self.state.step >= self.total_steps or bool(self.state.stop_reason)

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

    def step(self, group: list[list[Row]]) -> None:
        """One optimizer step over ``group``: forward, backward, clip, update, log."""
        t0 = time.perf_counter()
        loss_sum, n_tok, processed = forward_backward(
            self.accelerator, self.loaded.kind, self.loaded.model, self.prompts, group,
            self.loaded.tokenizer.pad_token_id, self.data.choice_ids, self.cfg.shard_model,
        )  # fmt: skip
        self.tokens_seen += processed
        if not math.isfinite(loss_sum):
            self.optimizer.zero_grad()
            self._stop_non_finite()
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

    def measure(self, prompts: PromptSet | None, kind: str) -> tuple[float, list] | None:
        """Validation loss of every task (with ``prompts``, or the base model), logged:
        (pooled over tasks, per task), or None without validation data."""
        if not self.has_validation:
            return None
        model, pad_id = self.loaded.model, self.loaded.tokenizer.pad_token_id
        per_task, total, count = [], 0.0, 0
        for i, rows in enumerate(self.data.val_by_task):
            if not rows:
                per_task.append(None)
                continue
            prompt = prompts.prompts[i] if prompts is not None else None
            result = self.loaded.kind.evaluate_loss(
                model, prompt, rows, self.cfg.batch_size, pad_id, self.data.choice_ids
            )
            per_task.append(result["loss"])
            total, count = total + result["loss"] * result["tokens"], count + result["tokens"]
            if self.data.multi_task:
                self.log.write(kind=f"task_{kind}", task=self.data.tasks[i], step=self.state.step,
                               **result)  # fmt: skip
        pooled = total / max(count, 1)
        self.log.write(kind=kind, step=self.state.step, epoch=self.current_epoch, loss=pooled,
                       ppl=perplexity(pooled), tokens=count)  # fmt: skip
        return pooled, per_task

    def measure_start(self) -> None:
        """Validation loss of the base model alone and with the initial prompts."""
        if not self.has_validation:
            return
        state = self.state
        state.base_val_loss, state.task_base = self.measure(None, "base")
        state.initial_val_loss, state.task_initial = self.measure(self.prompts, "val")
        say(
            f"validation loss before training: base model {state.base_val_loss:.4f}, with the "
            f"initial prompt{'s' if self.data.multi_task else ''} {state.initial_val_loss:.4f}"
        )

    def validate(self) -> float | None:
        """Validate the current prompts; keep each task's best; count towards --patience.
        Returns the pooled validation loss (None without validation data)."""
        result = self.measure(self.prompts, "val")
        if result is None:
            return None
        loss, per_task = result
        state = self.state
        for i, task_loss in enumerate(per_task):  # each task keeps its own best prompt
            record = state.task_best[i]
            if task_loss is not None and (record.loss is None or task_loss < record.loss - 1e-6):
                record.loss, record.step = task_loss, state.step
                self.best[i].copy_(self.prompts.prompts[i].embedding.detach())
                for best, p in zip(self.best_head, self.head):  # classify: one task, one head
                    best.copy_(p.detach())
        self.last_val = loss
        self.note(f"step {state.step}, epoch {self.current_epoch}: validation loss {loss:.4f}"
                  + (" (best so far)" if loss < state.best_loss - 1e-6 else
                     f" (best {state.best_loss:.4f} at step {state.best_step})"))  # fmt: skip
        self.show()
        if loss < state.best_loss - 1e-6:
            state.best_loss, state.best_step, state.bad_evals = loss, state.step, 0
        else:
            state.bad_evals += 1
            if self.cfg.patience and state.bad_evals >= self.cfg.patience:
                state.stop_reason = (
                    f"early stop: no better validation loss in {self.cfg.patience} checks"
                )
        return loss

    def checkpoint(self) -> None:
        if self.accelerator.is_main_process:
            save_run(self)

    # --- the end ---------------------------------------------------------------------

    def already_finished(self) -> TrainResult:
        """The result of a run that had ended: nothing is trained or written again."""
        for i, record in enumerate(self.state.task_best):
            if self.data.val_by_task[i] and record.loss is not None:
                self.prompts.put(i, self.best[i])
                for best, p in zip(self.best_head, self.head):
                    p.data.copy_(best)
        folder = self.output / self.data.tasks[0] if self.data.multi_task else self.output
        summary = read_meta(folder).get("metrics") or self.summary(0.0)
        say(
            f"{self.output} holds a finished run ({self.state.step} steps, "
            f"{self.state.stop_reason or 'all epochs done'}); its prompt is in {folder}. "
            "Nothing to resume: pass --overwrite to train it again"
        )
        prompts = self.prompts.plain()
        named = dict(zip(self.data.tasks, prompts)) if self.data.multi_task else {}
        return TrainResult(output=self.output, prompt=prompts[0], summary=summary, prompts=named)

    def finish(self, elapsed: float) -> TrainResult:
        """Put each task's best prompt (or its last, if never validated) in place and save."""
        for i, record in enumerate(self.state.task_best):
            if self.data.val_by_task[i] and record.loss is not None:
                self.prompts.put(i, self.best[i])
                for best, p in zip(self.best_head, self.head):
                    p.data.copy_(best)
        summary = self.summary(elapsed)
        if self.accelerator.is_main_process:
            self.save(summary)
            plot_metrics(self.output / "metrics.jsonl", self.output / "loss.png")
            self.log.close(self.output / "loss.png")
        self.accelerator.wait_for_everyone()
        say(_closing_line(summary, self.output, self.data))
        prompts = self.prompts.plain()
        named = dict(zip(self.data.tasks, prompts)) if self.data.multi_task else {}
        return TrainResult(output=self.output, prompt=prompts[0], summary=summary, prompts=named)

    def summary(self, elapsed: float) -> dict:
        state, tokens = self.state, self.tokens_seen
        train_losses = [r["loss"] for r in self.log.records if r.get("kind") == "train"]
        return {
            "steps": state.step,
            "epochs_completed": state.epoch,
            "base_val_loss": state.base_val_loss,
            "initial_val_loss": state.initial_val_loss,
            "best_val_loss": None if math.isinf(state.best_loss) else state.best_loss,
            "best_step": state.best_step,
            "final_train_loss": train_losses[-1] if train_losses else None,
            "train_seconds": round(elapsed, 2),
            "tokens": tokens,
            "first_step_s": state.first_step_s,
            "tokens_per_second": round(tokens / elapsed, 1) if elapsed > 0 else None,
            "stop_reason": state.stop_reason or "finished",
        }

    def save(self, summary: dict) -> None:
        """One prompt folder: OUTPUT itself, or OUTPUT/<task>/ per task (and tasks.json)."""
        cfg, data, model, name = self.cfg, self.data, self.loaded.model, self.loaded.name
        plain = self.prompts.plain()  # a residual prompt is saved as its mapped value
        training = {
            k: v for k, v in dataclasses.asdict(cfg).items() if k not in ("model", "data", "prompt")
        }
        # eval and serve read the label words from here: what was used, not 'auto'
        training["choices"] = ",".join(data.choices) if data.choices else None
        meta = {
            "template": cfg.data.template,
            "target_delimiter": cfg.data.target_delimiter,
            "prompt_format": data.fmt.to_meta(),
            "placement": data.fmt.position_name,
            "peft_compatible": data.fmt.peft_compatible,
            "data": data.info,
            "prompt": dataclasses.asdict(cfg.prompt),
            "init": self.init_info,
            "choices": {"requested": cfg.choices, "used": data.choices},
            "training": training,
            "metrics": summary,
        }
        if self.head:  # a classifier's head, trained and saved with the prompt
            meta["labels"] = self.loaded.labels
            meta["trainable_parameters"] = {
                "prompt": self.prompts.stacked()[0].numel(),
                "head": sum(p.numel() for p in self.head),
            }
        if not data.multi_task:
            save_prompt(self.output, plain[0], model, name, meta, self.initial[0])
            return
        index = {}
        for i, task in enumerate(data.tasks):
            state = self.state
            task_metrics = {
                "task": task,
                **data.info["tasks"][task],
                "base_val_loss": state.task_base[i] if state.task_base else None,
                "initial_val_loss": state.task_initial[i] if state.task_initial else None,
                "best_val_loss": state.task_best[i].loss,
                "best_step": state.task_best[i].step,
            }
            task_meta = {**meta, "task": task, "metrics": {**summary, "task": task_metrics}}
            folder = self.output / task
            save_prompt(folder, plain[i], model, name, task_meta, self.initial[i])
            index[task] = {"folder": task, **task_metrics}
        write_json(self.output / "tasks.json", {"tasks": index})
        if data.ensemble > 1:
            write_json(self.output / ENSEMBLE_INDEX, {
                "members": data.tasks,
                "vote": "majority" if data.choices else "mean-logprob",
                "choices": data.choices,
            })  # fmt: skip

    def _stop_non_finite(self) -> None:
        """Keep the last good prompts (and the true initial ones) and stop, saying what to
        change."""
        if self.state.best_step:
            self.prompts.load_stacked(self.best)
        summary = self.summary(0.0)
        summary["stopped"] = f"non-finite loss at step {self.state.step + 1}"
        if self.accelerator.is_main_process:
            self.save(summary)
        raise TrainingError(
            f"the loss became NaN or infinite at step {self.state.step + 1}; the last good "
            f"prompt is saved in {self.output}. Lower --lr (now {self.cfg.lr}) or set "
            "--max-grad-norm"
        )


# --- set-up ---------------------------------------------------------------------------


def _prepare_output(cfg: TrainConfig, accelerator: Accelerator) -> Path:
    """The main process checks and prepares the folder; every process learns the verdict."""
    output = Path(cfg.output or time.strftime("runs/softprompt-%Y%m%d-%H%M%S"))
    verdict = [""]
    if accelerator.is_main_process:
        try:
            _check_output(cfg, output)
        except ConfigError as err:
            verdict = [err.cli_message]
    if accelerator.num_processes > 1:
        verdict = broadcast_object_list(verdict)
    if verdict[0]:
        raise ConfigError(verdict[0])
    return output


def _check_output(cfg: TrainConfig, output: Path) -> None:
    if cfg.resume and not (output / CKPT_FOLDER).is_dir():
        raise ConfigError(f"--resume: {output} has no checkpoints; run without --resume")
    claim_output(output, "a run", resume=cfg.resume, overwrite=cfg.overwrite)


def _load_examples(cfg: TrainConfig) -> tuple[list[Example], list[Example]]:
    """(training, validation) examples: --validation, or a split of --data."""
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


def _data_labels(examples: list[Example]) -> list[str] | None:
    """The data's labels (its distinct targets, sorted): a classification head's outputs."""
    return sorted({ex.target for ex in examples if ex.target is not None}) or None


def _prepare_data(
    cfg: TrainConfig,
    train_ex: list[Example],
    val_ex: list[Example],
    tokenizer,
    device,
    loaded: LoadedModel | None = None,
) -> TrainData:
    """Token rows (each with its task's index), per-task validation rows, the choices' ids."""
    d = cfg.data
    max_text = d.max_length - cfg.prompt.num_virtual_tokens
    tasks = sorted({ex.task for ex in train_ex}) if cfg.task_field else [""]
    if cfg.ensemble > 1:  # members are tasks that every row belongs to (see epoch_groups)
        tasks = [f"member-{k}" for k in range(cfg.ensemble)]
    ids = {name: i for i, name in enumerate(tasks)} if cfg.task_field else None
    fmt = d.prompt_format(chat=train_ex[0].messages is not None)
    delimiter = "" if fmt.chat else d.target_delimiter  # an answer follows its turn's header
    kind, labels = (loaded.kind, loaded.labels) if loaded is not None else (CAUSAL, None)
    train_rows, val_rows = (
        kind.tokenize(part, tokenizer, max_text, ids, fmt, delimiter, d.loss_on, labels)
        for part in (train_ex, val_ex)
    )
    if not any(label_count([r]) for r in train_rows):
        raise ConfigError(f"{d.data}: no row has a target token to learn; check the fields")
    mode = "chat" if fmt.chat else "text" if train_ex[0].target is None else "pairs"
    mode = kind.data_mode(mode)
    info = {**dataclasses.asdict(d), "mode": mode, "train_examples": len(train_rows),
            "val_examples": len(val_rows)}  # fmt: skip
    if cfg.task_field:
        info["tasks"] = {
            name: {
                "train_examples": sum(r.task == i for r in train_rows),
                "val_examples": sum(r.task == i for r in val_rows),
            }
            for i, name in enumerate(tasks)
        }
        counts = ", ".join(f"{n} {v['train_examples']}" for n, v in info["tasks"].items())
        say(f"multi-task: {len(tasks)} tasks, one prompt each, mixed in batches ({counts})")
    elif cfg.ensemble > 1:
        info["ensemble"] = cfg.ensemble
        info["tasks"] = {name: {"train_examples": len(train_rows), "val_examples": len(val_rows)}
                         for name in tasks}  # fmt: skip
        say(f"ensemble: {cfg.ensemble} prompts (seeds {cfg.seed}..{cfg.seed + cfg.ensemble - 1}), "
            "every row seen by each in the same batch")  # fmt: skip
    say(f"data: {len(train_rows)} training and {len(val_rows)} validation examples ({mode})")
    if fmt.position_name != "start":
        say(f"the soft prompt sits at {fmt.position_name!r}: PEFT cannot place it there, so only "
            "softprompt loads this prompt exactly")  # fmt: skip
    val_by_task = [[r for r in val_rows if r.task == i] for i in range(len(tasks))]
    if cfg.ensemble > 1:
        val_by_task = [val_rows for _ in tasks]
    choices = cfg.choice_list
    if cfg.auto_choices and mode == "pairs" and not cfg.task_field and kind.restricted_choices:
        choices = _detect_choices(cfg, train_ex, tokenizer, delimiter)
    info["choices"] = choices
    choice_ids = None
    if choices is not None and cfg.choice_loss != "full":
        first = choice_first_ids(tokenizer, choices, delimiter)
        check_choice_targets(train_rows + val_rows, train_ex + val_ex, first)
        rest = (
            " plus one logit for every other token" if cfg.choice_loss == "restricted+rest" else ""
        )
        say(f"classification mode: loss over the first tokens of {','.join(choices)}{rest}")
        choice_ids = torch.tensor(first, device=device)
        if cfg.choice_loss == "restricted+rest":
            choice_ids = with_rest(choice_ids)
    return TrainData(train_rows, val_by_task, tasks, info, choice_ids, fmt, choices, cfg.ensemble)


def _detect_choices(cfg: TrainConfig, examples: list[Example], tokenizer, delimiter: str):
    """--choices auto: the data's label set, if it has one the restricted loss can use."""
    labels = detect_labels(examples)
    if labels is None:
        return None
    if cfg.choice_loss != "full":
        try:
            choice_first_ids(tokenizer, labels, delimiter)
        except ConfigError:
            say(
                f"the targets look like labels ({', '.join(labels)}) but start with the same "
                "token: no classification mode (give --choices and --choice-loss full for it)"
            )
            return None
    say(
        f"--choices auto: the targets are {len(labels)} labels ({', '.join(labels)}): "
        f"classification mode (--choice-loss {cfg.choice_loss}); --choices none turns it off"
    )
    return labels


def task_words(cfg: TrainConfig, choices: list[str] | None) -> str:
    """The task's own words for --init auto: the label words, then the template's fixed
    text (its fields left out) or the system prompt; '' when there are none."""
    parts = list(choices or [])
    d = cfg.data
    if d.template:
        text = d.template
        for name in template_fields(d.template):
            text = text.replace("{" + name + "}", " ")
        parts.append(" ".join(text.split()))
    if d.system:
        parts.append(" ".join(d.system.split()))
    return " ".join(p for p in parts if p)


def _starting_prompts(
    cfg: TrainConfig, loaded: LoadedModel, data: TrainData
) -> tuple[list[SoftPrompt], dict]:
    """One starting prompt per task (every task starts from the same one) or per ensemble
    member (member k: seed SEED+k; with auto or text init, the words' tokens shuffled from
    the second member on), and a record of how they were chosen."""
    p, info = cfg.prompt, {"requested": cfg.prompt.init}
    members = cfg.ensemble
    if p.library is not None:
        first, record = pick_prompt(
            p.library, loaded.model, data.train_rows, cfg.batch_size,
            loaded.tokenizer.pad_token_id, p.num_virtual_tokens, data.choice_ids,
        )  # fmt: skip
        say(
            f"--init {p.init}: starting from {record['picked']} (lowest loss on "
            f"{record['scored_rows']} training rows of {len(record['scores'])} prompts)"
        )
        info.update(used="library", **record)
        starts = [first]
    elif p.from_folder:
        starts, info["used"] = [_starting_prompt(cfg, loaded)], "folder"
    elif p.init in ("random", "vocab"):
        starts = [init_prompt(loaded.model, loaded.tokenizer, p, cfg.seed + k)
                  for k in range(members)]  # fmt: skip
        info["used"] = p.init
    else:  # text or auto: words, repeated to N tokens
        if p.init == "text":  # its own checks (a phrase that gives no tokens is refused)
            init_prompt(loaded.model, loaded.tokenizer, p, cfg.seed)
        words = task_words(cfg, data.choices) if p.init == "auto" else words_used(
            loaded.tokenizer, p.init_text, p.num_virtual_tokens)  # fmt: skip
        as_auto = dataclasses.replace(p, init="auto")
        starts = [init_prompt(loaded.model, loaded.tokenizer, as_auto, cfg.seed + k, words,
                              shuffle=k > 0) for k in range(members)]  # fmt: skip
        info.update(used="text" if words else "vocab", text=words or None)
        if p.init == "auto":
            say(f"--init auto: {'the task words ' + repr(words) if words else 'common tokens'}"
                f", repeated to {p.num_virtual_tokens} virtual tokens")  # fmt: skip
    if members > 1:
        starts = starts if len(starts) == members else starts * members
        return [SoftPrompt(s.embedding) for s in starts], info
    return [SoftPrompt(starts[0].embedding) for _ in data.tasks], info


def _starting_prompt(cfg: TrainConfig, loaded: LoadedModel) -> SoftPrompt:
    """The prompt training starts from: ``--init`` (a saved prompt's folder, or a method)."""
    if cfg.prompt.from_folder:
        saved, _ = load_prompt(Path(cfg.prompt.init), model=loaded.model)
        if saved.num_virtual_tokens != cfg.prompt.num_virtual_tokens:
            raise ConfigError(
                f"--init {cfg.prompt.init} holds a prompt of {saved.num_virtual_tokens} virtual "
                f"tokens, but --num-virtual-tokens is {cfg.prompt.num_virtual_tokens}; pass "
                f"--num-virtual-tokens {saved.num_virtual_tokens} to continue from it"
            )
        return saved
    return init_prompt(loaded.model, loaded.tokenizer, cfg.prompt, seed=cfg.seed)


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


def _closing_line(summary: dict, output: Path, data: TrainData) -> str:
    parts = [f"done: {summary['steps']} steps in {summary['train_seconds']:.0f}s"]
    if summary["best_val_loss"] is not None:
        parts.append(
            f"validation loss {summary['base_val_loss']:.4f} (base model) -> "
            f"{summary['best_val_loss']:.4f} (tuned)"
        )
    if data.multi_task:
        parts.append(
            f"{len(data.tasks)} prompts saved in {output}/<task>/: {', '.join(data.tasks)}"
        )
    else:
        parts.append(f"saved to {output}")
    return "; ".join(parts)
