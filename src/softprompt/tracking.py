"""A run's record: every logged value goes to one JSONL file (``metrics.jsonl``); the loss
plot, and any report, read only that file."""

from __future__ import annotations

import json
import os
from pathlib import Path

from softprompt import outputs
from softprompt.console import warn
from softprompt.errors import DataError


class MetricsLog:
    """Append-only ``metrics.jsonl``: one JSON object per logged event, flushed at once."""

    def __init__(self, path: Path, enabled: bool = True):
        self.path, self.enabled = path, enabled
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

    def truncate_after(self, step: int) -> None:
        """Drop what was logged after ``step`` (a resumed run logs those steps again)."""
        self.records = [
            r for r in self.records if r.get("step", 0) <= step or r["kind"] == "config"
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
            records.append(json.loads(line))
        except json.JSONDecodeError:
            if i < len(lines):
                raise DataError(
                    f"{metrics}:{i}: not valid JSON; the metrics file is damaged"
                ) from None
            warn(f"{metrics}:{i}: the last line is cut off (the run stopped while writing it); "
                 "it is left out")  # fmt: skip
    return records


def plot_metrics(metrics: Path, png: Path) -> Path:
    """Training loss per step (and a moving average) with validation loss on top (and each
    task's, in a multi-task run)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_records(metrics)
    train = [(r["step"], r["loss"]) for r in records if r["kind"] == "train"]
    val = [(r["step"], r["loss"]) for r in records if r["kind"] == "val"]
    base = [r["loss"] for r in records if r["kind"] == "base"]
    tasks: dict[str, list[tuple[int, float]]] = {}
    for r in records:
        if r["kind"] == "task_val":
            tasks.setdefault(r["task"], []).append((r["step"], r["loss"]))
    fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    if train:
        steps, losses = zip(*train)
        ax.plot(steps, losses, color="#9ecae1", lw=1, label="train loss (per step)")
        k = max(1, len(losses) // 20)
        smooth = [
            sum(losses[max(0, i - k + 1) : i + 1]) / len(losses[max(0, i - k + 1) : i + 1])
            for i in range(len(losses))
        ]
        ax.plot(steps, smooth, color="#2171b5", lw=2, label=f"train loss (mean of {k})")
    if val:
        label = "validation loss (all tasks)" if tasks else "validation loss"
        ax.plot(*zip(*val), "o-", color="#e6550d", lw=2, label=label)
    for i, (task, points) in enumerate(sorted(tasks.items())):  # multi-task runs
        ax.plot(
            *zip(*points), "s--", lw=1.2, color=plt.cm.tab10((i + 2) % 10), label=f"val: {task}"
        )
    if base:
        ax.axhline(base[0], color="#636363", ls="--", lw=1, label="base model, no prompt (val)")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("cross-entropy (nats / target token)")
    ax.set_title("softprompt training")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    try:
        outputs.atomic_write(png, lambda p: fig.savefig(p, format="png"))
    finally:
        plt.close(fig)
    return png
