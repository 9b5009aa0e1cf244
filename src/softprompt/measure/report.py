"""The compare report: report.md and a self-contained report.html, made from the
comparison's metrics.jsonl alone."""

from __future__ import annotations

from pathlib import Path

from softprompt.outputs import atomic_write, write_text
from softprompt.tracking import read_records

METHOD_NAMES = {
    "zero-shot": "Zero-shot (template)",
    "few-shot": "Few-shot (hard prompt)",
    "prompt-tuning": "Prompt tuning",
    "prefix-tuning": "Prefix tuning (deep prompt)",
    "lora": "LoRA (PEFT)",
    "full-ft": "Full fine-tuning",
}
# One colour and marker per method in every plot.
STYLE = {
    "zero-shot": ("#7f7f7f", "o"),
    "few-shot": ("#bcbd22", "s"),
    "prompt-tuning": ("#1f77b4", "D"),
    "prefix-tuning": ("#9467bd", "P"),
    "lora": ("#ff7f0e", "^"),
    "full-ft": ("#2ca02c", "v"),
}
COLUMNS = [
    "Method",
    "Quality",
    "Trainable params",
    "Train time",
    "Peak memory",
    "Artifact",
    "Inference / example",
]


def _size(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GB"


def quality_text(q: dict) -> str:
    """'accuracy 0.915 (macro-F1 0.914)' for classification, else the loss."""
    if "accuracy" in q:
        return f"accuracy {q['accuracy']:.3f} (macro-F1 {q['macro_f1']:.3f})"
    return f"loss {q['loss']:.4f}"


def table_rows(results: list[dict]) -> list[list[str]]:
    """One row of strings per method, in the order of COLUMNS."""
    rows = []
    for r in results:
        name = METHOD_NAMES.get(r["method"], r["method"])
        if r.get("shots") is not None:
            name += f", k={r['shots']}"
        memory = f"{r['peak_memory_mb']:.0f} MB" if r.get("peak_memory_mb") is not None else "-"
        artifact = _size(r["artifact_bytes"]) if r["artifact_bytes"] else "none"
        if r["method"] == "full-ft":
            artifact += " (weights, not written)"
        rows.append(
            [
                name,
                quality_text(r["quality"]),
                f"{r['trainable_params']:,}",
                f"{r['train_seconds']:.1f} s",
                memory,
                artifact,
                f"{r['seconds_per_example'] * 1000:.1f} ms",
            ]
        )
    return rows


def plot_compare(records: list[dict], folder: Path) -> dict[str, Path]:
    """loss_curves.png (training loss per step per trained method) and quality_cost.png."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    results = [r for r in records if r["kind"] == "result"]
    fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    for method in dict.fromkeys(r["method"] for r in records if r["kind"] == "train"):
        pts = [
            (r["step"], r["loss"])
            for r in records
            if r["kind"] == "train" and r["method"] == method
        ]
        ax.plot(*zip(*pts), lw=1.8, color=STYLE[method][0], label=METHOD_NAMES[method])
    ax.set(xlabel="optimizer step", ylabel="training loss (log)", title="Training loss per step")
    if all(r["loss"] > 0 for r in records if r["kind"] == "train"):
        ax.set_yscale("log")  # the later steps stay readable beside the first ones
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend()
    paths = {"loss": folder / "loss_curves.png", "cost": folder / "quality_cost.png"}
    fig.tight_layout()
    atomic_write(paths["loss"], lambda p: fig.savefig(p, format="png"))
    plt.close(fig)

    key = "accuracy" if results and "accuracy" in results[0]["quality"] else "loss"
    fig, axes = plt.subplots(1, 2, figsize=(10, 4.2), dpi=110)
    panels = [
        ("trainable_params", "trainable parameters (symlog)"),
        ("train_seconds", "training time, s (symlog)"),
    ]
    for ax, (field, label) in zip(axes, panels):
        for r in results:  # a legend, not labels: methods with no training share x = 0
            colour, marker = STYLE[r["method"]]
            ax.scatter(
                r[field],
                r["quality"][key],
                s=70,
                color=colour,
                marker=marker,
                label=METHOD_NAMES[r["method"]],
                alpha=0.85,
            )
        ax.set_xscale("symlog", linthresh=1)
        ax.set(xlabel=label, ylabel=key)
        ax.grid(alpha=0.3)
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=len(labels), frameon=False)
    fig.suptitle(f"Quality ({key}) against cost")
    fig.tight_layout(rect=(0, 0.08, 1, 1))
    atomic_write(paths["cost"], lambda p: fig.savefig(p, format="png"))
    plt.close(fig)
    return paths


def write_compare_report(folder: Path) -> tuple[Path, Path]:
    """report.md and report.html of a `compare` run, from its metrics.jsonl alone."""
    records = read_records(folder / "metrics.jsonl")
    config = next(r for r in records if r["kind"] == "config")
    results = [r for r in records if r["kind"] == "result"]
    inspect = next((r for r in records if r["kind"] == "inspect"), None)
    plots = plot_compare(records, folder)
    rows = table_rows(results)
    md, html = folder / "report.md", folder / "report.html"
    write_text(md, _markdown(config, results, rows, inspect, plots))
    write_text(html, _html(config, results, rows, inspect, plots))
    return md, html


def _setup_lines(config: dict) -> list[str]:
    c = config["config"]
    return [
        f"Base model: `{config['model']}`. Training data: `{c['data']['data']}`; test data: "
        f"`{c['test']}`" + (f" (first {c['limit']} examples)" if c.get("limit") else "") + ".",
        f"Trained methods get {c['steps']} optimizer steps of batch {c['batch_size']}; learning "
        f"rates: prompt {c['prompt_lr']}, LoRA {c['lora_lr']} (rank {c['lora_r']}), full "
        f"fine-tuning {c['full_lr']}. "
        + (
            "Prompt tuning keeps its best validation checkpoint; the others their last step."
            if c["data"].get("validation") or c["data"].get("val_fraction")
            else "Every method keeps its last step (no validation data)."
        )
        + (
            f" Choices: {c['choices']}; training loss: {c.get('choice_loss', 'restricted')}."
            if c.get("choices")
            else ""
        ),
        "Peak memory is the increase over the loaded base model while the method ran (process "
        "memory on CPU). Inference time is per test example, scoring every choice.",
        f"softprompt {config['versions']['softprompt']}, torch {config['versions']['torch']}, "
        f"transformers {config['versions']['transformers']}, git {config['git']['commit']}"
        + (" (uncommitted changes)" if config["git"]["dirty"] else "")
        + ".",
    ]


def _inspect_rows(inspect: dict) -> list[list[str]]:
    return [
        [
            str(t["index"]),
            f"{t['norm']:.2f}",
            f"{t['norm_percentile']:.0f}",
            f"{t.get('drift', 0):.2f}",
            ", ".join(f"{p!r} {s:.2f}" for p, s in t["nearest"][:3]),
        ]
        for t in inspect["tokens"]
    ]


INSPECT_COLUMNS = ["Token", "Norm", "Norm percentile", "Drift", "Nearest tokens (cosine)"]


def _norm_line(inspect: dict) -> str:
    v = inspect["vocab_norm"]
    return (
        f"Real token norms: median {v['median']:.2f} (5th to 95th percentile "
        f"{v['p5']:.2f} to {v['p95']:.2f}); drift is the distance from the initial value."
    )


def _md_table(columns: list[str], rows: list[list[str]]) -> list[str]:
    cells = [[c.replace("|", "\\|") for c in row] for row in rows]
    return ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)] + [
        "| " + " | ".join(r) + " |" for r in cells
    ]


def _markdown(config, results, rows, inspect, plots) -> str:
    out = ["# softprompt compare", "", *_setup_lines(config), ""]
    out += _md_table(COLUMNS, rows)
    out += ["", f"![Training loss]({plots['loss'].name})", ""]
    out += [f"![Quality against cost]({plots['cost'].name})"]
    if inspect:
        out += ["", "## What the tuned prompt looks like", ""]
        out += _md_table(INSPECT_COLUMNS, _inspect_rows(inspect))
        out += ["", _norm_line(inspect), "", f"*{inspect['caveat']}*"]
    return "\n".join(out) + "\n"


_CSS = """
body { font-family: system-ui, sans-serif; max-width: 1100px; margin: 2em auto; padding: 0 1em;
       color: #222; line-height: 1.45 }
table { border-collapse: collapse; width: 100%; margin: 1em 0 }
th, td { padding: .45em .7em; border-bottom: 1px solid #ddd; text-align: right }
th:first-child, td:first-child, td:last-child { text-align: left }
th { background: #f3f5f8 }
figure { margin: 1.5em 0 } img { max-width: 100%; border: 1px solid #eee }
figcaption, .note { color: #555; font-size: .92em }
"""
# Marks the body with how many plots decoded, so a headless browser test can check it.
_ONLOAD = """
window.addEventListener('load', function () {
  var imgs = document.images, ok = 0;
  for (var k = 0; k < imgs.length; k++) { if (imgs[k].complete && imgs[k].naturalWidth > 0) ok++; }
  document.body.setAttribute('data-plots-loaded', ok + '/' + imgs.length);
});
"""


def _html_table(columns: list[str], rows: list[list[str]]) -> str:
    from html import escape

    head = "".join(f"<th>{escape(c)}</th>" for c in columns)
    body = "".join("<tr>" + "".join(f"<td>{escape(x)}</td>" for x in r) + "</tr>" for r in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _html_figure(path: Path, caption: str) -> str:
    import base64
    from html import escape

    data = base64.b64encode(path.read_bytes()).decode()  # self-contained: no external files
    return (
        f'<figure><img src="data:image/png;base64,{data}" alt="{escape(caption)}">'
        f"<figcaption>{escape(caption)}</figcaption></figure>"
    )


def _html(config, results, rows, inspect, plots) -> str:
    from html import escape

    parts = [
        "<!doctype html><html><head><meta charset='utf-8'>",
        f"<title>softprompt compare</title><style>{_CSS}</style></head><body>",
        "<h1>softprompt compare</h1>",
        *(f"<p class='note'>{escape(x.replace('`', ''))}</p>" for x in _setup_lines(config)),
        _html_table(COLUMNS, rows),
        _html_figure(plots["loss"], "Training loss per step"),
        _html_figure(plots["cost"], "Quality against cost"),
    ]
    if inspect:
        parts += [
            "<h2>What the tuned prompt looks like</h2>",
            _html_table(INSPECT_COLUMNS, _inspect_rows(inspect)),
            f"<p class='note'>{escape(_norm_line(inspect))}</p>",
            f"<p class='note'><em>{escape(inspect['caveat'])}</em></p>",
        ]
    parts.append(f"<script>{_ONLOAD}</script></body></html>")
    return "\n".join(parts)
