"""Evaluation: metrics on hand-computed cases, choice log-likelihoods checked against a plain
forward pass, the classification-mode loss, few-shot fitting, and `softprompt eval`."""

from __future__ import annotations

import json
import math
import sys

import pytest
import torch

from softprompt import console
from softprompt.cli import main
from softprompt.commands.eval import run_eval
from softprompt.config import DataConfig, EvalConfig, ModelConfig
from softprompt.data import Example
from softprompt.loading import load_model
from softprompt.loss import lm_loss
from softprompt.measure import metrics
from softprompt.measure.baselines import few_shot
from softprompt.prompt import SoftPrompt
from softprompt.rows import Row, collate
from softprompt.scoring import (
    choice_first_ids,
    classify,
    continuation_rows,
    evaluate_loss,
    row_logprobs,
)
from tests.conftest import random_prompt

GOLD = ["a", "a", "a", "b", "b", "c"]
PRED = ["a", "a", "b", "b", "c", "c"]


def test_classification_metrics_by_hand():
    """a: TP2 FP0 FN1 -> F1 4/5; b: TP1 FP1 FN1 -> 1/2; c: TP1 FP1 FN0 -> 2/3."""
    assert metrics.accuracy(GOLD, PRED) == pytest.approx(4 / 6)
    assert metrics.per_label_f1(GOLD, PRED, ["a", "b", "c"]) == pytest.approx(
        {"a": 0.8, "b": 0.5, "c": 2 / 3}
    )
    assert metrics.macro_f1(GOLD, PRED, ["a", "b", "c"]) == pytest.approx((0.8 + 0.5 + 2 / 3) / 3)
    assert metrics.confusion_matrix(GOLD, PRED, ["a", "b", "c"]) == [
        [2, 1, 0],
        [0, 1, 1],
        [0, 0, 1],
    ]
    # A label never gold nor predicted scores 0 and still counts in the macro mean.
    assert metrics.macro_f1(["a"], ["a"], ["a", "z"]) == pytest.approx(0.5)


def test_generation_metrics_by_hand():
    assert metrics.exact_match([" cold ", "big  dog", "up"], ["cold", "big dog", "down"]) == (
        pytest.approx(2 / 3)
    )
    assert metrics.chrf(["the cat sat"], ["the cat sat"]) == pytest.approx(100.0)
    assert metrics.chrf(["xyz"], ["abc"]) == pytest.approx(0.0)
    partial = metrics.chrf(["the cat sat"], ["the cat sat down"])
    assert 0 < partial < 100
    assert metrics.first_line("  cold\nWord: hot") == "cold"


@pytest.fixture(scope="module")
def tiny(model_dirs):
    return load_model(ModelConfig(model=str(model_dirs["llama"])))


@torch.no_grad()
def _manual_logprob(model, tok, prompt, source, continuation):
    """log P(continuation | prompt, source) from one plain full forward pass."""
    src = tok(source)["input_ids"]
    tgt = tok(" " + continuation, add_special_tokens=False)["input_ids"]
    ids = torch.tensor([src + tgt])
    embeds = model.get_input_embeddings()(ids)
    if prompt is not None:
        embeds = torch.cat([prompt.embedding.unsqueeze(0), embeds], dim=1)
    logp = torch.log_softmax(model(inputs_embeds=embeds).logits[0].float(), dim=-1)
    start = embeds.shape[1] - len(tgt)
    return sum(float(logp[start + j - 1, t]) for j, t in enumerate(tgt)), len(tgt)


def test_choice_scores_match_a_plain_forward_pass(tiny):
    """Multi-token choices are summed; length_norm divides by the token count."""
    model, tok = tiny.model, tiny.tokenizer
    torch.manual_seed(1)
    prompt = SoftPrompt(torch.randn(3, 16) * 0.5)
    sources = ["review : the food was awful sentiment :", "review : great film sentiment :"]
    choices = ["very good", "bad"]  # 2 tokens and 1 token
    preds, scores = classify(model, tok, prompt, sources, choices, batch_size=1)
    for i, src in enumerate(sources):
        for c, choice in enumerate(choices):
            want, _ = _manual_logprob(model, tok, prompt, src, choice)
            assert scores[i][c] == pytest.approx(want, abs=1e-4)
        assert preds[i] == choices[max(range(2), key=scores[i].__getitem__)]
    _, normed = classify(model, tok, prompt, sources, choices, length_norm=True, batch_size=2)
    assert normed[0][0] == pytest.approx(scores[0][0] / 2, abs=1e-4)
    assert normed[0][1] == pytest.approx(scores[0][1], abs=1e-4)


def test_row_logprobs_are_independent_of_batching(tiny):
    tok = tiny.tokenizer
    rows = continuation_rows(tok, ["the movie", "i love this phone and it"], "works", " ", 64)
    alone = [row_logprobs(tiny.model, None, [r], 1, tok.pad_token_id)[0] for r in rows]
    batched = row_logprobs(tiny.model, None, rows, 2, tok.pad_token_id)
    for (a, n), (b, m) in zip(alone, batched):
        assert a == pytest.approx(b, abs=1e-4) and n == m == 1


def test_restricted_loss_is_a_softmax_over_the_choices(tiny):
    """Only the first answer token counts, and only the choices' logits compete."""
    model, tok = tiny.model, tiny.tokenizer
    ids = choice_first_ids(tok, ["positive", "negative"])
    src = tok("the movie was great")["input_ids"]
    row = Row(src + [ids[0], tok.eos_token_id], [-100] * len(src) + [ids[0], tok.eos_token_id])
    batch = collate([row], tok.pad_token_id)
    loss, n = lm_loss(model, None, batch, choice_ids=torch.tensor(ids))
    logits = model(input_ids=torch.tensor([src])).logits[0, -1]
    want = -torch.log_softmax(logits[ids].float(), dim=-1)[0]
    assert n == 1 and float(loss) == pytest.approx(float(want), abs=1e-5)
    mean = evaluate_loss(model, None, [row], 1, tok.pad_token_id, torch.tensor(ids))
    assert mean["loss"] == pytest.approx(float(want), abs=1e-5)
    assert mean["loss"] < math.log(2) + 1.0  # two choices: near log 2 for a random model


def test_few_shot_k_shrinks_to_fit_the_context(tiny):
    tok = tiny.tokenizer
    train = [
        Example(f"review : {w} film sentiment :", lab, "t")
        for w, lab in [("great", "positive"), ("bad", "negative")] * 5
    ]
    query = [Example("review : boring book sentiment :", "negative", "q")]
    got, k = few_shot(query, train, tok, k=4, context=512)
    assert k == 4 and got[0].source.count("sentiment :") == 5
    assert {"positive", "negative"} <= set(got[0].source.split())  # both labels shown
    _, k_small = few_shot(query, train, tok, k=4, context=20)
    assert k_small == 1  # one 6-token demonstration fits beside the query, two do not


def test_run_eval_writes_results_and_predictions(tiny_dir, pairs_file, tmp_path):
    cfg = EvalConfig(
        model=ModelConfig(model=str(tiny_dir)),
        data=DataConfig(
            data=str(pairs_file),
            input_field="review",
            target_field="label",
            template="review : {input} sentiment :",
        ),
        choices="negative,positive",
        generate=True,
        max_new_tokens=3,
        output=str(tmp_path / "ev"),
    )
    results = run_eval(cfg)
    m = results["metrics"]
    assert m["examples"] == 12 and 0 <= m["accuracy"] <= 1 and m["loss"] > 0
    assert sum(map(sum, m["confusion"]["matrix"])) == 12
    assert {"exact_match", "chrf", "seconds_per_example"} <= set(m)
    saved = json.loads((tmp_path / "ev" / "results.json").read_text())
    assert saved["config"]["choices"] == "negative,positive"
    assert {"torch", "transformers", "softprompt", "python"} <= set(saved["versions"])
    assert "commit" in saved["git"]
    lines = (tmp_path / "ev" / "predictions.jsonl").read_text().splitlines()
    first = json.loads(lines[0])
    assert len(lines) == 12 and first["prediction"] in ("negative", "positive")
    assert set(first["scores"]) == {"negative", "positive"} and "generation" in first


def test_eval_cli_prints_a_table(tiny_dir, pairs_file, capsys):
    code = main(
        [
            "eval",
            "--model",
            str(tiny_dir),
            "--data",
            str(pairs_file),
            "--input-field",
            "review",
            "--target-field",
            "label",
            "--choices",
            "negative,positive",
            "--shots",
            "2",
            "--shots-data",
            str(pairs_file),
            "--limit",
            "4",
        ]
    )
    out, err = capsys.readouterr()
    assert code == 0
    assert "accuracy" in out and "macro-F1" in out and "gold \\ pred" in out
    assert "few-shot examples 2" in " ".join(out.split())
    # the long parts say when they start and how long they took (stderr, not the table)
    assert "eval: scoring 2 choices for 4 inputs" in err
    assert "eval: scoring 2 choices: done in" in err


def test_eval_on_a_terminal_shows_each_part_with_an_estimate(tiny_dir, pairs_file, capsys,
                                                            monkeypatch):  # fmt: skip
    # on a terminal, scoring and generation each show a bar of rows with elapsed time and an
    # estimate (tqdm's "[elapsed<remaining]"), moved by the batch loops themselves
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    monkeypatch.setitem(console.BAR_OPTIONS, "mininterval", 0)  # draw every update, however fast
    code = main(["eval", "--model", str(tiny_dir), "--data", str(pairs_file),
                 "--input-field", "review", "--target-field", "label",
                 "--choices", "negative,positive", "--generate", "--max-new-tokens", "2",
                 "--batch-size", "2", "--limit", "4"])  # fmt: skip
    err = capsys.readouterr().err
    assert code == 0
    for part in ("eval: scoring 2 choices", "eval: generating up to 2 tokens"):
        bars = [line for line in err.replace("\r", "\n").splitlines() if part + ":" in line]
        assert any("4/4" in b and "row" in b and "<" in b for b in bars), (part, bars)


def test_eval_cli_errors_are_one_line(tiny_dir, pairs_file, capsys):
    code = main(["eval", "--data", str(pairs_file), "--choices", "positive"])
    assert code == 2 and "--choices 'positive' must name two or more" in capsys.readouterr().err
    code = main(["eval", "--data", str(pairs_file), "--shots", "3"])
    assert code == 2 and "--shots needs --shots-data" in capsys.readouterr().err


@pytest.mark.parametrize("command", ["eval", "compare", "sweep", "inspect"])
def test_new_commands_document_every_flag(command, capsys, monkeypatch):
    """Each config field is a flag whose help text is the field's documentation."""
    from softprompt.cli import flat_fields
    from softprompt.config import CompareConfig, SweepConfig

    monkeypatch.setenv("COLUMNS", "3000")
    with pytest.raises(SystemExit):
        main([command, "--help"])
    out = " ".join(capsys.readouterr().out.split())
    classes = {"eval": EvalConfig, "compare": CompareConfig, "sweep": SweepConfig}
    skip = {"validation", "val_fraction"} if command == "eval" else set()
    for f in flat_fields(classes[command]) if command in classes else []:
        if f.name not in skip:
            assert "--" + f.name.replace("_", "-") in out
            assert " ".join(f.metadata["help"].split())[:40] in out
    if command == "inspect":
        assert "--top-k" in out and "DIR" in out


@pytest.mark.parametrize("kind", ["llama", "gemma3", "gpt2"])
@pytest.mark.parametrize("headed", [False, True])
def test_one_pass_scores_equal_a_pass_per_choice(loaded_all, kind, headed):
    """One pass per input (cache reused by every choice) gives the numbers of the whole
    sequence run once per choice: single- and multi-token choices, ragged batches, a prompt
    first or behind a head, and no prompt."""
    from softprompt.scoring import classify_per_choice

    model, tok = loaded_all[kind].model, loaded_all[kind].tokenizer
    sources = [
        "review : the food was awful and the room was broken sentiment :",
        "review : great film sentiment :",
        "i love this phone",
    ]
    choices = ["positive", "not very good", "bad"]
    contexts = None
    if headed:  # the prompt after a head of two tokens
        contexts = [(tok("answer :")["input_ids"], tok(s, add_special_tokens=False)["input_ids"])
                    for s in sources]  # fmt: skip
    for prompt in (random_prompt(3, n=4), None):
        want = classify_per_choice(model, tok, prompt, sources, choices, contexts=contexts)
        got = classify(model, tok, prompt, sources, choices, contexts=contexts, batch_size=2)
        assert got[0] == want[0]
        for a, b in zip(got[1], want[1]):
            assert a == pytest.approx(b, abs=1e-4)


def test_eval_loss_comes_from_the_choices_pass(tiny_dir, pairs_file, tmp_path):
    """`eval` with choices reports the same loss as evaluate_loss over the labelled rows."""
    from softprompt.data import load_examples
    from softprompt.measure.evaluate import evaluate_examples
    from softprompt.rows import tokenize
    from softprompt.scoring import evaluate_loss

    loaded = load_model(ModelConfig(model=str(tiny_dir)))
    data = DataConfig(data=str(pairs_file), input_field="review", target_field="label",
                      template="review : {input} sentiment :")  # fmt: skip
    cfg = EvalConfig(data=data)
    examples = load_examples(str(pairs_file), data)
    prompt = random_prompt(5)
    result, records = evaluate_examples(loaded, prompt, examples, cfg, ["positive", "negative"])
    rows = tokenize(examples, loaded.tokenizer, cfg.context - 3, " ")
    want = evaluate_loss(loaded.model, prompt, rows, 4, loaded.tokenizer.pad_token_id)
    assert result["loss"] == pytest.approx(want["loss"], rel=1e-4)
    assert result["tokens"] == want["tokens"]
    assert {r["prediction"] for r in records} <= {"positive", "negative"}
