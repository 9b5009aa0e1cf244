"""The soft prompt: initialisation, placement, and losses that padding cannot change."""

from __future__ import annotations

import math

import pytest
import torch

from softprompt.config import PromptConfig
from softprompt.data import Example
from softprompt.loading import load_model
from softprompt.loss import lm_loss, support
from softprompt.prompt import SoftPrompt, embed_tokens, init_prompt
from softprompt.rows import IGNORE_INDEX, collate, tokenize

ARCHS = ["llama", "gemma3", "gpt2"]


def _rows(tok, texts_targets, limit=64):
    exs = [Example(s, t, "test") for s, t in texts_targets]
    return tokenize(exs, tok, limit)


PAIRS = [
    ("the movie was great", "positive"),
    ("i hate this screen and the battery was slow", "negative"),
    ("good", "positive"),
]


def test_model_is_frozen(loaded_all):
    """Loading freezes every base weight and switches off dropout."""
    for loaded in loaded_all.values():
        assert not any(p.requires_grad for p in loaded.model.parameters())
        assert not loaded.model.training


def test_prompt_is_float32_and_prepended(loaded_all):
    """The prompt stays fp32; prepend extends embeds, mask and labels at the front."""
    loaded = loaded_all["llama"]
    prompt = init_prompt(loaded.model, loaded.tokenizer, PromptConfig(num_virtual_tokens=3))
    assert prompt.embedding.dtype == torch.float32 and prompt.embedding.shape == (3, 16)
    ids = torch.tensor([[2, 5, 6]])
    emb = embed_tokens(loaded.model, ids).to(torch.bfloat16)
    e, m, lab = prompt.prepend(emb, torch.ones_like(ids), ids.clone())
    assert e.shape == (1, 6, 16) and e.dtype == torch.bfloat16
    assert m.tolist() == [[1, 1, 1, 1, 1, 1]]
    assert lab.tolist() == [[IGNORE_INDEX] * 3 + [2, 5, 6]]
    torch.testing.assert_close(e[0, :3], prompt.embedding.to(torch.bfloat16))


def test_text_init_lives_in_scaled_embedding_space(loaded_all):
    """Gemma scales token vectors by sqrt(hidden) inside its embedding layer: a text-initialised
    prompt must equal what that layer returns, not the raw weight rows."""
    loaded = loaded_all["gemma3"]
    model, tok = loaded.model, loaded.tokenizer
    cfg = PromptConfig(num_virtual_tokens=5, init="text", init_text="great movie")
    prompt = init_prompt(model, tok, cfg)
    ids = tok("great movie", add_special_tokens=False)["input_ids"]
    expected_ids = (ids * 5)[:5]  # repeated, then cut
    raw = model.get_input_embeddings().weight[expected_ids]
    torch.testing.assert_close(prompt.embedding, raw * math.sqrt(16), rtol=1e-5, atol=1e-5)


def test_random_and_vocab_init(loaded_all):
    """Random init matches the scale of real embeddings; vocab init copies non-special tokens."""
    loaded = loaded_all["gemma3"]
    model, tok = loaded.model, loaded.tokenizer
    real_std = embed_tokens(model, torch.arange(4, 50)).std().item()
    rnd = init_prompt(model, tok, PromptConfig(num_virtual_tokens=200, init="random"), seed=1)
    assert abs(rnd.embedding.std().item() / real_std - 1) < 0.3
    voc = init_prompt(model, tok, PromptConfig(num_virtual_tokens=6, init="vocab"), seed=1)
    table = embed_tokens(model, torch.arange(len(tok)))  # (V, H)
    special = set(tok.all_special_ids)
    for row in voc.embedding:
        match = torch.isclose(table, row, atol=1e-6).all(dim=1).nonzero().flatten().tolist()
        assert match and not special.intersection(match)
    again = init_prompt(model, tok, PromptConfig(num_virtual_tokens=6, init="vocab"), seed=1)
    torch.testing.assert_close(voc.embedding, again.embedding)


@pytest.mark.parametrize("arch", ARCHS)
def test_padded_batch_equals_rows_alone(loaded_all, arch):
    """Right padding: each row's loss in a padded batch equals its loss computed alone."""
    loaded = loaded_all[arch]
    model, tok = loaded.model, loaded.tokenizer
    prompt = init_prompt(model, tok, PromptConfig(num_virtual_tokens=4, init="random"))
    rows = _rows(tok, PAIRS)
    batch_losses = []
    for i in range(len(rows)):  # the row's share of a batched pass, isolated by masking labels
        masked = [
            r if j == i else type(r)(r.input_ids, [IGNORE_INDEX] * len(r.labels))
            for j, r in enumerate(rows)
        ]
        loss, n = lm_loss(model, prompt, collate(masked, tok.pad_token_id))
        batch_losses.append(float(loss.detach()) / n)
    for i, row in enumerate(rows):
        loss, n = lm_loss(model, prompt, collate([row], tok.pad_token_id))
        assert float(loss.detach()) / n == pytest.approx(batch_losses[i], rel=1e-5, abs=1e-6)


@pytest.mark.parametrize("arch", ARCHS)
def test_fast_head_equals_full_forward(loaded_all, arch):
    """Computing the LM head only at labelled positions gives the same loss and gradient as
    the model's own full forward."""
    loaded = loaded_all[arch]
    model, tok = loaded.model, loaded.tokenizer
    batch = collate(_rows(tok, PAIRS), tok.pad_token_id)
    results = []
    for fast in (True, False):
        prompt = init_prompt(model, tok, PromptConfig(num_virtual_tokens=4, init="random"), seed=3)
        loss, n = lm_loss(model, prompt, batch, fast_head=fast)
        (loss / n).backward()
        results.append((loss.detach(), prompt.embedding.grad.clone()))
    assert support(model).fast_head is True
    torch.testing.assert_close(results[0][0], results[1][0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(results[0][1], results[1][1], rtol=1e-4, atol=1e-6)


def test_loss_matches_transformers_labels(loaded_all):
    """Our summed loss / count equals transformers' own mean loss with the same labels."""
    loaded = loaded_all["llama"]
    model, tok = loaded.model, loaded.tokenizer
    prompt = SoftPrompt(torch.randn(3, 16) * 0.1)
    batch = collate(_rows(tok, PAIRS[:1]), tok.pad_token_id)
    loss, n = lm_loss(model, prompt, batch)
    emb, mask, labels = prompt.prepend(
        embed_tokens(model, batch["input_ids"]), batch["attention_mask"], batch["labels"]
    )
    ref = model(inputs_embeds=emb, attention_mask=mask, labels=labels).loss
    assert float(loss.detach()) / n == pytest.approx(float(ref.detach()), rel=1e-5)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("label_first", [False, True])
def test_shared_prefix_equals_prompt_per_row(loaded_all, arch, label_first):
    """Running the virtual tokens once per batch and sharing their keys/values gives the
    loss and prompt gradient of running them in every row (gemma3's sliding window is
    smaller than the prompt here, so the window crosses the prefix boundary)."""
    loaded = loaded_all[arch]
    model, tok = loaded.model, loaded.tokenizer
    batch = collate(_rows(tok, PAIRS), tok.pad_token_id)
    if label_first:  # the last virtual token must then predict the first text token
        batch["labels"][:, 0] = batch["input_ids"][:, 0]
    results = []
    for shared in (True, False):
        prompt = init_prompt(model, tok, PromptConfig(num_virtual_tokens=6, init="random"), seed=4)
        loss, n = lm_loss(model, prompt, batch, shared_prefix=shared)
        (loss / n).backward()
        results.append((loss.detach(), n, prompt.embedding.grad.clone()))
    assert support(model).shared_prefix is True
    assert results[0][1] == results[1][1]
    torch.testing.assert_close(results[0][0], results[1][0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(results[0][2], results[1][2], rtol=1e-4, atol=1e-6)


def test_bf16_weights_keep_a_float32_prompt_and_close_loss(tiny_dir):
    """With bfloat16 weights the prompt and its gradient stay float32 and the loss stays
    close to the float32 model's."""
    f32 = load_model(model=str(tiny_dir))
    bf16 = load_model(model=str(tiny_dir), dtype="bfloat16")
    batch = collate(_rows(f32.tokenizer, PAIRS), f32.tokenizer.pad_token_id)
    losses = []
    for loaded in (f32, bf16):
        prompt = init_prompt(loaded.model, loaded.tokenizer, PromptConfig(num_virtual_tokens=4))
        loss, n = lm_loss(loaded.model, prompt, batch)
        (loss / n).backward()
        assert prompt.embedding.grad.dtype == torch.float32
        losses.append(float(loss.detach()) / n)
    assert losses[1] == pytest.approx(losses[0], rel=2e-2)


@pytest.mark.parametrize("arch", ARCHS)
def test_choice_loss_equal_on_both_paths(loaded_all, arch):
    """The classification loss (softmax over the choices' first tokens, first labelled
    position of each row) is the same with and without the shared prefix."""
    loaded = loaded_all[arch]
    model, tok = loaded.model, loaded.tokenizer
    batch = collate(_rows(tok, PAIRS), tok.pad_token_id)
    choices = torch.tensor([tok.convert_tokens_to_ids(w) for w in ("positive", "negative")])
    results = []
    for shared in (True, False):
        prompt = init_prompt(model, tok, PromptConfig(num_virtual_tokens=5, init="random"), seed=2)
        loss, n = lm_loss(model, prompt, batch, shared_prefix=shared, choice_ids=choices)
        (loss / n).backward()
        results.append((loss.detach(), n, prompt.embedding.grad.clone()))
    assert results[0][1] == results[1][1] == len(PAIRS)  # one position per row
    torch.testing.assert_close(results[0][0], results[1][0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(results[0][2], results[1][2], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("arch", ARCHS)
def test_choice_hits_count_the_label_ranked_first_on_every_path(loaded_all, arch):
    """Validation accuracy (``hits``) is the same on the shared-prefix, plain and
    full-logits paths, with and without the rest logit, and equals the argmax over the
    choices' columns of the full logits at each row's answer position."""
    from softprompt import loss as loss_mod
    from softprompt.loss import head_logits, with_rest

    loaded = loaded_all[arch]
    model, tok = loaded.model, loaded.tokenizer
    batch = collate(_rows(tok, PAIRS * 2), tok.pad_token_id)
    words = ("positive", "negative")
    choices = torch.tensor([tok.convert_tokens_to_ids(w) for w in words])
    wins = set()
    for seed in range(4):  # prompts that rank the labels differently
        prompt = init_prompt(model, tok, PromptConfig(num_virtual_tokens=5, init="random"),
                             seed=seed)  # fmt: skip
        emb, mask, labels = prompt.prepend(embed_tokens(model, batch["input_ids"]),
                                           batch["attention_mask"], batch["labels"])  # fmt: skip
        with torch.no_grad():
            hidden = model.base_model(inputs_embeds=emb, attention_mask=mask).last_hidden_state
            targets = labels[:, 1:]
            first = (targets != IGNORE_INDEX) & ((targets != IGNORE_INDEX).cumsum(1) == 1)
            logits = head_logits(model, hidden[:, :-1][first])[:, choices]
            gold = (targets[first].unsqueeze(1) == choices).long().argmax(1)
            want = int((logits.argmax(1) == gold).sum())
            for ids in (choices, with_rest(choices)):
                for fast, shared in ((True, True), (True, False), (False, False)):
                    hits: list[int] = []
                    loss_mod._loss(model, prompt, batch, fast, shared, ids, hits)
                    assert sum(hits) == want, (fast, shared, len(ids))
        wins.add(want)
    assert len(wins) > 1  # the prompts did rank differently: the count was tested
