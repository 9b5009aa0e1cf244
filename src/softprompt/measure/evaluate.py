"""`softprompt eval`: measure one model (+ optional prompt) on a data file and record it.

The results JSON carries the config, package versions and the git commit, so a number
can always be traced to what produced it.
"""

from __future__ import annotations

import platform
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

from softprompt import __version__
from softprompt.config import EvalConfig, GenerateConfig
from softprompt.console import clock, counting, say
from softprompt.data import Example
from softprompt.loading import LoadedModel
from softprompt.measure.ensemble import vote
from softprompt.measure.metrics import accuracy as metrics_accuracy
from softprompt.measure.metrics import classification_metrics, generation_metrics, timed
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
        with _phase(f"scoring {len(choices)} choices", len(examples)):
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
        with _phase("the targets' loss", len(rows)):
            result.update(_loss(loaded, members or [prompt], rows, cfg.batch_size))
    if cfg.generate:
        gen_cfg = GenerateConfig(max_new_tokens=cfg.max_new_tokens, batch_size=cfg.batch_size)
        stop = fmt.stop_ids(tok) if chat else None
        prompts = [prompt] * len(encoded)
        with _phase(f"generating up to {cfg.max_new_tokens} tokens", len(examples)):
            outputs, seconds = timed(kind.answer, loaded, encoded, prompts, gen_cfg, True, stop)
        result["generate_seconds_per_example"] = seconds / len(examples)
        if labelled:
            result.update(generation_metrics(outputs, golds))
        for rec, out in zip(records, outputs):
            rec["generation"] = out
    return result, records


@contextmanager
def _phase(what: str, inputs: int) -> Iterator[None]:
    """A part of eval said when it starts and how long it took (on a terminal, meanwhile, a
    progress bar of its batches: rows done, elapsed, estimate)."""
    say(f"eval: {what} for {inputs} input{'s' if inputs != 1 else ''}")
    start = time.perf_counter()
    with counting(f"eval: {what}"):
        yield
    say(f"eval: {what}: done in {clock(time.perf_counter() - start)}")


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
