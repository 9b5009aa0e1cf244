"""The chunked LM loss: the same loss and gradients as the full logits, in float tolerance."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from softprompt import loss as loss_mod
from softprompt.loss import chunked_cross_entropy, head_logits, lm_loss, token_logprobs
from softprompt.rows import IGNORE_INDEX, Row, collate
from softprompt.scoring import row_logprobs
from tests.conftest import random_prompt


def _plain(model, hidden, gold):
    return F.cross_entropy(head_logits(model, hidden).float(), gold, reduction="sum")


@pytest.mark.parametrize("kind", ["llama", "gemma3", "gpt2"])
@pytest.mark.parametrize("cap", [None, 3.0])
def test_chunked_cross_entropy_equals_full_logits(loaded_all, kind, cap, monkeypatch):
    model = loaded_all[kind].model
    monkeypatch.setattr(model.config, "final_logit_softcapping", cap, raising=False)
    monkeypatch.setattr(loss_mod, "CHUNK_ELEMENTS", 3 * model.config.vocab_size)  # 3 rows
    gen = torch.Generator().manual_seed(1)
    hidden = (torch.randn(10, 16, generator=gen) * 3).requires_grad_()
    gold = torch.randint(0, model.config.vocab_size, (10,), generator=gen)
    head = model.get_output_embeddings()
    want = _plain(model, hidden, gold)
    (want_grad,) = torch.autograd.grad(want, hidden)
    got = chunked_cross_entropy(hidden, head.weight, head.bias, gold, cap)
    (got_grad,) = torch.autograd.grad(got * 1.0, hidden)
    assert torch.allclose(got, want, rtol=1e-5, atol=1e-5)
    assert torch.allclose(got_grad, want_grad, rtol=1e-4, atol=1e-6)
    lp = token_logprobs(model, hidden.detach(), gold)
    ref = F.log_softmax(head_logits(model, hidden.detach()).float(), -1)[torch.arange(10), gold]
    assert torch.allclose(lp, ref, atol=1e-5)


def test_chunked_cross_entropy_trains_the_head_too():
    """A trained head (full fine-tuning in `compare`) gets its weight and bias gradients."""
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(7, 5, generator=gen, requires_grad=True)
    weight = torch.randn(11, 5, generator=gen, requires_grad=True)
    bias = torch.randn(11, generator=gen, requires_grad=True)
    gold = torch.randint(0, 11, (7,), generator=gen)
    want = F.cross_entropy(F.linear(hidden, weight, bias), gold, reduction="sum")
    grads = torch.autograd.grad(want, (hidden, weight, bias))
    got = chunked_cross_entropy(hidden, weight, bias, gold, None)
    for a, b in zip(torch.autograd.grad(got, (hidden, weight, bias)), grads):
        assert torch.allclose(a, b, atol=1e-5)


@pytest.mark.parametrize("kind", ["llama", "gemma3", "gpt2"])
def test_lm_loss_and_prompt_gradient_equal_the_full_logits_path(loaded_all, kind, monkeypatch):
    """The training loss on a batch (shared prefix, chunked head) against the model's own
    full forward with every logit."""
    model, tok = loaded_all[kind].model, loaded_all[kind].tokenizer
    monkeypatch.setattr(loss_mod, "CHUNK_ELEMENTS", 2 * model.config.vocab_size)
    texts = ["the movie was great positive", "boring book negative", "i love it"]
    rows = []
    for t in texts:
        ids = tok(t)["input_ids"]
        rows.append(Row(ids, [IGNORE_INDEX] + ids[1:]))
    batch = collate(rows, tok.pad_token_id)
    prompt = random_prompt().requires_grad_()
    got, n = lm_loss(model, prompt, batch)
    (g_got,) = torch.autograd.grad(got, prompt.embedding)
    want, m = loss_mod._loss(model, prompt, batch, False, False, None)  # full logits
    (g_want,) = torch.autograd.grad(want, prompt.embedding)
    assert n == m
    assert torch.allclose(got, want, rtol=1e-4, atol=1e-5)
    assert torch.allclose(g_got, g_want, rtol=1e-3, atol=1e-6)
    scores = row_logprobs(model, prompt, rows, 2, tok.pad_token_id)
    assert sum(s for s, _ in scores) == pytest.approx(-float(want.detach()), rel=1e-4)


def test_chunked_cross_entropy_without_grad_mode_computes_no_gradient(loaded_all):
    """Under no_grad (evaluation) only the loss is computed, and it is the same."""
    model = loaded_all["llama"].model
    head = model.get_output_embeddings()
    hidden = torch.randn(5, 16, requires_grad=True)
    gold = torch.arange(5)
    with_grad = chunked_cross_entropy(hidden, head.weight, head.bias, gold)
    with torch.no_grad():
        without = chunked_cross_entropy(hidden, head.weight, head.bias, gold)
    assert not without.requires_grad and torch.allclose(with_grad.detach(), without)
    (scaled,) = torch.autograd.grad(with_grad * 3.0, hidden)  # the backward scales
    (plain,) = torch.autograd.grad(_plain(model, hidden, gold) * 3.0, hidden)
    assert torch.allclose(scaled, plain, atol=1e-5)
