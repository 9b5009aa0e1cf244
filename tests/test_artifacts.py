"""The artifact: PEFT loads ours, we load PEFT's, and wrong or broken prompts are refused."""

from __future__ import annotations

import json

import pytest
import torch
from peft import PeftModel, PromptTuningConfig, get_peft_model
from safetensors.torch import load_file

from softprompt.artifacts import META, PROMPT_KEY, fingerprint, load_prompt, save_prompt
from softprompt.errors import ArtifactError
from softprompt.loading import load_model
from softprompt.prompt import SoftPrompt, embed_tokens


def _our_logits(model, prompt, ids, mask):
    emb, m, _ = prompt.prepend(embed_tokens(model, ids), mask)
    with torch.no_grad():
        return model(inputs_embeds=emb, attention_mask=m).logits


def _batch(tok):
    enc = tok(["the movie was great", "boring"], padding=True, return_tensors="pt")
    return enc["input_ids"], enc["attention_mask"]


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_peft_loads_our_prompt_with_same_logits(model_dirs, tmp_path, arch):
    """PeftModel.from_pretrained reads our folder and computes the same logits as we do."""
    ours = load_model(model=str(model_dirs[arch]))
    prompt = SoftPrompt(torch.randn(5, 16, generator=torch.Generator().manual_seed(0)))
    save_prompt(tmp_path / "p", prompt, ours.model, ours.name)
    assert set(load_file(str(tmp_path / "p" / "adapter_model.safetensors"))) == {PROMPT_KEY}

    ids, mask = _batch(ours.tokenizer)
    expected = _our_logits(ours.model, prompt, ids, mask)
    base = load_model(model=str(model_dirs[arch])).model
    peft_model = PeftModel.from_pretrained(base, str(tmp_path / "p"))
    with torch.no_grad():
        got = peft_model(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_we_load_a_peft_prompt_with_same_logits(model_dirs, tmp_path):
    """A prompt-tuning adapter saved by PEFT loads in softprompt and gives PEFT's logits."""
    base = load_model(model=str(model_dirs["llama"])).model
    cfg = PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4)
    peft_model = get_peft_model(base, cfg)
    with torch.no_grad():
        emb = peft_model.prompt_encoder["default"].embedding.weight
        emb.copy_(torch.randn_like(emb))
    peft_model.save_pretrained(tmp_path / "peft")
    ours = load_model(model=str(model_dirs["llama"]))
    prompt, meta = load_prompt(tmp_path / "peft", ours.model)
    assert prompt.num_virtual_tokens == 4
    ids, mask = _batch(ours.tokenizer)
    with torch.no_grad():
        expected = peft_model(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(_our_logits(ours.model, prompt, ids, mask), expected)


def test_prompt_for_another_model_is_refused(model_dirs, tmp_path):
    """Same width, different weights: refused by fingerprint unless allow_mismatch."""
    llama = load_model(model=str(model_dirs["llama"]))
    gemma = load_model(model=str(model_dirs["gemma3"]))
    assert fingerprint(llama.model) != fingerprint(gemma.model)
    save_prompt(tmp_path / "p", SoftPrompt(torch.zeros(2, 16)), llama.model, llama.name)
    with pytest.raises(ArtifactError, match="was trained for .*llama.*--model"):
        load_prompt(tmp_path / "p", gemma.model)
    prompt, _ = load_prompt(tmp_path / "p", gemma.model, allow_mismatch=True)
    assert prompt.num_virtual_tokens == 2


def test_wrong_width_is_refused(tiny_dir, tmp_path):
    loaded = load_model(model=str(tiny_dir))
    save_prompt(tmp_path / "p", SoftPrompt(torch.zeros(2, 8)), loaded.model, loaded.name)
    with pytest.raises(ArtifactError, match="width 8 .* 16"):
        load_prompt(tmp_path / "p", loaded.model)


def test_fingerprint_ignores_dtype(tiny_dir):
    """The same weights loaded in float32 or bfloat16 have the same fingerprint."""
    f32 = load_model(model=str(tiny_dir)).model
    bf16 = load_model(model=str(tiny_dir), dtype="bfloat16").model
    assert fingerprint(f32) == fingerprint(bf16)


def test_missing_and_corrupt_artifacts(tiny_dir, tmp_path):
    loaded = load_model(model=str(tiny_dir))
    with pytest.raises(ArtifactError, match="holds no saved prompt"):
        load_prompt(tmp_path / "nothing", loaded.model)
    save_prompt(tmp_path / "p", SoftPrompt(torch.zeros(2, 16)), loaded.model, loaded.name)
    (tmp_path / "p" / META).write_text("{not json")
    with pytest.raises(ArtifactError, match="corrupt"):
        load_prompt(tmp_path / "p", loaded.model)
    save_prompt(tmp_path / "q", SoftPrompt(torch.zeros(2, 16)), loaded.model, loaded.name)
    (tmp_path / "q" / "adapter_model.safetensors").write_bytes(b"\x00" * 20)
    with pytest.raises(ArtifactError, match="corrupt"):
        load_prompt(tmp_path / "q", loaded.model)


def test_metadata_describes_the_base_model(tiny_dir, tmp_path):
    loaded = load_model(model=str(tiny_dir))
    save_prompt(
        tmp_path / "p",
        SoftPrompt(torch.zeros(3, 16)),
        loaded.model,
        loaded.name,
        {"template": "x {input}"},
    )
    meta = json.loads((tmp_path / "p" / META).read_text())
    base = meta["base_model"]
    assert base["name"] == str(tiny_dir.resolve())
    assert base["architecture"] == "LlamaForCausalLM"
    assert (base["hidden_size"], base["vocab_size"]) == (16, loaded.model.config.vocab_size)
    assert base["fingerprint"] == fingerprint(loaded.model)
    assert meta["template"] == "x {input}" and meta["num_virtual_tokens"] == 3
    adapter = json.loads((tmp_path / "p" / "adapter_config.json").read_text())
    assert adapter["peft_type"] == "PROMPT_TUNING" and adapter["num_virtual_tokens"] == 3
    assert (tmp_path / "p" / "adapter_model.safetensors").stat().st_size < 1024
