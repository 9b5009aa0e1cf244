"""`softprompt eval`: measure one model (+ optional prompt) on a data file and record it.

The results JSON carries the config, package versions and the git commit, so a number
can always be traced to what produced it.
"""

from __future__ import annotations

import dataclasses
import json
import platform
import subprocess
import time
from dataclasses import replace
from pathlib import Path

from softprompt import __version__
from softprompt.artifacts import load_prompt, read_meta
from softprompt.config import EMBEDDED_MODEL, EvalConfig, GenerateConfig
from softprompt.console import say
from softprompt.data import Example, load_examples
from softprompt.errors import ConfigError
from softprompt.loading import LoadedModel, load_model
from softprompt.measure.ensemble import ensemble_members, vote
from softprompt.measure.metrics import accuracy as metrics_accuracy
from softprompt.measure.metrics import classification_metrics, generation_metrics, timed
from softprompt.outputs import claim_output, write_text
from softprompt.prompt import SoftPrompt, max_positions
from softprompt.scoring import perplexity
from softprompt.templates import PromptFormat


def evaluate_examples(
    loaded: LoadedModel,
    prompt: SoftPrompt | None,
    examples: list[Example],
    cfg: EvalConfig,
    choices: list[str] | None,
    fmt: PromptFormat | None = None,
    members: list[SoftPrompt] | None = None,
) -> tuple[dict, list[dict]]:
    """Metrics over ``examples`` and one prediction record per example; inputs are rendered
    as ``fmt`` says (default: the data settings of ``cfg``). With ``members`` (an ensemble;
    ``prompt`` is its first) classification is their vote and the loss their mean. A
    classifier's choices are always its labels."""
    kind, tok = loaded.kind, loaded.tokenizer
    chat = examples[0].messages is not None
    fmt = fmt or cfg.data.prompt_format(chat=chat)
    encoded = [kind.encode_example(tok, fmt, ex) for ex in examples]  # refuses what it must
    limit = max_positions(loaded.model)
    if limit is not None and cfg.context > limit:  # the model's positions bound every row
        cfg = replace(cfg, context=limit)
    room = cfg.context - (prompt.num_virtual_tokens if prompt is not None else 0)
    choices = loaded.labels if kind.data_mode("pairs") == "labels" else choices
    result: dict = {"examples": len(examples)}
    records = [{"input": ex.source, "target": ex.target} for ex in examples]
    golds = [ex.target for ex in examples]
    labelled = all(g is not None for g in golds)
    delimiter = "" if chat else cfg.data.target_delimiter  # an answer follows its header
    rows = None
    if labelled:
        rows = kind.tokenize(examples, tok, room, None, fmt, delimiter, "last-assistant",
                             loaded.labels)  # fmt: skip
    if choices:
        opts = {"length_norm": cfg.length_norm, "batch_size": cfg.batch_size,
                "delimiter": delimiter, "max_tokens": room}  # fmt: skip
        scored = None if members else rows
        args = (loaded, members or [prompt], encoded, [ex.source for ex in examples], choices)
        (preds, scores, pooled), seconds = timed(_choose, *args, opts, scored)
        result.update(pooled or {})  # the rows' loss, when the choices' pass scored it
        result["seconds_per_example"] = seconds / len(examples)
        if labelled:
            result.update(classification_metrics(golds, preds, choices))
            if members:
                result["member_accuracy"] = pooled_accuracy(golds, scores, choices)
        for rec, pred, score in zip(records, preds, scores[0]):
            rec.update(prediction=pred, scores=dict(zip(choices, score)))
    if rows is not None and "loss" not in result:
        result.update(_loss(loaded, members or [prompt], rows, cfg.batch_size))
    if cfg.generate:
        gen_cfg = GenerateConfig(max_new_tokens=cfg.max_new_tokens, batch_size=cfg.batch_size)
        stop = fmt.stop_ids(tok) if chat else None
        prompts = [prompt] * len(encoded)
        outputs, seconds = timed(kind.answer, loaded, encoded, prompts, gen_cfg, True, stop)
        result["generate_seconds_per_example"] = seconds / len(examples)
        if labelled:
            result.update(generation_metrics(outputs, golds))
        for rec, out in zip(records, outputs):
            rec["generation"] = out
    return result, records


def _loss(loaded: LoadedModel, prompts: list, rows: list, batch_size: int) -> dict:
    """The loss of ``rows`` with the prompt, or the mean over an ensemble's members."""
    pad_id = loaded.tokenizer.pad_token_id
    each = [loaded.kind.evaluate_loss(loaded.model, p, rows, batch_size, pad_id) for p in prompts]
    if len(each) == 1:
        return each[0]
    losses = [e["loss"] for e in each]
    mean = sum(losses) / len(losses)
    return {**each[0], "loss": mean, "ppl": perplexity(mean), "member_losses": losses}


def _choose(loaded, prompts: list, encoded, sources, choices, opts: dict, rows) -> tuple:
    """(predictions, scores per member (members x inputs x choices), pooled loss or None):
    one member's argmax, or an ensemble's vote (``members`` mean their scores in records)."""
    each = [loaded.kind.score_choices(loaded, p, encoded, sources, choices, opts, rows)
            for p in prompts]  # fmt: skip
    scores = [s for s, _ in each]
    if len(prompts) == 1:
        preds = [choices[max(range(len(choices)), key=row.__getitem__)] for row in scores[0]]
        return preds, scores, each[0][1]
    mean = [[sum(s[i][c] for s in scores) / len(scores) for c in range(len(choices))]
            for i in range(len(sources))]  # fmt: skip
    return vote(scores, choices), [mean, *scores], None


def pooled_accuracy(golds: list[str], scores: list, choices: list[str]) -> list[float]:
    """Each ensemble member's own accuracy (``scores``: the mean first, then each member's)."""
    out = []
    for member in scores[1:]:
        preds = [choices[max(range(len(choices)), key=row.__getitem__)] for row in member]
        out.append(metrics_accuracy(golds, preds))
    return out


def run_eval(cfg: EvalConfig, loaded: LoadedModel | None = None) -> dict:
    """Load what ``cfg`` names, measure it, write results.json (with --output); return it."""
    folders = prompt_folders(cfg.prompt)
    meta = read_meta(folders[0]) if folders else {}
    cfg = _with_prompt_defaults(cfg, meta)
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
        from softprompt.measure.baselines import few_shot

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


def environment() -> dict:
    """Package versions and the git commit of this source tree (None outside a checkout)."""
    import torch
    import transformers

    try:
        here = Path(__file__).parent
        commit = subprocess.run(
            ["git", "-C", str(here), "rev-parse", "HEAD"], capture_output=True, text=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(here), "status", "--porcelain"], capture_output=True, text=True
        ).stdout.strip()
    except OSError:
        commit, dirty = "", ""
    return {
        "versions": {
            "softprompt": __version__,
            "python": platform.python_version(),
            "torch": torch.__version__,
            "transformers": transformers.__version__,
        },
        "git": {"commit": commit or None, "dirty": bool(dirty)},
    }


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
