"""Issue 14: --choices auto, restricted+rest loss, --init auto, --reparam residual,
--ensemble K and --init library:DIR, each round-tripping (PEFT logits, --resume)."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from conftest import REVIEWS, interrupted_at, train_config
from peft import PeftModel
from safetensors.torch import load_file

from softprompt.artifacts import INITIAL, PROMPT_KEY, load_prompt
from softprompt.data import Example, detect_labels
from softprompt.errors import ConfigError
from softprompt.library import similar_prompts
from softprompt.loading import load_model
from softprompt.loss import REST, head_logits, lm_loss, with_rest
from softprompt.prompt import ResidualPrompt, SoftPrompt, embed_tokens
from softprompt.rows import collate, tokenize
from softprompt.training import train


def _ex(targets: list[str]) -> list[Example]:
    return [Example(f"text {i}", t, f"f.jsonl:{i + 1}") for i, t in enumerate(targets)]


def _meta(folder) -> dict:
    return json.loads((folder / "softprompt.json").read_text())


def _final(folder) -> torch.Tensor:
    return load_file(str(folder / "adapter_model.safetensors"))[PROMPT_KEY]


# --- --choices auto ----------------------------------------------------------------------


def test_detect_labels_finds_a_small_label_set_in_first_seen_order():
    assert detect_labels(_ex(["pos", "neg", "pos", "neg", "neutral", "neutral"])) == [
        "pos",
        "neg",
        "neutral",
    ]
    assert detect_labels(_ex(["very good one", "bad", "bad", "very good one"])) == [
        "very good one",
        "bad",
    ]
    # a rare class seen once in a small sample (TREC's 'abbreviation') is still a label
    assert detect_labels(_ex(["loc", "hum", "loc", "hum", "abbr"])) == ["loc", "hum", "abbr"]


@pytest.mark.parametrize(
    "targets",
    [
        ["a", "b", "c", "a"],  # most labels seen once
        ["a", "b", "c", "d", "e", "a", "b"],  # 3 of 5 seen once
        ["pos", "pos", "pos"],  # one label is no classification
        ["one two three four", "x", "x", "one two three four"],  # a label of 4 words
        [str(i) for i in range(11)] * 2,  # 11 labels
        ["a, b", "c", "a, b", "c"],  # a comma cannot be written in --choices
    ],
)
def test_detect_labels_refuses_what_is_not_a_label_set(targets):
    assert detect_labels(_ex(targets)) is None


def test_detect_labels_ignores_text_mode():
    assert detect_labels([Example("some text", None, "f.txt:1")] * 3) is None


def test_default_run_detects_the_labels_and_records_them(tiny_dir, pairs_file, tmp_path, capsys):
    """Bare defaults on labelled data: classification mode, told on the console, recorded
    as the words used (so eval and serve find them), restricted loss."""
    out = tmp_path / "auto"
    train(train_config(tiny_dir, pairs_file, out, max_steps=2, choices="auto"), progress=False)
    err = capsys.readouterr().err
    assert "--choices auto: the targets are 2 labels (positive, negative)" in err
    meta = _meta(out)
    assert meta["choices"] == {"requested": "auto", "used": ["positive", "negative"]}
    assert meta["training"]["choices"] == "positive,negative"
    assert meta["training"]["choice_loss"] == "restricted"
    base = next(
        json.loads(x)
        for x in (out / "metrics.jsonl").read_text().splitlines()
        if json.loads(x)["kind"] == "base"
    )
    assert base["tokens"] == 3  # one answer position per validation row


def test_choices_none_keeps_the_language_model_loss(tiny_dir, pairs_file, tmp_path):
    out = tmp_path / "none"
    train(train_config(tiny_dir, pairs_file, out, max_steps=1, choices="none"), progress=False)
    assert _meta(out)["choices"]["used"] is None
    assert _meta(out)["training"]["choices"] is None


def test_the_default_config_is_auto():
    from softprompt.config import PromptConfig, TrainConfig

    cfg = TrainConfig(data=pytest.importorskip("softprompt.config").DataConfig(data="x.jsonl"))
    assert (cfg.choices, cfg.choice_loss, cfg.reparam, cfg.ensemble) == (
        "auto",
        "restricted",
        "none",
        1,
    )
    assert PromptConfig().init == "auto"


# --- restricted+rest ---------------------------------------------------------------------


def test_rest_logit_pools_every_other_token(loaded_all):
    """The (choices, rest) softmax gives each choice the same probability as the full
    softmax: rest = logsumexp of the other tokens' logits."""
    loaded = loaded_all["llama"]
    tok, model = loaded.tokenizer, loaded.model
    rows = tokenize(_ex(["positive", "negative"]), tok, 64, " ")
    batch = collate(rows, tok.pad_token_id)
    ids = torch.tensor([tok.convert_tokens_to_ids(w) for w in ("positive", "negative")])
    prompt = SoftPrompt(torch.randn(3, 16, generator=torch.Generator().manual_seed(1)))
    loss, n = lm_loss(model, prompt, batch, choice_ids=with_rest(ids))
    assert n == 2 and int(with_rest(ids)[-1]) == REST
    # the same by hand: the full softmax's log-probability of the gold first token
    emb, mask, labels = prompt.prepend(embed_tokens(model, batch["input_ids"]),
                                       batch["attention_mask"], batch["labels"])  # fmt: skip
    with torch.no_grad():
        hidden = model.base_model(inputs_embeds=emb, attention_mask=mask).last_hidden_state
    targets = labels[:, 1:]
    first = (targets != -100) & ((targets != -100).cumsum(1) == 1)
    logp = F.log_softmax(head_logits(model, hidden[:, :-1][first]).float(), dim=-1)
    expected = -logp.gather(1, targets[first].unsqueeze(1)).sum()
    torch.testing.assert_close(loss.detach(), expected, rtol=1e-5, atol=1e-5)
    restricted, _ = lm_loss(model, prompt, batch, choice_ids=ids)
    assert float(restricted.detach()) < float(loss.detach())  # the rest's mass left out


# --- --init auto -------------------------------------------------------------------------


def test_auto_init_uses_the_label_and_template_words(tiny_dir, pairs_file, tmp_path):
    out = tmp_path / "init"
    train(
        train_config(tiny_dir, pairs_file, out, max_steps=1, choices="auto", init="auto"),
        progress=False,
    )
    meta = _meta(out)
    assert meta["init"]["used"] == "text"
    assert meta["init"]["text"] == "positive negative review : sentiment :"
    loaded = load_model(model=str(tiny_dir))
    ids = loaded.tokenizer(meta["init"]["text"], add_special_tokens=False)["input_ids"][:4]
    expected = embed_tokens(loaded.model, torch.tensor(ids)).detach()
    torch.testing.assert_close(load_file(str(out / INITIAL))[PROMPT_KEY], expected)


def test_auto_init_without_task_words_is_vocab(tiny_dir, tmp_path):
    """Plain text, no template: nothing to start from but common tokens (as --init vocab)."""
    data = tmp_path / "t.txt"
    data.write_text("\n".join(r for r, _ in REVIEWS) + "\n")
    outs = {}
    for init in ("auto", "vocab"):
        outs[init] = tmp_path / init
        cfg = train_config(tiny_dir, data, outs[init], max_steps=1, init=init, template=None,
                           text_field="text")  # fmt: skip
        train(cfg, progress=False)
    assert _meta(outs["auto"])["init"]["used"] == "vocab"
    torch.testing.assert_close(
        load_file(str(outs["auto"] / INITIAL))[PROMPT_KEY],
        load_file(str(outs["vocab"] / INITIAL))[PROMPT_KEY],
    )


# --- --reparam residual ------------------------------------------------------------------


def test_residual_prompt_starts_as_the_plain_prompt_and_learns_through_the_mlp():
    start = torch.randn(4, 16)
    prompt = ResidualPrompt(start, bottleneck=8)
    torch.testing.assert_close(prompt.embedding.detach(), start)
    names = {n for n, _ in prompt.named_parameters()}
    assert {"raw", "mlp.0.weight", "mlp.2.weight", "norm.weight"} <= names
    prompt.embedding.sum().backward()
    assert prompt.norm.weight.grad is not None and prompt.norm.weight.grad.abs().sum() > 0
    value = torch.randn(4, 16)
    prompt.put(value)
    torch.testing.assert_close(prompt.embedding.detach(), value)


def test_residual_artifact_is_a_plain_prompt_peft_loads(tiny_dir, pairs_file, tmp_path):
    out = tmp_path / "res"
    result = train(
        train_config(tiny_dir, pairs_file, out, epochs=2, reparam="residual", reparam_hidden=8),
        progress=False,
    )
    assert set(load_file(str(out / "adapter_model.safetensors"))) == {PROMPT_KEY}
    assert isinstance(result.prompt, SoftPrompt)
    assert not torch.equal(_final(out), load_file(str(out / INITIAL))[PROMPT_KEY])
    ours = load_model(model=str(tiny_dir))
    prompt, _ = load_prompt(out, ours.model)
    enc = ours.tokenizer(["the movie was great", "boring"], padding=True, return_tensors="pt")
    ids, mask = enc["input_ids"], enc["attention_mask"]
    emb, m, _ = prompt.prepend(embed_tokens(ours.model, ids), mask)
    with torch.no_grad():
        expected = ours.model(inputs_embeds=emb, attention_mask=m).logits
        peft_model = PeftModel.from_pretrained(load_model(model=str(tiny_dir)).model, str(out))
        got = peft_model(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_residual_resume_equals_an_uninterrupted_run(tiny_dir, pairs_file, tmp_path):
    """The checkpoint keeps P and the MLP (and their AdamW moments): --resume is exact."""
    kw = dict(epochs=3, reparam="residual", reparam_hidden=8)
    train(train_config(tiny_dir, pairs_file, tmp_path / "ref", **kw), progress=False)
    with interrupted_at(5):
        train(train_config(tiny_dir, pairs_file, tmp_path / "cut", save_every=2, **kw),
              progress=False)  # fmt: skip
    train(train_config(tiny_dir, pairs_file, tmp_path / "cut", save_every=2, resume=True, **kw),
          progress=False)  # fmt: skip
    torch.testing.assert_close(_final(tmp_path / "cut"), _final(tmp_path / "ref"))


def test_residual_differs_from_plain_training(tiny_dir, pairs_file, tmp_path):
    train(train_config(tiny_dir, pairs_file, tmp_path / "a", epochs=2), progress=False)
    train(train_config(tiny_dir, pairs_file, tmp_path / "b", epochs=2, reparam="residual"),
          progress=False)  # fmt: skip
    assert not torch.allclose(_final(tmp_path / "a"), _final(tmp_path / "b"))


# --- --ensemble K ------------------------------------------------------------------------


def test_ensemble_trains_k_members_in_one_run(tiny_dir, pairs_file, tmp_path):
    out = tmp_path / "ens"
    result = train(
        train_config(tiny_dir, pairs_file, out, epochs=2, ensemble=3, choices="auto"),
        progress=False,
    )
    index = json.loads((out / "ensemble.json").read_text())
    assert index["members"] == ["member-0", "member-1", "member-2"]
    assert index["vote"] == "majority" and index["choices"] == ["positive", "negative"]
    finals = [_final(out / m) for m in index["members"]]
    initials = [load_file(str(out / m / INITIAL))[PROMPT_KEY] for m in index["members"]]
    assert not torch.equal(initials[0], initials[1])  # members start apart
    assert not torch.equal(finals[1], finals[2])
    assert set(result.prompts) == set(index["members"])
    for m in index["members"]:  # each member a PEFT-loadable prompt folder
        assert set(load_file(str(out / m / "adapter_model.safetensors"))) == {PROMPT_KEY}
        assert _meta(out / m)["training"]["choices"] == "positive,negative"


def test_ensemble_member_0_is_the_single_run(tiny_dir, pairs_file, tmp_path):
    """Member 0 trains as a run of its own would (the step's gradient is each member's own
    mean), so an ensemble costs one model pass per batch and changes no member."""
    train(train_config(tiny_dir, pairs_file, tmp_path / "one", epochs=2), progress=False)
    train(train_config(tiny_dir, pairs_file, tmp_path / "ens", epochs=2, ensemble=2),
          progress=False)  # fmt: skip
    torch.testing.assert_close(
        _final(tmp_path / "ens" / "member-0"), _final(tmp_path / "one"), rtol=1e-4, atol=1e-5
    )


def test_ensemble_resume_equals_an_uninterrupted_run(tiny_dir, pairs_file, tmp_path):
    kw = dict(epochs=3, ensemble=2)
    train(train_config(tiny_dir, pairs_file, tmp_path / "ref", **kw), progress=False)
    with interrupted_at(5):
        train(train_config(tiny_dir, pairs_file, tmp_path / "cut", save_every=2, **kw),
              progress=False)  # fmt: skip
    train(train_config(tiny_dir, pairs_file, tmp_path / "cut", save_every=2, resume=True, **kw),
          progress=False)  # fmt: skip
    for m in ("member-0", "member-1"):
        torch.testing.assert_close(_final(tmp_path / "cut" / m), _final(tmp_path / "ref" / m))


def test_ensemble_with_tasks_is_refused(tiny_dir, pairs_file, tmp_path):
    with pytest.raises(ConfigError, match="ensemble"):
        train_config(tiny_dir, pairs_file, tmp_path / "x", ensemble=2, task_field="task")


# --- --init library:DIR ------------------------------------------------------------------


def test_library_init_starts_from_the_best_prompt(tiny_dir, pairs_file, tmp_path):
    """A library of a trained prompt for this task and two random ones: the trained one has
    the lowest loss on the new run's training rows and is picked."""
    from softprompt.artifacts import save_prompt

    library = tmp_path / "library"
    train(train_config(tiny_dir, pairs_file, library / "sentiment", epochs=6), progress=False)
    loaded = load_model(model=str(tiny_dir))
    for seed in (1, 2):
        noise = SoftPrompt(torch.randn(4, 16, generator=torch.Generator().manual_seed(seed)) * 5)
        save_prompt(library / f"noise-{seed}", noise, loaded.model, loaded.name)
    save_prompt(library / "long", SoftPrompt(torch.zeros(7, 16)), loaded.model, loaded.name)
    out = tmp_path / "new"
    train(train_config(tiny_dir, pairs_file, out, max_steps=1, init=f"library:{library}"),
          progress=False)  # fmt: skip
    init = _meta(out)["init"]
    assert init["used"] == "library"
    assert init["picked"] == str(library / "sentiment")
    assert set(init["scores"]) == {str(library / n) for n in ("sentiment", "noise-1", "noise-2")}
    assert "7 virtual tokens" in init["skipped"][str(library / "long")]
    torch.testing.assert_close(
        load_file(str(out / INITIAL))[PROMPT_KEY], _final(library / "sentiment")
    )

    ranked = similar_prompts(load_prompt(library / "sentiment")[0], library, loaded.model)
    assert ranked[0]["prompt"] == str(library / "sentiment") and ranked[0]["cosine"] == 1.0
    assert len(ranked) == 4  # any length


def test_library_of_nothing_is_refused(tiny_dir, pairs_file, tmp_path):
    (tmp_path / "empty").mkdir()
    cfg = train_config(tiny_dir, pairs_file, tmp_path / "x", init=f"library:{tmp_path / 'empty'}")
    with pytest.raises(ConfigError, match="no prompt of 4 virtual tokens"):
        train(cfg, progress=False)
    with pytest.raises(ConfigError, match="is not a folder"):
        train_config(tiny_dir, pairs_file, tmp_path / "x", init="library:/no/such/dir")


# --- voting: eval of an ensemble, sweep over the new options, inspect --similar ----------


def test_vote_is_the_majority_and_ties_go_to_the_higher_mean():
    from softprompt.measure.ensemble import vote

    scores = [  # 3 members x 2 examples x 2 choices
        [[-1.0, -2.0], [-1.0, -0.5]],
        [[-3.0, -2.0], [-1.0, -3.0]],
        [[-1.0, -9.0], [-2.0, -1.5]],
    ]
    assert vote(scores, ["a", "b"]) == ["a", "b"]
    tie = [[[-1.0, -2.0]], [[-5.0, -1.0]]]  # one vote each; b's mean -1.5 beats a's -3
    assert vote(tie, ["a", "b"]) == ["b"]


def test_eval_of_an_ensemble_folder_votes(tiny_dir, pairs_file, tmp_path, capsys):
    from softprompt.cli import main
    from softprompt.measure.ensemble import vote
    from softprompt.scoring import classify

    out = tmp_path / "ens"
    train(train_config(tiny_dir, pairs_file, out, epochs=2, ensemble=3, choices="auto"),
          progress=False)  # fmt: skip
    code = main(["eval", "--data", str(pairs_file), "--input-field", "review", "--target-field",
                 "label", "--prompt", str(out), "--output", str(tmp_path / "ev")])  # fmt: skip
    assert code == 0
    assert "ensemble of 3 prompts" in capsys.readouterr().err
    results = json.loads((tmp_path / "ev" / "results.json").read_text())
    metrics = results["metrics"]
    assert len(metrics["member_accuracy"]) == 3 and len(metrics["member_losses"]) == 3
    assert metrics["loss"] == pytest.approx(sum(metrics["member_losses"]) / 3)
    # the same vote by hand from each member's own scores
    loaded = load_model(model=str(tiny_dir))
    sources = [f"review : {r} sentiment :" for r, _ in REVIEWS]
    member_scores = [
        classify(loaded.model, loaded.tokenizer, load_prompt(out / m, loaded.model)[0], sources,
                 ["positive", "negative"])[1]
        for m in ("member-0", "member-1", "member-2")
    ]  # fmt: skip
    expected = vote(member_scores, ["positive", "negative"])
    from softprompt.measure.metrics import accuracy

    assert metrics["accuracy"] == pytest.approx(accuracy([y for _, y in REVIEWS], expected))


def test_sweep_over_seeds_reparams_and_a_test_file(tiny_dir, pairs_file, tmp_path, capsys):
    from softprompt.cli import main

    out = tmp_path / "sweep"
    code = main(["sweep", "--model", str(tiny_dir), "--data", str(pairs_file), "--input-field",
                 "review", "--target-field", "label", "--val-fraction", "0.25", "--choices",
                 "negative,positive", "--lrs", "0.3", "--inits", "vocab", "--lengths", "4",
                 "--reparams", "none,residual", "--choice-losses", "restricted+rest",
                 "--seeds", "0,1", "--test", str(pairs_file), "--steps", "2", "--batch-size",
                 "4", "--output", str(out)])  # fmt: skip
    assert code == 0
    rows = [json.loads(x) for x in (out / "sweep.jsonl").read_text().splitlines()]
    runs = [r for r in rows if r["kind"] == "recipe"]
    assert [(r["reparam"], r["seed"]) for r in runs] == [
        ("none", 0), ("none", 1), ("residual", 0), ("residual", 1)
    ]  # fmt: skip
    assert all(0 <= r["test_accuracy"] <= 1 for r in runs)
    table = (out / "sweep.md").read_text().splitlines()
    assert "test accuracy" in table[0] and "reparam" in table[0] and "seeds" in table[0]
    assert len(table) == 4  # head, rule, one line per recipe (its seeds merged)
    assert all(" (" in line and "-" in line for line in table[2:])  # mean (min-max)
    assert (
        out / "n4-vocab-lr0.3-residual-restricted+rest-s1" / "adapter_model.safetensors"
    ).is_file()


def test_sweep_refuses_unknown_reparams(tiny_dir, pairs_file, tmp_path):
    from softprompt.config import DataConfig, SweepConfig

    with pytest.raises(ConfigError, match="reparams must be one of none, residual"):
        SweepConfig(data=DataConfig(data=str(pairs_file)), output=str(tmp_path), reparams="deep")


def test_inspect_similar_ranks_a_library(tiny_dir, pairs_file, tmp_path, capsys):
    from softprompt.artifacts import save_prompt
    from softprompt.cli import main

    loaded = load_model(model=str(tiny_dir))
    base = torch.randn(4, 16, generator=torch.Generator().manual_seed(0))
    save_prompt(tmp_path / "me", SoftPrompt(base), loaded.model, loaded.name)
    save_prompt(tmp_path / "lib" / "close", SoftPrompt(base + 0.01), loaded.model, loaded.name)
    save_prompt(tmp_path / "lib" / "far", SoftPrompt(-base), loaded.model, loaded.name)
    code = main(["inspect", str(tmp_path / "me"), "--similar", str(tmp_path / "lib"),
                 "--model", str(tiny_dir)])  # fmt: skip
    assert code == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[1].endswith("close") and lines[2].endswith("far")
    assert float(lines[2].split()[0]) == pytest.approx(-1.0, abs=1e-4)


def test_serve_answers_an_ensemble_folder_with_its_members_vote(tiny_dir, pairs_file, tmp_path):
    """`serve --prompts` lists an ensemble folder as one model; each member answers in the
    same batch and the reply is the answer most members gave."""
    from fastapi.testclient import TestClient

    from softprompt.config import GenerateConfig, ServeConfig
    from softprompt.generation import generate
    from softprompt.serving.api import _voted, create_app
    from softprompt.serving.batcher import Job

    folder = tmp_path / "prompts"
    train(train_config(tiny_dir, pairs_file, folder / "ens", epochs=1, ensemble=3),
          progress=False)  # fmt: skip
    loaded = load_model(model=str(tiny_dir))
    app = create_app(loaded, ServeConfig(prompts=str(folder), batch_wait_ms=5))
    assert app.state.softprompt.store.rescan()["added"] == ["ens"]
    text = "the movie was great"
    members = [load_prompt(folder / "ens" / f"member-{k}", loaded.model)[0] for k in range(3)]
    cfg = GenerateConfig(max_new_tokens=4)
    template = "review : {input} sentiment :"
    each = [generate(loaded, [text], m, cfg, template)[0] for m in members]
    with TestClient(app) as client:
        assert [m["id"] for m in client.get("/v1/models").json()["data"]] == ["base", "ens"]
        body = {"model": "ens", "prompt": text, "max_tokens": 4, "temperature": 0}
        got = client.post("/v1/completions", json=body).json()["choices"][0]["text"]
        streamed = client.post("/v1/completions", json={**body, "stream": True})
    winner = max(range(3), key=lambda j: (each.count(each[j]), -j))
    assert got.strip() == each[winner]
    assert streamed.status_code == 400 and "ensemble" in streamed.json()["error"]["message"]
    app.state.softprompt.batcher.close()

    def job(t):  # the vote itself: majority, else the earliest member
        j = Job([1], None, 1, 0.0, 1.0, [], loaded.tokenizer, None)
        j.text = t
        return j

    assert _voted([job("a"), job(" b"), job("b ")]).text == " b"
    assert _voted([job("a"), job("b"), job("c")]).text == "a"
