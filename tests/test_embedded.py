"""Slow tests with the embedded Gemma 3 270M (converted once into the user's cache)."""

from __future__ import annotations

import json

import pytest
import torch

from softprompt.artifacts import fingerprint, load_prompt
from softprompt.cli import main
from softprompt.loading import load_model
from softprompt.prompt import embed_tokens

pytestmark = pytest.mark.slow
DATA = "examples/sentiment/train.jsonl"


def test_embedded_model_loads_offline(gemma):
    model = gemma.model
    assert gemma.name == "embedded"
    assert type(model).__name__ == "Gemma3ForCausalLM"
    assert gemma.hidden_size == 640 and model.config.vocab_size == 262144
    assert not any(p.requires_grad for p in model.parameters())
    assert gemma.tokenizer("Hello world")["input_ids"][0] == gemma.tokenizer.bos_token_id
    # Gemma scales token vectors inside the embedding layer; prompts live in that space.
    ids = torch.tensor([[9259]])
    raw = model.get_input_embeddings().weight[9259]
    torch.testing.assert_close(embed_tokens(model, ids)[0, 0], raw * 640**0.5)
    assert len(fingerprint(model)) == 16


def test_train_generate_and_peft_on_embedded(gemma, tmp_path, capsys):
    """A few steps through the CLI, then the artifact: PEFT loads it with our logits."""
    out = tmp_path / "run"
    rc = main(
        [
            "train",
            "--data",
            DATA,
            "--input-field",
            "review",
            "--target-field",
            "label",
            "--template",
            "Review: {input}\\nSentiment:",
            "--max-steps",
            "3",
            "--batch-size",
            "4",
            "--num-virtual-tokens",
            "8",
            "--val-fraction",
            "0.02",
            "--method",
            "prompt",  # PEFT's PROMPT_TUNING below (the decoders' default is a deep prompt)
            "--output",
            str(out),
        ]
    )
    assert rc == 0
    meta = json.loads((out / "softprompt.json").read_text())
    assert meta["base_model"]["name"] == "embedded"
    assert meta["base_model"]["fingerprint"] == fingerprint(gemma.model)
    assert meta["template"] == "Review: {input}\nSentiment:"
    assert meta["metrics"]["steps"] == 3

    rc = main(
        [
            "generate",
            "--prompt",
            str(out),
            "--compare",
            "--max-new-tokens",
            "4",
            "Great phone, the battery lasts for days.",
        ]
    )
    text = capsys.readouterr().out
    assert rc == 0 and "  base    : " in text and "  tuned   : " in text

    from peft import PeftModel

    prompt, _ = load_prompt(out, gemma.model)
    enc = gemma.tokenizer(["Review: Awful.\nSentiment:"], return_tensors="pt")
    emb, mask, _ = prompt.prepend(
        embed_tokens(gemma.model, enc["input_ids"]), enc["attention_mask"]
    )
    with torch.no_grad():
        ours = gemma.model(inputs_embeds=emb, attention_mask=mask).logits[:, -1]
        peft_model = PeftModel.from_pretrained(load_model().model, str(out))
        theirs = peft_model(**enc).logits[:, -1]
    torch.testing.assert_close(theirs, ours, rtol=1e-4, atol=1e-3)
