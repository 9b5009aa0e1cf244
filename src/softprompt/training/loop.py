"""The training loop: `train` and the prompt it returns."""

from __future__ import annotations

import time

from tqdm.auto import tqdm

from softprompt.config import TrainConfig
from softprompt.loading import LoadedModel
from softprompt.training.finish import already_finished, finish, stop_non_finite
from softprompt.training.run import TrainResult
from softprompt.training.setup import DataSource, start_run


def train(
    cfg: TrainConfig,
    loaded: LoadedModel | None = None,
    progress: bool = True,
    source: DataSource | None = None,
) -> TrainResult:
    """Train a soft prompt as ``cfg`` says and save it to ``cfg.output`` (``source``: where
    the rows come from, a data file's examples by default)."""
    run = start_run(cfg, loaded, source)
    if run.finished:  # --resume of a run that had already ended
        return already_finished(run)
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
                if not run.step(groups[state.group]):
                    stop_non_finite(run)  # saves the last good prompt and raises
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
    return finish(run, time.perf_counter() - started)


def _due(step: int, every: int | None) -> bool:
    return bool(every) and step % every == 0
