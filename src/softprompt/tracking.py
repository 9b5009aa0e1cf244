"""A run's record: every logged value goes to one JSONL file (``metrics.jsonl``); the loss
plot, and any report, read only that file. ``--report-to`` also sends each record to the
trackers a team uses (TensorBoard, Weights & Biases, MLflow, Trackio through accelerate's
trackers, or a CSV file): the config once, every numeric value at its step, the loss plot at
the end."""

from __future__ import annotations

import csv
import importlib.util
import json
import os
from pathlib import Path

from softprompt import outputs
from softprompt.console import warn
from softprompt.errors import ConfigError, DataError

REPORT_TO = ("none", "tensorboard", "wandb", "mlflow", "trackio", "csv")
# tracker -> (the module it needs, how to install it)
NEEDS = {
    "tensorboard": ("tensorboard", "pip install 'softprompt[track]'"),
    "wandb": ("wandb", "pip install wandb"),
    "mlflow": ("mlflow", "pip install mlflow"),
    "trackio": ("trackio", "pip install trackio"),
}


class MetricsLog:
    """Append-only ``metrics.jsonl``: one JSON object per logged event, flushed at once."""

    def __init__(self, path: Path, enabled: bool = True, trackers: list | None = None):
        self.path, self.enabled = path, enabled
        self.trackers = trackers or []  # also sent every record (``--report-to``)
        self.records: list[dict] = []
        if enabled and path.exists():
            self.records = read_records(path)

    def write(self, **record) -> None:
        self.records.append(record)
        if not self.enabled:
            return
        if len(self.records) == 1:
            outputs.record(self.path)
        try:
            with self.path.open("a", encoding="utf-8") as fh:
                fh.write(json.dumps(record, default=str) + "\n")
                fh.flush()
                os.fsync(fh.fileno())
        except OSError as err:  # a full disk leaves at most a torn last line, trimmed on resume
            raise outputs.disk_error(err, self.path) from None
        for tracker in self.trackers:
            tracker.write(record)

    def close(self, plot: Path | None = None) -> None:
        """Send the loss plot to the trackers and close them."""
        for tracker in self.trackers:
            tracker.close(plot if plot is not None and plot.exists() else None)
        self.trackers = []

    def truncate_after(self, step: int) -> None:
        """Drop what was logged after ``step`` (a resumed run logs those steps again)."""
        self.records = [
            r for r in self.records if r.get("step", 0) <= step or r.get("kind") == "config"
        ]
        if self.enabled:
            text = "".join(json.dumps(r, default=str) + "\n" for r in self.records)
            outputs.write_text(self.path, text)


def read_records(metrics: Path) -> list[dict]:
    """Every record of a metrics.jsonl file. A torn last line (a run stopped mid-write, e.g.
    by a full disk) is left out with a warning; damage anywhere else is an error."""
    lines = [
        x for x in metrics.read_text(encoding="utf-8", errors="replace").splitlines() if x.strip()
    ]
    records = []
    for i, line in enumerate(lines, 1):
        try:
            records.append(_record(line))
        except (ValueError, RecursionError) as err:  # JSONDecodeError is a ValueError
            if i < len(lines):
                raise DataError(f"{metrics}:{i}: {err}; the metrics file is damaged") from None
            warn(f"{metrics}:{i}: the last line is cut off or damaged ({err}); it is left out")
    return records


LOSS_KINDS = ("train", "val", "task_val", "base")


def _record(line: str) -> dict:
    """One metrics record, checked: an object with a kind, an integer step where it has one,
    and a number as the loss of a loss record (what plots and --resume read)."""
    try:
        record = json.loads(line)
    except json.JSONDecodeError:
        raise ValueError("not valid JSON") from None
    if not isinstance(record, dict) or not isinstance(record.get("kind"), str):
        raise ValueError("not a record with a 'kind'")
    if "step" in record and (type(record["step"]) is not int or record["step"] < 0):
        raise ValueError(f"step {record['step']!r} is not a step number")
    if record["kind"] in LOSS_KINDS and (
        "step" not in record or not isinstance(record.get("loss"), (int, float))
    ):
        raise ValueError(f"a {record['kind']} record without a step and a loss")
    return record


def plot_metrics(metrics: Path, png: Path) -> Path:
    """The run's loss curve, from metrics.jsonl alone: training loss per step (and its moving
    average), validation loss (and each task's in a multi-task run), the base model's level,
    the best validation step and the epoch boundaries, on a log axis so the late steps stay
    readable; titled with the model and the data."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_records(metrics)
    fig, ax = plt.subplots(figsize=(7.5, 4.2), dpi=110)
    _plot_train(ax, [r for r in records if r["kind"] == "train"])
    _plot_validation(ax, records, plt.cm.tab10)
    ax.set_yscale("log")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("cross-entropy, nats / target token (log)")
    ax.set_title(_title(records), fontsize=10)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    fig.tight_layout()
    try:
        outputs.atomic_write(png, lambda p: fig.savefig(p, format="png"))
    finally:
        plt.close(fig)
    return png


def _plot_train(ax, train: list[dict]) -> None:
    if not train:
        return
    steps, losses = [r["step"] for r in train], [r["loss"] for r in train]
    ax.plot(steps, losses, color="#9ecae1", lw=1, label="train loss (per step)")
    k = max(1, len(losses) // 20)
    smooth = [sum(losses[max(0, i - k + 1) : i + 1]) / len(losses[max(0, i - k + 1) : i + 1])
              for i in range(len(losses))]  # fmt: skip
    ax.plot(steps, smooth, color="#2171b5", lw=2, label=f"train loss (mean of {k})")
    ends = [a["step"] for a, b in zip(train, train[1:]) if b.get("epoch") != a.get("epoch")]
    for i, step in enumerate(ends):  # where each epoch ends
        ax.axvline(step, color="#bdbdbd", ls=":", lw=1, label="epoch boundary" if i == 0 else None)


def _plot_validation(ax, records: list[dict], colours) -> None:
    val = [(r["step"], r["loss"]) for r in records if r["kind"] == "val"]
    tasks: dict[str, list[tuple[int, float]]] = {}
    for r in records:
        if r["kind"] == "task_val":
            tasks.setdefault(r["task"], []).append((r["step"], r["loss"]))
    if val:
        ax.plot(*zip(*val), "o-", color="#e6550d", lw=2,
                label="validation loss (all tasks)" if tasks else "validation loss")  # fmt: skip
        step, loss = min(val[1:] or val, key=lambda p: p[1])  # the initial prompt is not a pick
        ax.plot([step], [loss], marker="*", ms=14, color="#d62728", ls="none",
                label=f"best: {loss:.4f} at step {step}")  # fmt: skip
    for i, (task, points) in enumerate(sorted(tasks.items())):
        ax.plot(*zip(*points), "s--", lw=1.2, color=colours((i + 2) % 10), label=f"val: {task}")
    base = [r["loss"] for r in records if r["kind"] == "base"]
    if base:
        ax.axhline(base[0], color="#636363", ls="--", lw=1, label="base model, no prompt (val)")


def _title(records: list[dict]) -> str:
    config = next((r for r in records if r["kind"] == "config"), {}).get("config", {})
    model = (config.get("model") or {}).get("model") or "model"
    data = "/".join(Path((config.get("data") or {}).get("data") or "data").parts[-2:])
    return f"softprompt: {Path(str(model)).name} on {data}"


# --- trackers (--report-to) --------------------------------------------------------------


def report_targets(report_to: str) -> list[str]:
    """``--report-to`` as a list of trackers ('tensorboard,csv'; 'none' for none), each
    checked: known, and its package installed (else a ConfigError naming the install)."""
    names = [n.strip() for n in report_to.split(",") if n.strip()]
    for name in names:
        if name not in REPORT_TO:
            raise ConfigError(f"--report-to must name some of {', '.join(REPORT_TO)}, not {name!r}")
        module, install = NEEDS.get(name, (None, ""))
        if module and importlib.util.find_spec(module) is None:
            raise ConfigError(f"--report-to {name} needs the {module} package: {install}")
    return [n for n in names if n != "none"]


def flat_values(record: dict) -> tuple[int | None, dict[str, float]]:
    """(step, {kind/name: number}) of a metrics record; a task's values under its name."""
    kind = record.get("kind", "event")
    prefix = f"{kind}/{record['task']}" if "task" in record else kind
    values = {
        f"{prefix}/{k}": float(v)
        for k, v in record.items()
        if k not in ("kind", "step", "task") and isinstance(v, (int, float))
        and not isinstance(v, bool)
    }  # fmt: skip
    return record.get("step"), values


def flat_config(config: dict, prefix: str = "") -> dict[str, object]:
    """A nested config as {a.b: scalar} (what trackers store as hyperparameters)."""
    out: dict[str, object] = {}
    for k, v in config.items():
        if isinstance(v, dict):
            out.update(flat_config(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v if isinstance(v, (bool, int, float, str)) else str(v)
    return out


class AccelerateTracker:
    """One of accelerate's trackers fed metrics records."""

    def __init__(self, name: str, output: Path, run_name: str):
        from accelerate import tracking

        if name == "tensorboard":
            self.tracker = tracking.TensorBoardTracker("tensorboard", output)
            outputs.record(output / "tensorboard")
        elif name == "wandb":
            self.tracker = tracking.WandBTracker(run_name, dir=str(output))
        elif name == "mlflow":
            self.tracker = tracking.MLflowTracker(run_name, logging_dir=str(output))
        else:
            self.tracker = tracking.TrackioTracker(run_name)
        if hasattr(self.tracker, "start"):
            self.tracker.start()

    def write(self, record: dict) -> None:
        if record.get("kind") == "config":
            config = {"config": record.get("config") or {}, "data": record.get("data") or {}}
            self.tracker.store_init_configuration(flat_config(config))
            return
        step, values = flat_values(record)
        if values:
            self.tracker.log(values, step=step)

    def close(self, plot: Path | None) -> None:
        if plot is not None and hasattr(self.tracker, "log_images"):
            import matplotlib.image

            image = matplotlib.image.imread(str(plot))[..., :3]  # (H, W, 3) floats in [0, 1]
            self.tracker.log_images({"loss_plot": image[None]}, step=None, dataformats="NHWC")
        self.tracker.finish()


class CsvTracker:
    """``metrics.csv`` beside metrics.jsonl: one row per value (step, kind, name, value), for
    spreadsheets and tools that read nothing else."""

    def __init__(self, output: Path):
        self.path = output / "metrics.csv"
        outputs.record(self.path)
        with self.path.open("w", newline="", encoding="utf-8") as fh:
            csv.writer(fh).writerow(["step", "kind", "name", "value"])

    def write(self, record: dict) -> None:
        step, values = flat_values(record)
        with self.path.open("a", newline="", encoding="utf-8") as fh:
            writer = csv.writer(fh)
            for key, value in values.items():
                kind, _, name = key.rpartition("/")
                writer.writerow(["" if step is None else step, kind, name, repr(value)])

    def close(self, plot: Path | None) -> None:
        pass


def open_trackers(report_to: str, output: Path, run_name: str) -> list:
    """The trackers ``--report-to`` names, started, writing into ``output``."""
    return [
        CsvTracker(output) if name == "csv" else AccelerateTracker(name, output, run_name)
        for name in report_targets(report_to)
    ]
