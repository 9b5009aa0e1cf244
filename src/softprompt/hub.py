"""Share a trained prompt on the Hugging Face Hub: `softprompt push DIR owner/name` uploads
the prompt's files with a model card written from its softprompt.json (base model, data,
template, metrics, the loss plot); ``hf:owner/name`` then works wherever a prompt folder
does (``artifacts.resolve_prompt_dir``)."""

from __future__ import annotations

import json
from pathlib import Path

from softprompt import __version__, kinds
from softprompt.artifacts import (
    ADAPTER_CONFIG,
    read_meta,
)
from softprompt.templates import PromptFormat


def model_card(folder: str | Path, repo_id: str) -> str:
    """README.md for the Hub: YAML front matter (base model, library, tags) and what a user
    needs: the task, template and placement, the metrics, how to use it, the loss plot."""
    folder = Path(folder)
    meta = read_meta(folder)
    adapter = json.loads((folder / ADAPTER_CONFIG).read_text()) if (
        folder / ADAPTER_CONFIG).exists() else {}  # fmt: skip
    base = adapter.get("base_model_name_or_path") or meta.get("base_model", {}).get("name")
    fmt = PromptFormat.from_meta(meta)
    data = meta.get("data") or {}
    metrics = meta.get("metrics") or {}
    n = meta.get("num_virtual_tokens") or adapter.get("num_virtual_tokens")
    lines = ["---", f"base_model: {base}", "library_name: peft", "tags:", "- softprompt",
             "- prompt-tuning", "- peft", "---", "", f"# {repo_id}", "",
             f"A soft prompt of {n} virtual tokens for [{base}](https://huggingface.co/{base}), "
             "trained with [softprompt](https://pypi.org/project/softprompt/) (prompt tuning: "
             "the base model stays frozen; only these vectors were learned).", "",
             "## Task", ""]  # fmt: skip
    lines += _task_lines(meta, fmt, data)
    if metrics:
        lines += ["", "## Metrics", "", "| metric | value |", "| --- | --- |"]
        lines += [f"| {k} | {_number(v)} |" for k, v in metrics.items()
                  if isinstance(v, (int, float, str)) and not isinstance(v, bool)]  # fmt: skip
    lines += ["", "## Use", "", "```bash", "pip install softprompt",
              f"softprompt generate --prompt hf:{repo_id} 'your input'", "```", ""]  # fmt: skip
    auto = (kinds.for_task_type(adapter.get("task_type")) or kinds.CAUSAL).auto_class.__name__
    labels = meta.get("labels") or []
    head = f", num_labels={len(labels)}" if labels else ""  # a classifier's head, one per label
    if meta.get("pooling") == "mean":
        lines += ["Its classification head reads the mean of the text's hidden states "
                  "(softprompt's `--pooling mean`); PEFT's model reads `[CLS]` and would score "
                  "it differently: load it with softprompt.", ""]  # fmt: skip
    elif fmt.peft_compatible:
        lines += ["With PEFT (the virtual tokens go first, as they were trained):", "",
                  "```python", "from peft import PeftModel",
                  f"from transformers import {auto}", "",
                  f'model = {auto}.from_pretrained("{base}"{head})',
                  f'model = PeftModel.from_pretrained(model, "{repo_id}")', "```", ""]  # fmt: skip
        if labels:
            lines += [f"Its labels, in the head's order: {', '.join(labels)}.", ""]
    else:
        lines += [f"The virtual tokens sit at '{fmt.position_name}', which PEFT cannot place: "
                  "load it with softprompt.", ""]  # fmt: skip
    if (folder / "loss.png").exists():
        lines += ["## Training", "", "![loss curve](loss.png)", ""]
    lines += [f"Made with softprompt {meta.get('softprompt_version', __version__)}."]
    return "\n".join(lines) + "\n"


def _task_lines(meta: dict, fmt: PromptFormat, data: dict) -> list[str]:
    out = []
    if data.get("train_file") or data.get("data"):
        out.append(f"- data: `{data.get('train_file') or data.get('data')}`")
    for key in ("mode", "input_field", "target_field", "train_examples", "val_examples"):
        if data.get(key) is not None:
            out.append(f"- {key.replace('_', ' ')}: {data[key]}")
    if fmt.template:
        out.append(f"- template: `{json.dumps(fmt.template)[1:-1]}`")
    if fmt.chat:
        out.append("- format: conversations rendered by the chat template")
    if fmt.system:
        out.append(f"- system message: {fmt.system!r}")
    out.append(f"- placement of the virtual tokens: {fmt.position_name}")
    choices = (meta.get("training") or {}).get("choices")
    if choices:
        out.append(f"- label words: {choices}")
    return out


def _number(value: object) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)
