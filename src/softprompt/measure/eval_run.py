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

from softprompt import __version__, encoder, seq2seq
from softprompt.artifacts import load_prompt, read_meta
from softprompt.config import EMBEDDED_MODEL, EvalConfig, GenerateConfig
from softprompt.console import say
from softprompt.data import Example, load_examples, tokenize
from softprompt.errors import ConfigError
from softprompt.generation import encode_example, generate_encoded, generate_other
from softprompt.loading import LoadedModel, load_model, max_positions
from softprompt.loss import evaluate_loss, perplexity
from softprompt.measure.ensemble import ensemble_classify, ensemble_members
from softprompt.measure.evaluate import (
    classification_metrics,
    classify,
    generation_metrics,
    loss_scoring,
    timed,
)
from softprompt.measure.metrics import accuracy as metrics_accuracy
from softprompt.outputs import claim_output, write_text
from softprompt.prompt import SoftPrompt
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
    ``prompt`` is its first) classification is their vote and the loss their mean."""
    if loaded.kind != "causal":
        return evaluate_other(loaded, prompt, examples, cfg, choices, fmt)
    model, tok = loaded.model, loaded.tokenizer
    chat = examples[0].messages is not None
    fmt = fmt or cfg.data.prompt_format(chat=chat)
    delimiter = "" if chat else cfg.data.target_delimiter  # an answer follows its header
    n_virtual = prompt.num_virtual_tokens if prompt is not None else 0
    limit = max_positions(model)
    if limit is not None and cfg.context > limit:  # the model's positions bound every row
        cfg = replace(cfg, context=limit)
    result: dict = {"examples": len(examples)}
    records = [{"input": ex.source, "target": ex.target} for ex in examples]
    golds = [ex.target for ex in examples]
    rows = None
    if all(g is not None for g in golds):
        rows = tokenize(examples, tok, cfg.context - n_virtual, delimiter, None, fmt,
                        "last-assistant")  # fmt: skip
        if members:
            each = [evaluate_loss(model, m, rows, cfg.batch_size, tok.pad_token_id)
                    for m in members]  # fmt: skip (members[0] is ``prompt``)
            losses = [e["loss"] for e in each]
            result.update(each[0], loss=sum(losses) / len(losses), member_losses=losses)
            result["ppl"] = perplexity(result["loss"])
        elif not choices:
            result.update(evaluate_loss(model, prompt, rows, cfg.batch_size, tok.pad_token_id))
    sources = [ex.source for ex in examples]
    encoded = [encode_example(tok, fmt, ex) for ex in examples]
    if choices:
        kwargs = {"length_norm": cfg.length_norm, "batch_size": cfg.batch_size}
        kwargs.update(delimiter=delimiter, max_tokens=cfg.context - n_virtual, contexts=encoded)
        if members:
            (preds, scores, each), seconds = timed(
                ensemble_classify, model, tok, members, sources, choices, **kwargs
            )
            if all(g is not None for g in golds):
                result["member_accuracy"] = [metrics_accuracy(golds, p) for p in each]
        else:
            # The loss of each labelled row is scored in the choices' pass over its input.
            extra = [loss_scoring(r) for r in rows] if rows is not None else None
            (preds, scores), seconds = timed(classify, model, tok, prompt, sources, choices,
                                             extra=extra, **kwargs)  # fmt: skip
            if rows is not None:
                result.update(_pooled_loss(model, prompt, rows, extra, cfg.batch_size, tok))
        result["seconds_per_example"] = seconds / len(examples)
        if all(g is not None for g in golds):
            result.update(classification_metrics(golds, preds, choices))
        for rec, pred, score in zip(records, preds, scores):
            rec.update(prediction=pred, scores=dict(zip(choices, score)))
    if cfg.generate:
        gen_cfg = GenerateConfig(max_new_tokens=cfg.max_new_tokens, batch_size=cfg.batch_size)
        stop = fmt.stop_ids(tok) if chat else None
        outputs, seconds = timed(generate_encoded, loaded, encoded, prompt, gen_cfg, True, stop)
        result["generate_seconds_per_example"] = seconds / len(examples)
        if all(g is not None for g in golds):
            result.update(generation_metrics(outputs, golds))
        for rec, out in zip(records, outputs):
            rec["generation"] = out
    return result, records


def _pooled_loss(model, prompt, rows, scored, batch_size: int, tok) -> dict:
    """Mean loss over labelled tokens from the rows the choices' pass scored (their
    (log-probability, tokens)) and, for any whose input differed, a pass of their own."""
    apart = [r for r, s in zip(rows, scored) if not isinstance(s, tuple)]
    total = -sum(s[0] for s in scored if isinstance(s, tuple))
    count = sum(s[1] for s in scored if isinstance(s, tuple))
    if apart:
        more = evaluate_loss(model, prompt, apart, batch_size, tok.pad_token_id)
        total, count = total + more["loss"] * more["tokens"], count + more["tokens"]
    mean = total / max(count, 1)
    return {"loss": mean, "ppl": perplexity(mean), "tokens": count}


def evaluate_other(
    loaded: LoadedModel,
    prompt: SoftPrompt | None,
    examples: list[Example],
    cfg: EvalConfig,
    choices: list[str] | None,
    fmt: PromptFormat | None = None,  # unused: the examples' sources are rendered already
) -> tuple[dict, list[dict]]:
    """``evaluate_examples`` for a seq2seq model (target loss; choices scored as the decoder's
    output, the encoder run once per input; generations) or a classifier (loss, accuracy,
    macro-F1 and confusion over its labels)."""
    model, tok = loaded.model, loaded.tokenizer
    if examples[0].messages is not None:
        raise ConfigError(f"a {loaded.kind} model takes input/target pairs, not conversations")
    if any(ex.head is not None for ex in examples):
        raise ConfigError(
            "{soft_prompt} inside a template is for causal LMs: a seq2seq or classification "
            "model takes the prompt before its whole input"
        )
    n_virtual = prompt.num_virtual_tokens if prompt is not None else 0
    limit = cfg.context - n_virtual
    result: dict = {"examples": len(examples)}
    records = [{"input": ex.source, "target": ex.target} for ex in examples]
    golds = [ex.target for ex in examples]
    sources = [ex.source for ex in examples]
    labelled = all(g is not None for g in golds)
    if loaded.kind == "classify":
        if labelled:
            rows = encoder.tokenize_labels(examples, tok, limit, loaded.labels)
            result.update(evaluate_loss(model, prompt, rows, cfg.batch_size, tok.pad_token_id))
        probs, seconds = timed(encoder.predict, model, tok, prompt, sources, cfg.batch_size)
        preds = [loaded.labels[max(range(len(p)), key=p.__getitem__)] for p in probs]
        result["seconds_per_example"] = seconds / len(examples)
        if labelled:
            result.update(classification_metrics(golds, preds, loaded.labels))
        for rec, pred, p in zip(records, preds, probs):
            rec.update(prediction=pred, scores=dict(zip(loaded.labels, p)))
        return result, records
    if labelled:
        rows = seq2seq.tokenize_pairs(examples, tok, limit)
        result.update(evaluate_loss(model, prompt, rows, cfg.batch_size, tok.pad_token_id))
    if choices:
        scores, seconds = timed(seq2seq.score_choices, model, tok, prompt, sources, choices)
        if cfg.length_norm:
            lengths = [len(seq2seq.target_ids(tok, c)) for c in choices]
            scores = [[s / n for s, n in zip(row, lengths)] for row in scores]
        preds = [choices[max(range(len(choices)), key=row.__getitem__)] for row in scores]
        result["seconds_per_example"] = seconds / len(examples)
        if labelled:
            result.update(classification_metrics(golds, preds, choices))
        for rec, pred, score in zip(records, preds, scores):
            rec.update(prediction=pred, scores=dict(zip(choices, score)))
    if cfg.generate:
        gen_cfg = GenerateConfig(max_new_tokens=cfg.max_new_tokens, batch_size=cfg.batch_size)
        outputs, seconds = timed(generate_other, loaded, sources, prompt, gen_cfg)
        result["generate_seconds_per_example"] = seconds / len(examples)
        if labelled:
            result.update(generation_metrics(outputs, golds))
        for rec, out in zip(records, outputs):
            rec["generation"] = out
    return result, records


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
