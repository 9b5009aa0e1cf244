"""Deep prompts (--method prefix) on encoder-decoders (tiny random T5 and BART): keys and
values before the decoder's own in its self-attention, where PEFT's SEQ_2_SEQ_LM prefix
tuning puts them, saved so that PEFT and softprompt read each other's files with the same
logits. The tiny T5 has 2 decoder layers (PEFT's even case: saved as 3 blocks), the tiny
BART 1 (odd: saved as is)."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from conftest import REVIEWS, interrupted_at, random_prompt, train_config, write_reviews

from softprompt.artifacts import load_prompt, save_prompt
from softprompt.config import GenerateConfig
from softprompt.data import Example
from softprompt.errors import ConfigError, SoftpromptError
from softprompt.generation import generate
from softprompt.kinds.seq2seq import SEQ2SEQ, collate, rows_loss, score_choices, tokenize_pairs
from softprompt.kinds.seq2seq_deep import (
    decoder_prefix,
    from_peft,
    pads_exactly,
    peft_layers,
    to_peft,
)
from softprompt.loading import load_model
from softprompt.prefix import compile_prefix, deepen, kv_layout
from softprompt.prompt import DeepPrompt, PromptSet
from softprompt.training import train

ARCHS = ["t5", "bart"]
LAYOUTS = {"t5": (2, 2, 8), "bart": (1, 2, 8)}  # decoder layers, heads, head dim
SOURCES = ["the movie was great", "i hate this screen and the battery was slow", "good"]


@pytest.fixture(scope="module")
def s2s(kind_dirs):
    return {arch: load_model(model=str(kind_dirs[arch])) for arch in ARCHS}


def _deep(model, seed=0, n=4):
    """A deep prompt that is not a deepened one: its keys/values moved at random."""
    start = deepen(model, random_prompt(seed, n))
    noise = torch.randn(start.embedding.shape, generator=torch.Generator().manual_seed(seed))
    return DeepPrompt(start.embedding + noise, *start.layout)


def _rows(tok, pairs):
    return tokenize_pairs([Example(s, t, "x") for s, t in pairs], tok, 64)


def _peft_inputs(tok, rows):
    batch = collate(rows, tok.pad_token_id)
    return batch, {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"],
                   "labels": batch["labels"]}  # fmt: skip


def test_peft_order_reaches_every_layer():
    """PEFT gives decoder layer i block 2i mod L: an odd L keeps its count (a permutation),
    an even one gets one unused block more; ``from_peft`` undoes ``to_peft`` exactly."""
    assert [peft_layers(n) for n in range(1, 7)] == [1, 3, 3, 5, 5, 7]
    for layers in range(1, 7):
        flat = torch.randn(3, layers * 2 * 4)
        saved = to_peft(flat, layers)
        assert saved.shape == (3, peft_layers(layers) * 2 * 4)
        assert torch.equal(from_peft(saved, peft_layers(layers), layers), flat)


@pytest.mark.parametrize("arch", ARCHS)
def test_layout_is_the_decoders_self_attention(s2s, arch):
    model = s2s[arch].model
    assert kv_layout(model) == LAYOUTS[arch]
    assert pads_exactly(model) == (arch == "t5")  # relative positions vs BART's learned ones


@pytest.mark.parametrize("arch", ARCHS)
def test_peft_loads_ours_and_we_load_peft(kind_dirs, arch, tmp_path):
    """Our saved deep prompt in PEFT's PeftModel gives our logits and loss, and PEFT's greedy
    generation gives ours; a prefix PEFT trains and saves (its own layer count) loads here
    with PEFT's logits, and PEFT's re-save of ours loads back unchanged."""
    peft = pytest.importorskip("peft")
    loaded = load_model(model=str(kind_dirs[arch]))  # its own: PEFT wraps it
    model, tok = loaded.model, loaded.tokenizer
    deep = _deep(model, 1)
    folder = save_prompt(tmp_path / "ours", deep, model, str(loaded.name))
    config = json.loads((folder / "adapter_config.json").read_text())
    assert (config["peft_type"], config["task_type"]) == ("PREFIX_TUNING", "SEQ_2_SEQ_LM")
    assert config["num_layers"] == peft_layers(LAYOUTS[arch][0])
    assert config["num_transformer_submodules"] == 2
    rows = _rows(tok, [("the movie was great", "positive"), ("boring", "negative")])
    batch, inputs = _peft_inputs(tok, rows)
    with torch.no_grad():
        loss, n, _ = rows_loss(model, deep, rows, tok.pad_token_id, "cpu")
        ours = model(**inputs, past_key_values=decoder_prefix(model, deep, batch),
                     use_cache=True).logits  # fmt: skip
        wrapped = peft.PeftModel.from_pretrained(model, str(folder)).eval()
        theirs = wrapped(**inputs)
        torch.testing.assert_close(theirs.logits, ours, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(theirs.loss, loss / n, atol=1e-5, rtol=1e-5)
        ids = [tok(SOURCES[1])["input_ids"]]
        gen = _steps_config(tok)
        gen.decoder_start_token_id = model.config.decoder_start_token_id
        their = wrapped.generate(
            input_ids=torch.tensor(ids),
            generation_config=gen,
            attention_mask=torch.ones(1, len(ids[0]), dtype=torch.long),
        )
    torch.testing.assert_close(_steps(model, tok, ids, [deep]), torch.stack(their.scores, 1),
                               atol=1e-5, rtol=1e-5)  # fmt: skip
    wrapped.save_pretrained(tmp_path / "resaved")  # PEFT's copy: no softprompt.json
    back, _ = load_prompt(tmp_path / "resaved", model=model)
    assert back.layout == deep.layout
    torch.testing.assert_close(back.embedding, deep.embedding)

    torch.manual_seed(3)  # a prefix PEFT made: num_layers from the config, its own order
    config = peft.PrefixTuningConfig(task_type="SEQ_2_SEQ_LM", num_virtual_tokens=3)
    native = peft.get_peft_model(model, config)
    with torch.no_grad():
        native.prompt_encoder["default"].embedding.weight.normal_()
        native.save_pretrained(tmp_path / "theirs")
        want = native.eval()(**inputs).logits
    theirs, _ = load_prompt(tmp_path / "theirs", model=model)
    assert isinstance(theirs, DeepPrompt) and theirs.layout == LAYOUTS[arch]
    with torch.no_grad():
        got = model(**inputs, past_key_values=decoder_prefix(model, theirs, batch),
                    use_cache=True).logits  # fmt: skip
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("arch", ARCHS)
def test_deepened_prompt_is_the_decoder_having_read_it(s2s, arch):
    """What ``deepen`` (the --init prompt's keys/values) gives on an encoder-decoder, exactly:
    the decoder's keys/values of the prompt read as its own first inputs, its cross-attention
    on the encoder's output of the same prompt. The input-layer prompt (before the encoder)
    cannot be matched from the decoder: a source that is the prompt itself is the case that
    holds. Every layer's entries get a gradient from the loss."""
    model = s2s[arch].model
    shallow = random_prompt(4, 3)
    deep = deepen(model, shallow)
    p = shallow.embedding[None]  # (1, N, H)
    decoder = torch.tensor([[0, 7, 9, 11]])
    with torch.no_grad():
        read = model(inputs_embeds=p, decoder_inputs_embeds=torch.cat(
            [p, model.get_input_embeddings()(decoder)], 1)).logits[:, 3:]  # fmt: skip
        batch = {"input_ids": decoder, "task": torch.zeros(1, dtype=torch.long)}
        cached = model(inputs_embeds=p, decoder_input_ids=decoder, use_cache=True,
                       past_key_values=decoder_prefix(model, deep, batch)).logits  # fmt: skip
    torch.testing.assert_close(cached, read, atol=1e-5, rtol=1e-5)
    loaded = s2s[arch]
    rows = _rows(loaded.tokenizer, [("the movie was great", "positive")])
    loss, _, _ = rows_loss(model, PromptSet([""], [deep]), rows, 0, "cpu")
    loss.backward()
    grad = deep.embedding.grad.view(3, LAYOUTS[arch][0], -1)
    assert all(bool(grad[:, layer].abs().sum() > 0) for layer in range(grad.shape[1]))


@pytest.mark.parametrize("arch", ARCHS)
def test_batch_equals_alone(s2s, arch):
    """With a deep prompt, a batch's rows get the loss, choice scores and greedy answers they
    get alone; a server batch mixing deep prompts with other rows gives each its own answer
    (T5's relative positions do not see the empty slots; BART's learned positions would, so
    there only prompts of one length share a batch and other mixes are refused)."""
    loaded = s2s[arch]
    model, tok = loaded.model, loaded.tokenizer
    deep = _deep(model, 2)
    pairs = [(f"review : {r}", y) for r, y in REVIEWS[:4]]
    with torch.no_grad():
        both, _, _ = rows_loss(model, deep, _rows(tok, pairs), 0, "cpu")
        alone = sum(rows_loss(model, deep, _rows(tok, [p]), 0, "cpu")[0] for p in pairs)
    torch.testing.assert_close(both, alone, atol=1e-5, rtol=1e-5)
    tasks = PromptSet(["a", "b"], [deep, _deep(model, 5)])  # rows of two tasks' prompts
    rows = [dataclasses.replace(r, task=i % 2) for i, r in enumerate(_rows(tok, pairs))]
    with torch.no_grad():
        both, _, _ = rows_loss(model, tasks, rows, 0, "cpu")
        alone = sum(rows_loss(model, tasks.prompts[r.task], [r], 0, "cpu")[0] for r in rows)
    torch.testing.assert_close(both, alone, atol=1e-5, rtol=1e-5)
    choices = ["positive", "negative", "the movie"]
    scores = score_choices(model, tok, deep, SOURCES, choices)
    for source, row in zip(SOURCES, scores):  # each choice's score is its loss
        for choice, score in zip(choices, row):
            with torch.no_grad():
                loss, _, _ = rows_loss(model, deep, _rows(tok, [(source, choice)]), 0, "cpu")
            assert score == pytest.approx(-float(loss), rel=1e-5)
    assert scores != score_choices(model, tok, None, SOURCES, choices)  # the prefix counts

    batched = generate(loaded, SOURCES, deep, GenerateConfig(max_new_tokens=5, batch_size=3))
    assert batched == generate(loaded, SOURCES, deep, GenerateConfig(max_new_tokens=5,
                                                                      batch_size=1))  # fmt: skip
    ids = [tok(s)["input_ids"] for s in SOURCES]
    same_length = [deep, _deep(model, 5), deep]
    mixed = [compile_prefix(model, deep), None, SEQ2SEQ.compile(model, random_prompt(6, 3))]
    for prompts in [same_length, mixed] if arch == "t5" else [same_length]:
        together = _steps(model, tok, ids, prompts)  # (B, steps, V): every step's scores
        for i, (row, prompt) in enumerate(zip(ids, prompts)):
            torch.testing.assert_close(together[i : i + 1], _steps(model, tok, [row], [prompt]),
                                       atol=1e-5, rtol=1e-5)  # fmt: skip
    assert not torch.allclose(together[1], _steps(model, tok, ids[1:2], [deep])[0])
    if arch == "bart":
        with pytest.raises(SoftpromptError, match="cannot share a batch"):
            _steps(model, tok, ids, mixed)


def _steps_config(tok, steps: int = 4):
    """Greedy generation for exactly ``steps`` tokens (EOS held off), with every step's
    scores: what a row is given, compared beyond the (degenerate) tokens tiny models pick."""
    from softprompt.generation import generation_config

    gen = generation_config(tok, GenerateConfig(max_new_tokens=steps))
    gen.min_new_tokens, gen.output_scores, gen.return_dict_in_generate = steps, True, True
    return gen


def _steps(model, tok, ids, prompts) -> torch.Tensor:
    out = SEQ2SEQ.generate_ids(model, ids, prompts, _steps_config(tok))
    return torch.stack(out.scores, 1)  # (B, steps, V)


@pytest.mark.parametrize("arch", ARCHS)
def test_training_lowers_the_loss_saves_and_loads(kind_dirs, arch, tmp_path, capsys):
    """--method prefix on T5/BART: the loss falls, the folder holds PEFT's prefix (its
    starting point beside it), loads back to the trained prompt, and `inspect` reads it per
    decoder layer."""
    from softprompt.commands.inspect import format_inspection
    from softprompt.measure.inspection import inspect_prompt

    data = write_reviews(tmp_path / "train.jsonl")
    cfg = train_config(kind_dirs[arch], data, tmp_path / "run", template="review : {input}",
                       method="prefix", epochs=4, lr=0.3)  # fmt: skip
    result = train(cfg, progress=False)
    assert "keys and values in each of" in capsys.readouterr().err
    m = result.summary
    assert m["best_val_loss"] < m["initial_val_loss"]
    deep = result.prompt
    assert isinstance(deep, DeepPrompt) and deep.layout == LAYOUTS[arch]
    back, meta = load_prompt(result.output)  # no model: softprompt.json holds the layers
    assert meta["deep_layers"] == LAYOUTS[arch][0]
    torch.testing.assert_close(back.embedding, deep.embedding.detach())
    loaded = load_model(model=str(kind_dirs[arch]))
    info = inspect_prompt(loaded, result.output)
    assert [r["layer"] for r in info["layers"]] == list(range(LAYOUTS[arch][0]))
    assert info["layers"][0]["key_drift"] > 0  # moved from where it started
    assert "deep prompt: 4 virtual tokens" in format_inspection(info)


def test_resume_projection_and_refusals(kind_dirs, tmp_path):
    """On T5: an interrupted --method prefix run resumed equals an uninterrupted one (with
    --prefix-projection too, which starts at the same initial loss as without); a prompt
    inside the text is refused in one line."""
    from safetensors.torch import load_file

    t5 = kind_dirs["t5"]
    data = write_reviews(tmp_path / "train.jsonl")
    kw = dict(method="prefix", epochs=2, template="review : {input}")
    mlp = dict(prefix_projection=True, prefix_hidden=8)

    def final(name):
        return load_file(str(tmp_path / name / "adapter_model.safetensors"))["prompt_embeddings"]

    plain = train(train_config(t5, data, tmp_path / "plain", **kw), progress=False)
    for name, extra in (("ref", {}), ("mlp", mlp)):
        ref = train(train_config(t5, data, tmp_path / name, **extra, **kw), progress=False)
        with interrupted_at(4):
            train(train_config(t5, data, tmp_path / f"{name}-cut", save_every=2, **extra, **kw),
                  progress=False)  # fmt: skip
        train(train_config(t5, data, tmp_path / f"{name}-cut", save_every=2, resume=True,
                           **extra, **kw), progress=False)  # fmt: skip
        torch.testing.assert_close(final(f"{name}-cut"), final(name))
    assert ref.summary["initial_val_loss"] == pytest.approx(plain.summary["initial_val_loss"])
    assert isinstance(ref.prompt, DeepPrompt) and not torch.equal(final("mlp"), final("ref"))

    with pytest.raises(ConfigError, match="soft_prompt"):
        train(train_config(t5, data, tmp_path / "in", method="prefix",
                           template="review : {soft_prompt} {input}"))  # fmt: skip
    assert not (tmp_path / "in" / "adapter_model.safetensors").exists()


def test_cli_trains_evaluates_and_generates(kind_dirs, tmp_path, capsys):
    """`softprompt train --method prefix` on T5, then `eval` (choices and generation) and
    `generate` from the saved folder."""
    from softprompt.cli import main

    data = write_reviews(tmp_path / "train.jsonl")
    out = tmp_path / "run"
    common = ["--input-field", "review", "--target-field", "label"]
    assert main(["train", "--model", str(kind_dirs["t5"]), "--data", str(data), "--output",
                 str(out), "--method", "prefix", "--num-virtual-tokens", "4", "--epochs", "2",
                 "--batch-size", "4", *common]) == 0  # fmt: skip
    assert "learning rate 0.03: the default for deep prompts on seq2seq" in capsys.readouterr().err
    assert main(["eval", "--prompt", str(out), "--data", str(data), "--choices",
                 "negative,positive", "--generate", "--max-new-tokens", "3",
                 "--output", str(tmp_path / "ev"), *common]) == 0  # fmt: skip
    m = json.loads((tmp_path / "ev" / "results.json").read_text())["metrics"]
    assert {"loss", "accuracy", "exact_match"} <= set(m)
    capsys.readouterr()
    assert main(["generate", "--prompt", str(out), "--max-new-tokens", "3", "i love it"]) == 0
    assert "tuned" in capsys.readouterr().out


@pytest.mark.parametrize("arch", ARCHS)
def test_served_with_other_prompts(kind_dirs, tmp_path, arch):
    """A deep prompt folder served beside an input-layer prompt: concurrent requests over
    both and the base model share batches and each gets what it gets alone (BART's rows of
    a batch that mixes them run again one by one)."""
    from conftest import served_side_by_side

    loaded = load_model(model=str(kind_dirs[arch]))
    prompts = {"deep": _deep(loaded.model, 7, 5), "flat": random_prompt(8, 3)}
    with served_side_by_side(loaded, prompts, tmp_path / "prompts", SOURCES, 4) as (state, _):
        pass
    entries = {e.name: e for e in state.store.entries()}
    assert entries["deep"].prefix.deep and not entries["flat"].prefix.deep
