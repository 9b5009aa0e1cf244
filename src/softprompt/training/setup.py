"""Setting a run up: its data (token rows, per-task validation, the choices' ids), its output
folder, and the `Run` itself (model, prompts, optimizer, or a resumed run's state)."""

from __future__ import annotations

import dataclasses
import functools
import math
import re
import time
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import broadcast_object_list
from torch import Tensor
from transformers import get_linear_schedule_with_warmup

from softprompt.config import TrainConfig
from softprompt.console import say
from softprompt.data import (
    Example,
    detect_labels,
    load_examples,
    split_validation,
)
from softprompt.errors import ConfigError
from softprompt.kinds import CAUSAL, epochs_for
from softprompt.loading import LoadedModel, load_model
from softprompt.loss import with_rest
from softprompt.outputs import claim_output
from softprompt.prefix import deepen, kv_layout
from softprompt.prompt import (
    ProjectedPrefix,
    PromptSet,
    ResidualPrompt,
    max_positions,
)
from softprompt.scoring import check_choice_targets, choice_first_ids
from softprompt.tracking import MetricsLog, open_trackers
from softprompt.training.checkpoint import FOLDER as CKPT_FOLDER
from softprompt.training.checkpoint import TaskBest, restore_run
from softprompt.training.parallel import label_count, shard_layers
from softprompt.training.run import Run, TrainData
from softprompt.training.starting import starting_prompts


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
    _describe_tasks(cfg, tasks, train_rows, val_rows, info)
    say(f"data: {len(train_rows)} training and {len(val_rows)} validation examples ({mode})")
    if fmt.position_name != "start":
        say(f"the soft prompt sits at {fmt.position_name!r}: PEFT cannot place it there, so only "
            "softprompt loads this prompt exactly")  # fmt: skip
    val_by_task = [[r for r in val_rows if r.task == i] for i in range(len(tasks))]
    if cfg.ensemble > 1:
        val_by_task = [val_rows for _ in tasks]
    choices = cfg.choice_list
    if cfg.auto_choices and mode == "pairs" and not cfg.task_field and kind.restricted_choices:
        choices = _detect_choices(cfg, train_ex + val_ex, tokenizer, delimiter)
    info["choices"] = choices
    choice_ids = None
    if choices is not None and cfg.choice_loss != "full":
        check = (train_rows + val_rows, train_ex + val_ex)
        choice_ids = _choice_ids(cfg, choices, tokenizer, delimiter, check, device)
    return TrainData(train_rows, val_by_task, tasks, info, choice_ids, fmt, choices, cfg.ensemble)


def _describe_tasks(cfg: TrainConfig, tasks: list[str], train_rows, val_rows, info: dict) -> None:
    """Record (in ``info``) and say how many rows each task or ensemble member has."""
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


def _choice_ids(cfg: TrainConfig, choices: list[str], tokenizer, delimiter: str, check: tuple,
                device) -> Tensor:  # fmt: skip
    """The choices' first tokens (C,), plus REST for --choice-loss restricted+rest; every
    row of ``check`` (rows, examples) must start its target with one of them."""
    first = choice_first_ids(tokenizer, choices, delimiter)
    check_choice_targets(*check, first)
    rest = " plus one logit for every other token" if cfg.choice_loss == "restricted+rest" else ""
    say(f"classification mode: loss over the first tokens of {','.join(choices)}{rest}")
    choice_ids = torch.tensor(first, device=device)
    return with_rest(choice_ids) if cfg.choice_loss == "restricted+rest" else choice_ids


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


class DataSource:
    """Where a run's rows come from: a data file's examples and their targets (``train``).
    ``distill.DistillSource`` gives rows whose targets are a teacher's distributions."""

    def examples(self, cfg: TrainConfig) -> tuple[list[Example], list[Example]]:
        """(training, validation) examples, read before anything slow is done."""
        return _load_examples(cfg)

    def prepare(self, cfg: TrainConfig, train_ex: list[Example], val_ex: list[Example],
                loaded: LoadedModel, output: Path, device) -> TrainData:  # fmt: skip
        """The run's token rows, once the model is loaded and the output folder claimed."""
        return _prepare_data(cfg, train_ex, val_ex, loaded.tokenizer, device, loaded)


def start_run(
    cfg: TrainConfig, loaded: LoadedModel | None = None, source: DataSource | None = None
) -> Run:
    """Everything set up; a resumed run restored from its newest good checkpoint."""
    # One process, or one of many under `accelerate launch` / torchrun. Without a GPU,
    # accelerate uses gloo across CPU processes only when told cpu=True.
    accelerator = Accelerator(cpu=not torch.cuda.is_available())
    if cfg.shard_model and accelerator.num_processes == 1:
        raise ConfigError(
            "--shard-model splits the model across processes: launch with torchrun or "
            "accelerate launch and 2 or more processes (README, 'Scaling out')"
        )
    source = source or DataSource()
    examples = source.examples(cfg)  # bad data fails before anything slow or written
    output = _prepare_output(cfg, accelerator)
    torch.manual_seed(cfg.seed)
    loaded = _model_for(cfg, accelerator, examples[0] + examples[1], loaded)  # every label
    data = source.prepare(cfg, *examples, loaded, output, accelerator.device)
    cfg, said = _kind_defaults(cfg, loaded, data)
    cfg, said = _default_epochs(cfg, loaded, len(data.train_rows), said)
    if said and accelerator.is_main_process:  # what was chosen, by the flag that changes it
        say(f"{' and '.join(said.values())}: the default for {loaded.kind.name} models "
            f"({' or '.join(said)} to change)")  # fmt: skip
    starts, init_info = starting_prompts(cfg, loaded, data)
    if cfg.method == "prefix":
        _check_deep(loaded, data)
        small = [p.embedding for p in starts]
        starts = [deepen(loaded.model, p) for p in starts]  # step 0: the prompt's own keys
        layers, heads, dim = starts[0].layout
        if cfg.prefix_projection:  # small may be a saved deep prompt: then random, seeded
            small = [x if x.shape[1] == loaded.hidden_size else torch.randn(
                x.shape[0], loaded.hidden_size, generator=torch.Generator().manual_seed(cfg.seed))
                for x in small]  # fmt: skip
            starts = [ProjectedPrefix(p, x, cfg.prefix_hidden, cfg.seed + k)
                      for k, (p, x) in enumerate(zip(starts, small))]  # fmt: skip
            say(f"--prefix-projection: trained through an MLP (hidden {cfg.prefix_hidden}); "
                "the saved prefix is its output")  # fmt: skip
        say(f"--method prefix: {cfg.prompt.num_virtual_tokens} keys and values in each of "
            f"{layers} layers ({heads} x {dim}), {starts[0].embedding.numel():,} trainable "
            "values, starting from the keys/values of the --init prompt")  # fmt: skip
    if cfg.reparam == "residual":
        starts = [ResidualPrompt(p.embedding, cfg.reparam_hidden, cfg.seed + k)
                  for k, p in enumerate(starts)]  # fmt: skip
    prompts = PromptSet(data.tasks, starts, cfg.prompt_dropout)
    prompts.to(accelerator.device)
    total_steps, steps_per_epoch = planned_steps(cfg, len(data.train_rows))
    # One parameter per task: a task absent from a step has no gradient and AdamW skips it.
    # A classification model's head learns beside the prompt (its parameters come last).
    head = loaded.kind.trainable(loaded.model)
    deep = cfg.method == "prefix"
    lr = cfg.lr if cfg.lr is not None else (
        loaded.kind.default_prefix_lr if deep else loaded.kind.default_lr)  # fmt: skip
    if cfg.lr is None and accelerator.is_main_process:
        what = "deep prompts on " if deep else ""
        say(f"learning rate {lr:g}: the default for {what}{loaded.kind.name} models (--lr to "
            "change)")  # fmt: skip
    optimizer = torch.optim.AdamW(
        [*prompts.parameters(), *head], lr=lr, weight_decay=cfg.weight_decay
    )
    scheduler = get_linear_schedule_with_warmup(
        optimizer, int(cfg.warmup_ratio * total_steps), total_steps
    )
    # Not wrapped in DDP: forward_backward all-reduces the gradient itself, which keeps
    # one code path (and the shared prefix) for one process or many.
    main = accelerator.is_main_process
    trackers = open_trackers(cfg.report_to, output, output.name) if main else []
    log = MetricsLog(output / "metrics.jsonl", enabled=main, trackers=trackers)
    run = Run(cfg, accelerator, output, loaded, data, prompts, optimizer, scheduler,
              total_steps, math.ceil(total_steps / steps_per_epoch), log)  # fmt: skip
    run.init_info = init_info
    run.best, run.initial = prompts.stacked().clone(), prompts.stacked().clone()
    run.head, run.best_head = head, [p.detach().clone() for p in head]
    if head:
        say(f"classification head: {sum(p.numel() for p in head):,} trainable parameters "
            f"beside the prompt's {prompts.stacked().numel():,}")  # fmt: skip
    _resume_or_begin(run)
    return run


def _kind_defaults(
    cfg: TrainConfig, loaded: LoadedModel, data: TrainData
) -> tuple[TrainConfig, dict[str, str]]:
    """``cfg`` with the method and --select left to the model's kind filled in (recorded as
    used: a resumed run compares the method), and what to say about them. Where the kind's
    default is a deep prompt but this run cannot take one (the prompt placed inside the text
    or a chat, a model without an attention cache to hold it), the default is the
    input-layer prompt, and the run says why; only an explicit ``--method prefix`` is
    refused there. ``--select accuracy`` is refused here, before anything is measured,
    where validation counts no right answers. What it says is keyed by the flag that
    changes it."""
    told = {}
    if cfg.select is None:  # which validated prompt is kept: a classifying run's, or not
        select = loaded.kind.default_select[0 if data.classifying else 1]
        cfg = dataclasses.replace(cfg, select=select)
        told["--select"] = f"--select {select}"
    elif cfg.select == "accuracy" and not data.counts_right:
        why = ("--choice-loss full scores the whole vocabulary, not the choices; use "
               "--choice-loss restricted" if data.choices else "give --choices (a decoder) "
               "or train a classifier")  # fmt: skip
        raise ConfigError(f"--select accuracy needs labels to count right answers: {why}, "
                          "or use --select last or loss")  # fmt: skip
    if cfg.method is not None:
        return cfg, told
    method = "prefix" if cfg.prefix_projection else loaded.kind.default_method
    method = "prompt" if cfg.reparam != "none" else method
    said = f"--method {method}"
    if method == "prefix" and not cfg.prefix_projection:
        try:
            _check_deep(loaded, data)
        except ConfigError as why:
            method = "prompt"
            why = re.sub(r"^(--)?method prefix: ", "", str(why).split(";")[0])
            said = f"--method prompt (not a deep prompt: {why})"
    return dataclasses.replace(cfg, method=method), {**told, "--method": said}


def _default_epochs(cfg: TrainConfig, loaded: LoadedModel, rows: int,
                    said: dict[str, str]) -> tuple[TrainConfig, dict[str, str]]:  # fmt: skip
    """``cfg`` with the epochs left to the model's kind filled in for ``rows`` training rows
    (``kinds.epochs_for``), and what to say about it after ``said``."""
    if cfg.epochs is not None:
        return cfg, said
    per_epoch = planned_steps(cfg, rows, loaded.kind)[1]
    cfg = dataclasses.replace(cfg, epochs=epochs_for(loaded.kind, per_epoch))
    if cfg.max_steps is None:
        said = {
            **said,
            "--epochs": f"{cfg.epochs} epochs ({cfg.epochs * per_epoch} steps of {per_epoch})",
        }
    return cfg, said


def _check_deep(loaded: LoadedModel, data: TrainData) -> None:
    """Refuse, in one line each, what a deep prefix cannot do here."""
    kind = loaded.kind
    if not kind.deep_prompts:
        raise ConfigError(f"--method prefix: {kind.name} models take input-layer prompts only "
                          "for now; use --method prompt")  # fmt: skip
    kind.check_deep(loaded)
    if data.fmt.position_name != "start":
        raise ConfigError(
            f"--method prefix: a deep prefix sits before everything, but the prompt format puts "
            f"the prompt at {data.fmt.position_name!r}; leave {{soft_prompt}} out of the "
            "template and --prompt-position at start, or use --method prompt"
        )
    kv_layout(loaded.model)  # layers whose keys/values differ in shape are refused here


def planned_steps(cfg: TrainConfig, rows: int, kind=None) -> tuple[int, int]:
    """(optimizer steps of the run, steps per epoch) for ``rows`` training rows (``kind``:
    the model's, whose epochs apply when --epochs is not given)."""
    per_epoch = math.ceil(math.ceil(rows / cfg.batch_size) / cfg.grad_accum)
    epochs = cfg.epochs or epochs_for(kind if kind is not None else CAUSAL, per_epoch)
    return cfg.max_steps or epochs * per_epoch, per_epoch


def _model_for(cfg: TrainConfig, accelerator: Accelerator, examples: list[Example],
               loaded: LoadedModel | None) -> LoadedModel:  # fmt: skip
    """The base model (given, or loaded with the labels of the training and validation
    data: a rare class may be in one only), checked for what this run
    asks of its kind, on this process's device (its layers sharded with --shard-model)."""
    sharded = cfg.shard_model and loaded is None  # else a whole model given: sharded below
    if sharded:  # each process reads only its rows of each layer (softprompt.shards)
        split = functools.partial(shard_layers, accelerator=accelerator)
        loaded = load_model(cfg.model, labels=_data_labels(examples),
                            shard=(split, accelerator.device))  # fmt: skip
    loaded = loaded or load_model(cfg.model, labels=_data_labels(examples))
    loaded.kind.check_training(cfg, loaded, accelerator.num_processes, examples)
    if cfg.gradient_checkpointing and loaded.kind is not CAUSAL:
        raise ConfigError(f"--gradient-checkpointing: decoder (causal) models only for now, not "
                          f"{loaded.kind.name} models; leave it out")  # fmt: skip
    if not sharded:  # a sharded model is read onto its device already; .to() on it took
        # about 600 MB more for a moment on the embedded model (traced), for nothing
        loaded.model.to(accelerator.device)
    if cfg.shard_model and not sharded:
        shard_layers(loaded.model, accelerator)
    limit = max_positions(loaded.model)
    if limit is not None and cfg.data.max_length > limit:
        raise ConfigError(
            f"--max-length {cfg.data.max_length} is longer than the {limit} positions "
            f"{loaded.name} can hold; give --max-length {limit} or less"
        )
    return loaded


def _resume_or_begin(run: Run) -> None:
    """A resumed run restored from its newest good checkpoint; a new one logs its config."""
    if run.cfg.resume:
        folder = restore_run(run)
        run.log.truncate_after(run.state.step)
        if not run.finished:
            say(f"resuming from {folder.name}: epoch {run.current_epoch}, step {run.state.step}")
        return
    run.log.write(kind="config", config=dataclasses.asdict(run.cfg), data=run.data.info)
    run.state.task_best = [TaskBest() for _ in run.data.tasks]
