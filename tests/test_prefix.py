"""The compiled prompt prefix and mixed-prompt batches give what the plain path gives."""

from __future__ import annotations

import pytest
import torch
from conftest import random_prompt
from transformers import GenerationConfig

from softprompt.config import GenerateConfig
from softprompt.generation import GenerationRow as Row
from softprompt.generation import generate, pack_rows, plain_rows
from softprompt.loading import load_model
from softprompt.prefix import compile_all, compile_prefix
from softprompt.prompt import SoftPrompt
from softprompt.scoring import score_continuations

TEXTS = ["the movie was great", "i hate this screen and the battery was slow", "good"]
ARCHS = ["llama", "gemma3", "gpt2"]  # gemma3: sliding window 4 + full attention


def _logits(model, ids, prompts, cached: bool):
    """Greedy tokens and per-step logits through model.generate, one path or the other."""
    cfg = GenerationConfig(
        max_new_tokens=5, do_sample=False, pad_token_id=0, eos_token_id=1, output_logits=True
    )
    cfg.return_dict_in_generate = True
    if cached:
        embeds, mask, cache = pack_rows(model, [Row(i, p) for i, p in zip(ids, prompts)])
        out = model.generate(
            inputs_embeds=embeds, attention_mask=mask, past_key_values=cache, generation_config=cfg
        )
    else:
        embeds, mask = plain_rows(model, ids, prompts)
        out = model.generate(inputs_embeds=embeds, attention_mask=mask, generation_config=cfg)
    return out.sequences, torch.stack(out.logits, 1)  # (B, S), (B, S, V)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("n", [3, 12])  # 12: longer than the padding, so the cache is used
def test_prefix_equals_plain_path(loaded_all, arch, n):
    loaded = loaded_all[arch]
    model, tok = loaded.model, loaded.tokenizer
    prompt = random_prompt(0, n)
    ids = [tok(t)["input_ids"] for t in TEXTS]
    prefix = compile_prefix(model, prompt)
    tokens, logits = _logits(model, ids, [prefix] * 3, cached=True)
    ref_tokens, ref_logits = _logits(model, ids, [prompt] * 3, cached=False)
    assert torch.equal(tokens, ref_tokens)
    torch.testing.assert_close(logits, ref_logits, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("arch", ARCHS)
def test_mixed_batch_equals_rows_alone(loaded_all, arch):
    """Each row its own prompt (3, 12 virtual tokens, or none): batched == alone == plain."""
    loaded = loaded_all[arch]
    short, long = random_prompt(1, 3), random_prompt(2, 12)
    texts = TEXTS + TEXTS[:2]
    prompts = [long, None, short, short, long]
    cfg = GenerateConfig(max_new_tokens=6, batch_size=5)
    mixed = generate(loaded, texts, prompts, cfg)
    one = GenerateConfig(max_new_tokens=6, batch_size=1)
    alone = [generate(loaded, [t], [p], one)[0] for t, p in zip(texts, prompts)]
    plain = generate(loaded, texts, prompts, cfg, prefix_cache=False)
    assert mixed == alone == plain
    assert len(set(mixed)) > 1  # the prompts change the outputs: the test can fail


def test_prefix_runs_only_the_text(loaded_all):
    """With a compiled prefix the first forward sees the texts' width, not N + T."""
    loaded = loaded_all["llama"]
    model, tok = loaded.model, loaded.tokenizer
    widths = []
    hook = model.base_model.register_forward_pre_hook(
        lambda mod, args, kwargs: (
            widths.append(kwargs["inputs_embeds"].shape[1])
            if kwargs.get("inputs_embeds") is not None
            else None
        ),
        with_kwargs=True,
    )
    try:
        prefix = compile_prefix(model, random_prompt(0, 20))
        widths.clear()
        generate(loaded, TEXTS, prefix, GenerateConfig(max_new_tokens=2))
    finally:
        hook.remove()
    longest = max(len(tok(t)["input_ids"]) for t in TEXTS)
    assert widths == [longest]


def test_compile_all_compiles_each_prompt_once(loaded_all):
    model = loaded_all["gemma3"].model
    p = random_prompt(3, 5)
    compiled = compile_all(model, [p, None, p])
    assert compiled[0] is compiled[2] and compiled[1] is None
    assert compiled[0].length == 5 and len(compiled[0].keys) == model.config.num_hidden_layers


@pytest.mark.parametrize("arch", ARCHS)
def test_mixed_scoring_equals_rows_alone(loaded_all, arch):
    loaded = loaded_all[arch]
    prompts = [random_prompt(4, 6), None, random_prompt(5, 2)]
    conts = [" positive", " negative , bad", " good"]
    mixed = score_continuations(loaded, TEXTS, conts, prompts)
    alone = [
        score_continuations(loaded, [t], [c], [p])[0] for t, c, p in zip(TEXTS, conts, prompts)
    ]
    assert [n for _, n in mixed] == [1, 3, 1]
    for (a, _), (b, _) in zip(mixed, alone):
        assert a == pytest.approx(b, abs=1e-4) and a < 0
    assert mixed[0][0] != pytest.approx(
        score_continuations(loaded, TEXTS[:1], conts[:1], [None])[0][0]
    )


def test_prompt_count_must_match_texts(loaded_all):
    with pytest.raises(ValueError, match="one per text"):
        generate(loaded_all["llama"], TEXTS, [None])


@pytest.mark.slow
def test_prefix_equals_plain_path_on_embedded():
    loaded = load_model()
    model, tok = loaded.model, loaded.tokenizer
    emb = model.get_input_embeddings()(torch.tensor([[2, 651, 3437, 573, 1]]))[0].float()
    prompts = [SoftPrompt(emb[:4]), None, SoftPrompt(emb.repeat(3, 1))]  # 4, 0, 15 tokens
    ids = [tok(t)["input_ids"] for t in ["Review: great phone. Sentiment:", "Hi", "The sky is"]]
    compiled = compile_all(model, prompts)
    tokens, logits = _logits(model, ids, compiled, cached=True)
    ref_tokens, ref_logits = _logits(model, ids, prompts, cached=False)
    assert torch.equal(tokens, ref_tokens)
    torch.testing.assert_close(logits, ref_logits, atol=2e-3, rtol=1e-3)
