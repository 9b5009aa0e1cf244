"""Deep prompts (--method prefix): trained keys/values per layer, read from the cache by
training, scoring, generation and serving alike; saved in PEFT's PREFIX_TUNING layout."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import random_prompt

from softprompt.artifacts import load_prompt, save_prompt
from softprompt.config import GenerateConfig
from softprompt.data import Example
from softprompt.errors import ArtifactError
from softprompt.generation import generate
from softprompt.loss import lm_loss
from softprompt.prefix import compile_prefix, deepen, kv_layout
from softprompt.prompt import DeepPrompt, PromptSet
from softprompt.rows import collate, tokenize

ARCHS = ["llama", "gemma3", "gpt2"]  # llama and gemma3: grouped-query attention
TEXTS = ["the movie was great", "i hate this screen and the battery was slow", "good"]


def _batch(tok, pairs):
    examples = [Example(source=s, target=t, where="t") for s, t in pairs]
    rows = tokenize(examples, tok, 64, " ")
    return collate(rows, tok.pad_token_id)


def _deep(model, seed=0, n=4):
    return deepen(model, random_prompt(seed, n))


@pytest.mark.parametrize("arch", ARCHS)
def test_layout_is_the_cache(loaded_all, arch):
    """(layers, KV heads, head dim) as the cache holds them: GQA's 1 KV head, Gemma's head
    dim that is not hidden / heads."""
    model = loaded_all[arch].model
    want = {"llama": (2, 1, 8), "gemma3": (3, 1, 8), "gpt2": (2, 2, 8)}[arch]
    assert kv_layout(model) == want
    deep = _deep(model)
    assert deep.embedding.shape == (4, want[0] * 2 * want[1] * want[2])


@pytest.mark.parametrize("arch", ARCHS)
def test_deepened_prompt_gives_the_shallow_loss(loaded_all, arch):
    """A deep prompt made from an input-layer prompt's own keys/values gives its loss (and
    its gradient flows back to every layer's entries)."""
    loaded = loaded_all[arch]
    model, tok = loaded.model, loaded.tokenizer
    batch = _batch(tok, [("the movie was great", "positive"), ("boring book", "negative")])
    shallow = random_prompt(0, 4)
    deep = deepen(model, shallow)
    want, n = lm_loss(model, PromptSet([""], [shallow]), batch)
    got, m = lm_loss(model, PromptSet([""], [deep]), batch)
    assert n == m
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    got.backward()
    grad = deep.embedding.grad.view(4, kv_layout(model)[0], -1)
    assert all(bool(grad[:, layer].abs().sum() > 0) for layer in range(grad.shape[1]))


@pytest.mark.parametrize("arch", ARCHS)
def test_batch_equals_alone_and_generation(loaded_all, arch):
    """Rows batched with a deep prompt get the loss they get alone; generation with it is
    generation with the shallow prompt it came from; a mixed batch (deep, shallow, none)
    gives each row what it gets alone."""
    loaded = loaded_all[arch]
    model, tok = loaded.model, loaded.tokenizer
    pairs = [("the movie was great", "positive"), ("the service was slow", "negative")]
    deep = PromptSet([""], [_deep(model, 3)])
    both, _ = lm_loss(model, deep, _batch(tok, pairs))
    alone = sum(lm_loss(model, deep, _batch(tok, [p]))[0] for p in pairs)
    torch.testing.assert_close(both, alone, atol=1e-4, rtol=1e-4)

    shallow = random_prompt(5, 3)
    cfg = GenerateConfig(max_new_tokens=5, batch_size=4)
    want = generate(loaded, TEXTS, shallow, cfg)
    assert generate(loaded, TEXTS, deepen(model, shallow), cfg) == want
    other = random_prompt(6, 5)
    prompts = [deepen(model, shallow), other, None]
    mixed = generate(loaded, TEXTS, prompts, cfg)
    alone = [generate(loaded, [t], p, cfg)[0] for t, p in zip(TEXTS, prompts)]
    assert mixed == alone


@pytest.mark.parametrize("arch", ["llama", "gemma3", "gpt2"])
def test_peft_loads_ours_and_we_load_peft(loaded_all, arch, tmp_path):
    """PEFT's PeftModel gives our logits with our saved deep prompt, and a prefix PEFT
    saves loads here with the same keys/values."""
    peft = pytest.importorskip("peft")
    loaded = loaded_all[arch]
    model, tok = loaded.model, loaded.tokenizer
    deep = _deep(model, 2, 3)
    folder = save_prompt(tmp_path / "ours", deep, model, str(loaded.name))
    config = json.loads((folder / "adapter_config.json").read_text())
    assert config["peft_type"] == "PREFIX_TUNING"
    ids = torch.tensor([tok("the movie was great")["input_ids"]])
    mask = torch.ones_like(ids)
    ours = model(input_ids=ids, attention_mask=torch.ones(1, 3 + ids.shape[1], dtype=torch.long),
                 past_key_values=_cache(model, deep)).logits  # fmt: skip
    wrapped = peft.PeftModel.from_pretrained(model, str(folder))
    try:
        theirs = wrapped(input_ids=ids, attention_mask=mask).logits
        torch.testing.assert_close(theirs, ours, atol=1e-4, rtol=1e-4)
        wrapped.save_pretrained(tmp_path / "theirs")
    finally:
        wrapped.unload() if hasattr(wrapped, "unload") else None
    back, _ = load_prompt(tmp_path / "theirs", model=model)
    assert isinstance(back, DeepPrompt)
    torch.testing.assert_close(back.embedding, deep.embedding)


def _cache(model, deep):
    from softprompt.prefix import cache_of

    p = compile_prefix(model, deep)
    return cache_of(p.keys, p.values)


def test_deep_prompt_refused_on_another_model(loaded_all, tmp_path):
    llama, gpt2 = loaded_all["llama"], loaded_all["gpt2"]
    folder = save_prompt(tmp_path / "p", _deep(llama.model), llama.model, str(llama.name))
    with pytest.raises(ArtifactError, match="trained for"):
        load_prompt(folder, model=gpt2.model)


def test_served_beside_shallow_prompts(model_dirs, tmp_path):
    """A deep prompt folder served with a shallow one: concurrent requests over both (and the
    base model) share batches and each gets what it gets alone, on Gemma 3's sliding-window
    layers; /health reports each prompt's memory."""
    import urllib.request

    from conftest import served_side_by_side

    from softprompt.loading import load_model

    loaded = load_model(model=str(model_dirs["gemma3"]))
    prompts = {"deep": _deep(loaded.model, 7, 6), "flat": random_prompt(8, 3)}
    with served_side_by_side(loaded, prompts, tmp_path / "prompts", TEXTS, 5) as (state, url):
        with urllib.request.urlopen(url + "/health", timeout=10) as resp:
            health = json.loads(resp.read())
        assert health["prompts"] == 2
    entries = {e.name: e for e in state.store.entries()}
    assert entries["deep"].prefix.deep and not entries["flat"].prefix.deep
    # 6 tokens x 3 layers x keys and values x 8 values x 4 bytes
    assert entries["deep"].nbytes == 6 * 3 * 2 * 8 * 4


@pytest.mark.parametrize("arch", ["gemma3", "llama"])
def test_choice_scores_batched_equal_alone(loaded_all, arch):
    """Eval's choice scores for a deep prompt: a batch of inputs of different lengths scores
    each as alone (Gemma 3's window of 4 slots: rows are run into the cache first)."""
    from softprompt.scoring import classify

    loaded = loaded_all[arch]
    model, tok = loaded.model, loaded.tokenizer
    deep = _deep(model, 9, 5)
    choices = ["positive", "negative", "the movie"]
    _, batched = classify(model, tok, deep, TEXTS, choices, batch_size=3)
    alone = [classify(model, tok, deep, [t], choices, batch_size=1)[1][0] for t in TEXTS]
    torch.testing.assert_close(torch.tensor(batched), torch.tensor(alone), atol=1e-4, rtol=1e-4)
    shallow = classify(model, tok, random_prompt(9, 5), TEXTS, choices, batch_size=3)[1]
    deepened = classify(model, tok, deepen(model, random_prompt(9, 5)), TEXTS, choices)[1]
    torch.testing.assert_close(torch.tensor(deepened), torch.tensor(shallow), atol=1e-4, rtol=1e-4)


def test_encoder_classifier_deep_prompt_trains_and_matches_peft(kind_dirs, tmp_path):
    """A BERT classifier with a deep prompt: trains (head beside it), its saved folder holds
    PEFT's PREFIX_TUNING prompt and the head, PEFT gives the same logits, and batched
    predictions equal each row alone."""
    peft = pytest.importorskip("peft")
    from conftest import train_config

    from softprompt.kinds.classify import predict
    from softprompt.loading import load_model
    from softprompt.training import train

    data = tmp_path / "train.jsonl"
    rows = [("the movie was great", "positive"), ("the food was awful", "negative")] * 6
    data.write_text("".join(json.dumps({"review": r, "label": y}) + "\n" for r, y in rows))
    cfg = train_config(kind_dirs["bert"], data, tmp_path / "run", method="prefix", epochs=2,
                       template=None)  # fmt: skip
    result = train(cfg)
    deep = result.prompt
    assert isinstance(deep, DeepPrompt) and deep.layout == (2, 2, 8)
    assert deep.num_virtual_tokens == 4
    assert (
        json.loads((tmp_path / "run" / "adapter_config.json").read_text())["peft_type"]
        == "PREFIX_TUNING"
    )
    loaded = load_model(model=str(kind_dirs["bert"]), labels=["negative", "positive"])
    prompt, _ = load_prompt(tmp_path / "run", model=loaded.model)  # the head comes with it
    texts = ["the movie was great", "awful", "the food was awful and the movie"]
    batched = predict(loaded.model, loaded.tokenizer, prompt, texts, batch_size=3)
    alone = [predict(loaded.model, loaded.tokenizer, prompt, [t])[0] for t in texts]
    torch.testing.assert_close(torch.tensor(batched), torch.tensor(alone), atol=1e-5, rtol=1e-5)
    assert batched != predict(loaded.model, loaded.tokenizer, None, texts)  # the prefix counts
    wrapped = peft.PeftModel.from_pretrained(loaded.model, str(tmp_path / "run"))
    enc = loaded.tokenizer(texts[:1], return_tensors="pt")
    theirs = wrapped(**enc).logits.softmax(-1)[0].tolist()
    torch.testing.assert_close(torch.tensor(theirs), torch.tensor(batched[0]), atol=1e-5,
                               rtol=1e-5)  # fmt: skip


def test_training_resumes_exactly_and_multitask(model_dirs, tmp_path):
    """--method prefix on Gemma 3: an interrupted run resumed equals an uninterrupted one;
    a multi-task run trains one deep prompt per task; what cannot be done is refused in one
    line."""
    from conftest import REVIEWS, interrupted_at, train_config
    from safetensors.torch import load_file

    from softprompt.errors import ConfigError
    from softprompt.training import train

    gemma = model_dirs["gemma3"]
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps({"review": r, "label": y, "task": f"t{i % 2}"}) + "\n"
                            for i, (r, y) in enumerate(REVIEWS)))  # fmt: skip
    kw = dict(method="prefix", epochs=3, template=None)

    def final(folder):
        return load_file(str(folder / "adapter_model.safetensors"))["prompt_embeddings"]

    train(train_config(gemma, data, tmp_path / "ref", **kw), progress=False)
    with interrupted_at(5):
        train(train_config(gemma, data, tmp_path / "cut", save_every=2, **kw), progress=False)
    train(train_config(gemma, data, tmp_path / "cut", save_every=2, resume=True, **kw),
          progress=False)  # fmt: skip
    torch.testing.assert_close(final(tmp_path / "cut"), final(tmp_path / "ref"))
    assert final(tmp_path / "ref").shape == (4, 3 * 2 * 8)

    multi = train(train_config(gemma, data, tmp_path / "multi", task_field="task", **kw),
                  progress=False)  # fmt: skip
    assert sorted(multi.prompts) == ["t0", "t1"]
    assert all(isinstance(p, DeepPrompt) for p in multi.prompts.values())

    with pytest.raises(ConfigError, match="sits before everything"):
        train(train_config(gemma, data, tmp_path / "in", method="prefix",
                           template="review : {soft_prompt} {input} sentiment :"))  # fmt: skip
    with pytest.raises(ConfigError, match="reparam residual maps input vectors"):
        train_config(gemma, data, tmp_path / "r", method="prefix", reparam="residual")


def test_prefix_projection_starts_at_init_and_resumes(model_dirs, pairs_file, tmp_path):
    """--prefix-projection: the MLP's output starts at the --init prompt's keys/values (the
    same initial validation loss as without it), the saved prefix is a plain deep prompt
    that PEFT's format holds, and an interrupted run resumes exactly."""
    from conftest import interrupted_at, train_config
    from safetensors.torch import load_file

    from softprompt.training import train

    llama = model_dirs["llama"]
    kw = dict(method="prefix", epochs=3, template=None)
    mlp = dict(prefix_projection=True, prefix_hidden=8)
    plain = train(train_config(llama, pairs_file, tmp_path / "plain", **kw), progress=False)
    ref = train(train_config(llama, pairs_file, tmp_path / "ref", prefix_projection=True,
                             prefix_hidden=8, **kw), progress=False)  # fmt: skip
    assert ref.summary["initial_val_loss"] == pytest.approx(plain.summary["initial_val_loss"])
    saved, _ = load_prompt(tmp_path / "ref")
    assert isinstance(saved, DeepPrompt) and saved.embedding.shape == (4, 2 * 2 * 8)
    assert not torch.equal(saved.embedding, plain.prompt.embedding)
    with interrupted_at(5):
        train(train_config(llama, pairs_file, tmp_path / "cut", save_every=2, **mlp, **kw),
              progress=False)  # fmt: skip
    train(train_config(llama, pairs_file, tmp_path / "cut", save_every=2, resume=True, **mlp, **kw),
          progress=False)  # fmt: skip
    want = load_file(str(tmp_path / "ref" / "adapter_model.safetensors"))["prompt_embeddings"]
    got = load_file(str(tmp_path / "cut" / "adapter_model.safetensors"))["prompt_embeddings"]
    torch.testing.assert_close(got, want)


def test_chat_and_ensemble_take_deep_prompts(chat_dir, tmp_path):
    """Conversations with the deep prefix first (the chat template's text after it): trained,
    and generate_chat answers with it as with the input-layer prompt it started from; a
    prompt placed after the system turn is refused in one line; an ensemble of deep prompts
    trains one deep prompt per member."""
    from conftest import REVIEWS, train_config

    from softprompt.errors import ConfigError
    from softprompt.generation import generate_chat
    from softprompt.loading import load_model
    from softprompt.training import train

    data = tmp_path / "chat.jsonl"
    data.write_text("".join(json.dumps({"messages": [{"role": "user", "content": r},
                                                     {"role": "assistant", "content": y}]}) + "\n"
                            for r, y in REVIEWS))  # fmt: skip
    result = train(train_config(chat_dir, data, tmp_path / "run", method="prefix", epochs=2,
                                template=None), progress=False)  # fmt: skip
    assert isinstance(result.prompt, DeepPrompt)
    assert result.summary["best_val_loss"] <= result.summary["initial_val_loss"]
    loaded = load_model(model=str(chat_dir))
    talk = [[{"role": "user", "content": "the movie was great"}]]
    shallow = random_prompt(3, 4)
    cfg = GenerateConfig(max_new_tokens=4)
    want = generate_chat(loaded, talk, shallow, cfg)
    assert generate_chat(loaded, talk, deepen(loaded.model, shallow), cfg) == want
    with pytest.raises(ConfigError, match="sits before everything"):
        train(train_config(chat_dir, data, tmp_path / "sys", method="prefix", template=None,
                           system="Be brief.", prompt_position="after-system"))  # fmt: skip

    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps({"review": r, "label": y}) + "\n" for r, y in REVIEWS))
    ens = train(train_config(chat_dir, pairs, tmp_path / "ens", method="prefix", epochs=1,
                             ensemble=2), progress=False)  # fmt: skip
    assert len(ens.prompts) == 2
    assert all(isinstance(p, DeepPrompt) for p in ens.prompts.values())


def test_each_kind_fills_in_its_own_defaults(kind_dirs, tiny_dir, pairs_file, tmp_path, capsys):
    """Without --method and --epochs a classifier trains a deep prompt for 10 epochs at 0.03
    and a decoder a deep prompt at 0.1 for as many epochs as reach 160 steps, 3 to 10 (a 9-row
    set: 10); both are said and recorded as used."""
    from conftest import train_config

    from softprompt.artifacts import read_meta
    from softprompt.prompt import SoftPrompt
    from softprompt.training import train

    bare = dict(method=None, epochs=None, lr=None, template=None)
    enc = train(train_config(kind_dirs["bert"], pairs_file, tmp_path / "enc", **bare),
                progress=False)  # fmt: skip
    assert isinstance(enc.prompt, DeepPrompt) and enc.summary["steps"] == 10 * 3  # 9 rows / 3
    said = capsys.readouterr().err
    assert "--method prefix and 10 epochs (30 steps of 3): the default for classify" in said
    assert "learning rate 0.03: the default for deep prompts on classify models" in said
    dec = train(train_config(tiny_dir, pairs_file, tmp_path / "dec", **bare), progress=False)
    assert isinstance(dec.prompt, DeepPrompt) and dec.summary["steps"] == 10 * 3
    said = capsys.readouterr().err
    assert ("--method prefix and 10 epochs (30 steps of 3): the default for causal models "
            "(--method or --epochs to change)") in said  # fmt: skip
    assert "learning rate 0.1: the default for deep prompts on causal models" in said
    shallow = train(train_config(tiny_dir, pairs_file, tmp_path / "dec2", **{**bare,
                                 "reparam": "residual"}), progress=False)  # fmt: skip
    assert type(shallow.prompt) is SoftPrompt  # what maps input vectors keeps them
    assert "learning rate 0.03: the default for causal models" in capsys.readouterr().err
    assert read_meta(tmp_path / "enc")["training"]["method"] == "prefix"
    assert read_meta(tmp_path / "dec")["training"]["epochs"] == 10


def test_a_deep_default_falls_back_to_the_input_layer_where_the_run_cannot_take_one(
    chat_dir, tmp_path, capsys, monkeypatch
):
    """A kind whose default is a deep prompt trains an input-layer prompt, saying why, where
    the run places the prompt after a system turn (a deep prefix sits before everything);
    only an explicit --method prefix is refused there."""
    from conftest import train_config

    from softprompt.kinds import CAUSAL
    from softprompt.prompt import SoftPrompt
    from softprompt.training import train

    monkeypatch.setattr(CAUSAL, "default_method", "prefix")
    data = tmp_path / "chat.jsonl"
    data.write_text("".join(json.dumps({"messages": [
        {"role": "user", "content": f"item {k}"}, {"role": "assistant", "content": "ok"}]}) + "\n"
        for k in range(4)))  # fmt: skip
    cfg = train_config(chat_dir, data, tmp_path / "run", method=None, template=None, epochs=1,
                       system="Be brief.", prompt_position="after-system")  # fmt: skip
    run = train(cfg, progress=False)
    assert type(run.prompt) is SoftPrompt
    said = capsys.readouterr().err
    assert "--method prompt (not a deep prompt: a deep prefix sits before everything, but the " \
           "prompt format puts the prompt at 'after-system')" in said  # fmt: skip
    plain = train_config(chat_dir, data, tmp_path / "deep", method=None, template=None, epochs=1)
    assert isinstance(train(plain, progress=False).prompt, DeepPrompt)  # nothing in its way


def test_a_decoders_default_epochs_follow_the_data_size():
    """Without --epochs a decoder gets as many passes as reach 160 optimizer steps, at least 3
    and at most 10: a small set more passes than a large one; the other kinds a fixed number."""
    from softprompt.config import DataConfig, TrainConfig
    from softprompt.kinds import CAUSAL, CLASSIFY, SEQ2SEQ, epochs_for
    from softprompt.training.setup import planned_steps

    cfg = TrainConfig(data=DataConfig(data="train.jsonl"))  # batch 8
    for rows, epochs in [(16, 10), (128, 10), (250, 5), (400, 4), (2000, 3), (100_000, 3)]:
        per_epoch = planned_steps(cfg, rows, CAUSAL)[1]
        assert epochs_for(CAUSAL, per_epoch) == epochs, rows
        assert planned_steps(cfg, rows, CAUSAL)[0] == epochs * per_epoch
    assert epochs_for(CLASSIFY, 1) == epochs_for(CLASSIFY, 1000) == 10
    assert epochs_for(SEQ2SEQ, 1) == epochs_for(SEQ2SEQ, 1000) == 3
    given = TrainConfig(data=DataConfig(data="train.jsonl"), epochs=2)
    assert planned_steps(given, 128, CAUSAL)[0] == 2 * 16  # given: kept


def test_prompt_dropout_trains_a_different_prompt_and_resumes(model_dirs, pairs_file, tmp_path):
    """--prompt-dropout: validation sees the whole prompt (the initial validation loss is
    the one without dropout), training sees dropped copies (a different prompt comes out),
    each row draws its own mask, and an interrupted run resumes exactly (the mask's random
    state is the run's)."""
    from conftest import interrupted_at, train_config
    from safetensors.torch import load_file

    from softprompt.prompt import PromptSet, rows_prompts
    from softprompt.training import train

    llama = model_dirs["llama"]
    kw = dict(method="prefix", epochs=3, template=None)
    plain = train(train_config(llama, pairs_file, tmp_path / "plain", **kw), progress=False)
    ref = train(train_config(llama, pairs_file, tmp_path / "ref", prompt_dropout=0.3, **kw),
                progress=False)  # fmt: skip
    assert ref.summary["initial_val_loss"] == pytest.approx(plain.summary["initial_val_loss"])
    assert not torch.equal(ref.prompt.embedding, plain.prompt.embedding)
    with interrupted_at(5):
        train(train_config(llama, pairs_file, tmp_path / "cut", save_every=2, prompt_dropout=0.3,
                           **kw), progress=False)  # fmt: skip
    train(train_config(llama, pairs_file, tmp_path / "cut", save_every=2, resume=True,
                       prompt_dropout=0.3, **kw), progress=False)  # fmt: skip
    want = load_file(str(tmp_path / "ref" / "adapter_model.safetensors"))["prompt_embeddings"]
    got = load_file(str(tmp_path / "cut" / "adapter_model.safetensors"))["prompt_embeddings"]
    assert torch.equal(want, got)

    ones = PromptSet(["a"], [DeepPrompt(torch.ones(4, 32), 2, 2, 4)])
    rows = torch.zeros(3, dtype=torch.long)
    batch = {"input_ids": torch.zeros(3, 5, dtype=torch.long), "task": rows}
    assert rows_prompts(ones, batch)[0].shape == (1, 4, 32)  # no dropout: one shared prompt
    ones.dropout = 0.5
    virtual, which = rows_prompts(ones, batch)
    assert virtual.shape == (3, 4, 32) and which.tolist() == [0, 1, 2]
    assert set(virtual.unique().tolist()) <= {0.0, 2.0}  # dropped or scaled by 1 / (1 - p)
    assert not torch.equal(virtual[0], virtual[1])  # a mask per row
