"""--gradient-checkpointing: the frozen layers run again in backward, and the prompt's
gradient is the plain path's (shared prefix, deep prompt, plain path behind heads)."""

from __future__ import annotations

import pytest
import torch
from conftest import random_prompt

from softprompt.cli import main
from softprompt.data import Example
from softprompt.loss import lm_loss
from softprompt.prefix import deepen
from softprompt.prompt import PromptSet
from softprompt.rows import collate, tokenize
from softprompt.training.recompute import decoder_layers, recomputing

PAIRS = [("the movie was great", "positive"), ("i hate this screen and the battery", "negative")]


def _batch(tok):
    examples = [Example(source=s, target=t, where="t") for s, t in PAIRS]
    return collate(tokenize(examples, tok, 64, " "), tok.pad_token_id)


def _grad_and_calls(model, prompts: PromptSet, batch, on: bool, shared: bool = True):
    """The prompt's gradient, the loss, and how often the first layer's attention ran."""
    calls = []
    attn = decoder_layers(model)[0]
    handle = next(m for m in attn.children()).register_forward_hook(lambda *_: calls.append(1))
    prompts.zero_grad()
    try:
        with recomputing(model, on):
            loss, _ = lm_loss(model, prompts, batch, shared_prefix=shared)
            loss.backward()
    finally:
        handle.remove()
    grad = next(prompts.parameters()).grad.clone()
    return grad, loss.detach(), len(calls)


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
@pytest.mark.parametrize("how", ["shared-prefix", "deep", "plain"])
def test_checkpointed_gradient_equals_plain(loaded_all, arch, how):
    loaded = loaded_all[arch]
    model, batch = loaded.model, _batch(loaded.tokenizer)
    prompt = random_prompt(0, 4)
    prompts = PromptSet([""], [deepen(model, prompt) if how == "deep" else prompt])
    shared = how != "plain"
    want, want_loss, plain_calls = _grad_and_calls(model, prompts, batch, False, shared)
    got, got_loss, calls = _grad_and_calls(model, prompts, batch, True, shared)
    torch.testing.assert_close(got_loss, want_loss, rtol=0, atol=0)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7)
    assert want.abs().sum() > 0
    # each forward of the layer ran once more in backward: the activations were not kept
    assert calls == 2 * plain_calls
    # and the model is as it was: outside the block nothing recomputes
    assert _grad_and_calls(model, prompts, batch, False, shared)[2] == plain_calls


def test_trains_with_gradient_checkpointing_and_refuses_encoders(
    tiny_dir, kind_dirs, pairs_file, tmp_path, capsys
):
    """The flag goes through the CLI to the loop: the same prompt as without it; an
    encoder-decoder is refused in one line."""
    args = ["train", "--model", str(tiny_dir), "--data", str(pairs_file), "--input-field",
            "review", "--target-field", "label", "--num-virtual-tokens", "4", "--max-steps",
            "3", "--lr", "0.3", "--val-fraction", "0"]  # fmt: skip
    assert main([*args, "--output", str(tmp_path / "plain")]) == 0
    assert main([*args, "--gradient-checkpointing", "--output", str(tmp_path / "ckpt")]) == 0
    from safetensors.torch import load_file

    a, b = (
        load_file(str(tmp_path / d / "adapter_model.safetensors"))["prompt_embeddings"]
        for d in ("plain", "ckpt")
    )
    torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)
    capsys.readouterr()
    t5 = [*args, "--gradient-checkpointing", "--output", str(tmp_path / "t5")]
    t5[t5.index(str(tiny_dir))] = str(kind_dirs["t5"])
    assert main(t5) == 2
    err = capsys.readouterr().err
    assert "--gradient-checkpointing: decoder (causal) models only" in err
