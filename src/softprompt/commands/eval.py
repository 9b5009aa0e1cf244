"""`softprompt eval`: load what the flags name, measure it, write results.json."""

from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import replace
from pathlib import Path

from softprompt.artifacts import ensemble_members, load_prompt, read_meta, trained_choices
from softprompt.config import EMBEDDED_MODEL, EvalConfig, GenerateConfig
from softprompt.console import say
from softprompt.data import load_examples
from softprompt.errors import ConfigError
from softprompt.loading import LoadedModel, load_model
from softprompt.measure.baselines import few_shot
from softprompt.measure.evaluate import (
    environment,
    evaluate_examples,
)
from softprompt.outputs import claim_output, write_text
from softprompt.templates import PromptFormat


def run_eval(cfg: EvalConfig, loaded: LoadedModel | None = None) -> dict:
    """Load what ``cfg`` names, measure it, write results.json (with --output); return it."""
    folders = prompt_folders(cfg.prompt)
    meta = read_meta(folders[0]) if folders else {}
    cfg = _with_prompt_defaults(cfg, meta)
    if cfg.against_teacher:
        return _against_teacher(cfg, folders, meta, loaded)
    examples = load_examples(cfg.data.data, cfg.data)[: cfg.limit]
    if loaded is None:
        loaded = load_model(cfg.model, labels=meta.get("labels"))
    prompt, members = None, None
    if folders:
        device = loaded.model.get_input_embeddings().weight.device
        members = [load_prompt(f, loaded.model)[0].to(device) for f in folders]
        prompt = members[0]
        if len(members) == 1:
            members = None
        elif cfg.generate:
            raise ConfigError(f"--generate takes one prompt; {cfg.prompt} is an ensemble "
                              f"of {len(members)}: give one member's folder")  # fmt: skip
        else:
            say(f"ensemble of {len(members)} prompts: majority vote, mean loss")
    shots_used = 0
    if cfg.shots:
        demos = load_examples(cfg.shots_data, cfg.data)
        examples, shots_used = few_shot(
            examples,
            demos,
            loaded.tokenizer,
            cfg.shots,
            cfg.context,
            cfg.data.target_delimiter,
            cfg.seed,
        )
        say(f"few-shot: {shots_used} examples in the hard prompt (asked for {cfg.shots})")
    fmt = _format(cfg, meta, chat=examples[0].messages is not None)
    metrics, records = evaluate_examples(
        loaded, prompt, examples, cfg, cfg.choice_list, fmt, members
    )
    results = {
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "model": loaded.name,
        "prompt": cfg.prompt,
        "shots": shots_used,
        "metrics": metrics,
        "config": dataclasses.asdict(cfg),
        **environment(),
    }
    if cfg.output:
        write_results(Path(cfg.output), results, records)
    return results


def _against_teacher(cfg: EvalConfig, folders: list[Path], meta: dict,
                     loaded: LoadedModel | None) -> dict:  # fmt: skip
    """A distilled prompt against the teacher its folder records, on --data."""
    from softprompt import distill

    if len(folders) != 1:
        raise ConfigError("--against-teacher compares one distilled prompt: give --prompt DIR")
    teacher = distill.read_teacher(folders[0])
    recorded = (meta.get("data") or {}).get("teacher") or {}
    if recorded.get("sha256") != teacher.digest:
        raise ConfigError(f"{folders[0]}: its teacher record does not match the context the "
                          "prompt was distilled from (softprompt.json's sha256)")  # fmt: skip
    inputs = distill.read_inputs(cfg.data.data, cfg.data, teacher)[: cfg.limit]
    loaded = loaded or load_model(cfg.model)
    device = loaded.model.get_input_embeddings().weight.device
    prompt = load_prompt(folders[0], loaded.model)[0].to(device)
    fmt = _format(cfg, meta, chat=inputs[0].messages is not None)
    max_new = int(recorded.get("max_new_tokens") or cfg.max_new_tokens)
    report = distill.agreement(loaded, prompt, fmt, teacher, inputs,
                               GenerateConfig(max_new_tokens=max_new, seed=cfg.seed),
                               cfg.batch_size, int(recorded.get("top_k") or 32),
                               labels=trained_choices(meta))  # fmt: skip
    say(distill.describe(report))
    results = {
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "model": loaded.name,
        "prompt": cfg.prompt,
        "metrics": {"examples": len(inputs), **report},
        "config": dataclasses.asdict(cfg),
        **environment(),
    }
    if cfg.output:
        write_results(Path(cfg.output), results, report.pop("answers"))
    else:
        report.pop("answers")
    return results


def prompt_folders(spec: str | None) -> list[Path]:
    """The prompt folders --prompt names: one folder, an ensemble run's members
    (ensemble.json), or several folders, comma-separated (voted like an ensemble)."""
    if not spec:
        return []
    if "," in spec:
        return [Path(p.strip()) for p in spec.split(",") if p.strip()]
    return ensemble_members(spec) or [Path(spec)]


def _format(cfg: EvalConfig, meta: dict, chat: bool) -> PromptFormat:
    """The prompt's saved format (its template, chat template, placement), the data flags
    filling what it leaves open; without a saved format, the data flags alone."""
    if not meta.get("prompt_format"):
        return cfg.data.prompt_format(chat=chat)
    fmt = PromptFormat.from_meta(meta)
    if fmt.chat != chat:
        kind = "conversations" if fmt.chat else "input/target pairs or text"
        raise ConfigError(f"{cfg.prompt} was trained on {kind}; --data {cfg.data.data} is not")
    return replace(fmt, system=cfg.data.system) if cfg.data.system is not None else fmt


def _with_prompt_defaults(cfg: EvalConfig, meta: dict) -> EvalConfig:
    """Fill what the user left out from the prompt's softprompt.json."""
    if not meta:
        return cfg
    data = cfg.data
    if data.template is None and meta.get("template"):
        data = replace(data, template=meta["template"])
    model = cfg.model
    base = meta.get("base_model", {}).get("name")
    if model.model == EMBEDDED_MODEL and base:
        model = replace(model, model=base)
    choices = cfg.choices or meta.get("training", {}).get("choices")
    return replace(cfg, data=data, model=model, choices=choices)


def write_results(folder: Path, results: dict, records: list[dict]) -> None:
    """results.json and predictions.jsonl (one line per input, its outputs beside it), in a
    folder softprompt owns (an earlier eval's results there are replaced)."""
    claim_output(folder, "results", overwrite=True)
    write_text(folder / "results.json", json.dumps(results, indent=2, default=str) + "\n")
    lines = "".join(json.dumps(rec, ensure_ascii=False) + "\n" for rec in records)
    write_text(folder / "predictions.jsonl", lines)
    say(f"wrote {folder / 'results.json'} and {folder / 'predictions.jsonl'}")


def format_table(results: dict) -> str:
    """The headline numbers as an aligned two-column table, then the confusion matrix."""
    m = results["metrics"]
    lines = [("examples", str(m["examples"]))]
    if results.get("shots"):
        lines.append(("few-shot examples", str(results["shots"])))
    for key, label, fmt in _ROWS:
        if m.get(key) is not None:
            lines.append((label, fmt.format(m[key])))
    width = max(len(a) for a, _ in lines)
    out = [f"{a:<{width}}  {b}" for a, b in lines]
    if "confusion" in m:
        out += ["", confusion_table(m["confusion"]["labels"], m["confusion"]["matrix"])]
    return "\n".join(out)


_ROWS = [
    ("answer_match", "answers agreeing with the teacher", "{:.3f}"),
    ("token_match", "teacher tokens reproduced", "{:.3f}"),
    ("kl_per_token", "KL from the teacher (nats/token)", "{:.4f}"),
    ("teacher_metric", "teacher: exact match", "{:.3f}"),
    ("student_metric", "distilled: exact match", "{:.3f}"),
    ("teacher_prefill_tokens", "teacher prefill tokens", "{:.1f}"),
    ("student_prefill_tokens", "distilled prefill tokens", "{:.1f}"),
    ("teacher_first_token_ms", "teacher first token (ms/input)", "{:.1f}"),
    ("student_first_token_ms", "distilled first token (ms/input)", "{:.1f}"),
    ("loss", "loss (nats/target token)", "{:.4f}"),
    ("ppl", "perplexity", "{:.2f}"),
    ("accuracy", "accuracy", "{:.3f}"),
    ("macro_f1", "macro-F1", "{:.3f}"),
    ("exact_match", "exact match", "{:.3f}"),
    ("chrf", "chrF", "{:.1f}"),
    ("json_valid", "valid JSON answers", "{:.3f}"),
    ("seconds_per_example", "scoring s/example", "{:.4f}"),
    ("generate_seconds_per_example", "generation s/example", "{:.4f}"),
]


def confusion_table(labels: list[str], matrix: list[list[int]]) -> str:
    """Rows are gold labels, columns predictions."""
    corner = "gold \\ pred"
    width = max(len(x) for x in [*labels, corner])
    head = f"{corner:<{width}}  " + "  ".join(f"{x:>{width}}" for x in labels)
    body = [
        f"{g:<{width}}  " + "  ".join(f"{n:>{width}}" for n in row)
        for g, row in zip(labels, matrix)
    ]
    return "\n".join([head, *body])


def main(cfg: EvalConfig) -> None:
    """The command: measure, then print the headline table."""
    print(format_table(run_eval(cfg)))
