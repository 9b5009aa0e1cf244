"""--quantize: a frozen base whose decoder layers hold int8 or nf4 weights (torchao). The
prompt's gradient flows back through them, a tiny model trains, and the saved prompt records
the quantization and loads on the unquantized base with a note."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import random_prompt

pytest.importorskip("torchao")

from softprompt.artifacts import load_prompt  # noqa: E402
from softprompt.cli import main  # noqa: E402
from softprompt.config import DataConfig, ModelConfig, TrainConfig  # noqa: E402
from softprompt.data import Example  # noqa: E402
from softprompt.errors import ConfigError  # noqa: E402
from softprompt.loading import decoder_layers, load_model  # noqa: E402
from softprompt.loss import lm_loss  # noqa: E402
from softprompt.prompt import PromptSet  # noqa: E402
from softprompt.quantize import quantization  # noqa: E402
from softprompt.rows import collate, tokenize  # noqa: E402

PAIRS = [("the movie was great", "positive"), ("i hate this screen and the battery", "negative")]


def _batch(tok):
    examples = [Example(source=s, target=t, where="t") for s, t in PAIRS]
    return collate(tokenize(examples, tok, 64, " "), tok.pad_token_id)


def _grad(model, tok):
    batch = _batch(tok)
    prompts = PromptSet([""], [random_prompt(0, 4)])
    loss, _ = lm_loss(model, prompts, batch)
    loss.backward()
    return loss.detach(), next(prompts.parameters()).grad


@pytest.mark.parametrize("how", ["int8", "nf4"])
@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_gradient_flows_through_quantized_layers(model_dirs, loaded_all, how, arch):
    plain = loaded_all[arch]
    quant = load_model(model=str(model_dirs[arch]), quantize=how)
    assert quantization(quant.model) == how and quantization(plain.model) is None
    linears = [m for m in decoder_layers(quant.model).modules() if isinstance(m, torch.nn.Linear)]
    assert linears and all(type(m.weight) is not torch.nn.Parameter for m in linears)
    head = quant.model.get_output_embeddings().weight
    assert type(head) is torch.nn.Parameter and head.dtype == torch.float32  # kept whole
    want_loss, want = _grad(plain.model, plain.tokenizer)
    got_loss, got = _grad(quant.model, quant.tokenizer)
    assert torch.isfinite(got).all() and got.abs().sum() > 0
    # the same function, up to the weights' rounding (nf4: 16 levels, a coarser match)
    tol = 0.02 if how == "int8" else 0.25
    assert abs(float(got_loss - want_loss)) < tol * float(want_loss)
    assert float(torch.nn.functional.cosine_similarity(got.flatten(), want.flatten(), 0)) > (
        0.99 if how == "int8" else 0.8
    )


@pytest.mark.parametrize("how", ["int8", "nf4"])
def test_backward_keeps_no_float_copy_of_a_quantized_weight(model_dirs, how):
    """What autograd saves in a forward pass holds no de-quantized weight (torchao's own int8
    linear saved one per layer, so an int8 base trained above a float32 one's peak)."""
    quant = load_model(model=str(model_dirs["llama"]), quantize=how)
    shapes = {tuple(m.weight.shape) for m in decoder_layers(quant.model).modules()
              if isinstance(m, torch.nn.Linear)}  # fmt: skip
    shapes |= {s[::-1] for s in shapes}
    saved = []

    def pack(t):
        if type(t) is torch.Tensor and t.is_floating_point():
            saved.append(tuple(t.shape))
        return t

    batch, prompts = _batch(quant.tokenizer), PromptSet([""], [random_prompt(0, 4)])
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss, _ = lm_loss(quant.model, prompts, batch)
    assert saved and not shapes & set(saved)
    loss.backward()
    assert next(prompts.parameters()).grad.abs().sum() > 0


@pytest.mark.parametrize("how", ["int8", "nf4"])
def test_prompt_learns_on_a_quantized_base(tmp_path, how):
    """20 steps on one batch: the loss falls. The tests' tiny models are too weak for that
    (weights of std 0.02: the output hardly depends on the input), so this one has std 0.5."""
    from conftest import make_tokenizer
    from transformers import AutoModelForCausalLM, LlamaConfig

    tok = make_tokenizer()
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=16, intermediate_size=32,
                      num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                      initializer_range=0.5, bos_token_id=2, eos_token_id=1,
                      pad_token_id=0)  # fmt: skip
    AutoModelForCausalLM.from_config(cfg).save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    loaded = load_model(model=str(tmp_path / "m"), quantize=how)
    batch, prompts = _batch(loaded.tokenizer), PromptSet([""], [random_prompt(0, 4)])
    optimizer = torch.optim.Adam(prompts.parameters(), lr=0.1)
    losses = []
    for _ in range(20):
        optimizer.zero_grad()
        loss, n = lm_loss(loaded.model, prompts, batch)
        (loss / n).backward()
        optimizer.step()
        losses.append(float(loss.detach() / n))
    assert losses[-1] < 0.6 * losses[0]


def test_int8_prompt_records_it_and_loads_on_the_plain_base(tiny_dir, pairs_file, tmp_path, capsys):
    out = tmp_path / "run"
    args = ["train", "--model", str(tiny_dir), "--data", str(pairs_file), "--input-field",
            "review", "--target-field", "label", "--num-virtual-tokens", "4", "--max-steps",
            "2", "--batch-size", "4", "--lr", "0.3", "--val-fraction", "0", "--quantize",
            "int8", "--method", "prompt", "--output", str(out)]  # fmt: skip
    assert main(args) == 0
    assert "--quantize int8: 14 linear layers of the decoder stack quantized" in (
        capsys.readouterr().err
    )
    meta = json.loads((out / "softprompt.json").read_text())
    assert meta["base_model"]["quantization"] == "int8"
    plain = load_model(model=str(tiny_dir))
    prompt, _ = load_prompt(out, plain.model)  # the same embeddings: it fits
    err = capsys.readouterr().err
    assert "was trained on the int8-quantized base; this one is unquantized" in err
    assert prompt.embedding.shape == (4, 16)


def test_refusals_in_one_line(tiny_dir):
    with pytest.raises(ConfigError, match="cannot split quantized layers"):
        TrainConfig(model=ModelConfig(model=str(tiny_dir), quantize="int8"), shard_model=True,
                    data=DataConfig(data="train.jsonl"))  # fmt: skip
    with pytest.raises(ConfigError, match="quantize must be one of none, int8, nf4"):
        ModelConfig(quantize="int4")


def test_weights_leave_the_mapped_file_without_losing_a_value(model_dirs):
    """Copying a weight out of the mapped safetensors file gives its pages back as it goes
    (``_page_out``): the copy equals the weight, a page given back reads the same from the
    file again, and memory that is not a weights file's mapping is never touched."""
    from transformers import AutoModelForCausalLM

    from softprompt.quantize import _copy_out, _page_out, _weight_file_ranges

    mine = torch.randn(4096, 64)  # this process's own memory: left alone
    kept = mine.clone()
    _page_out(mine)
    assert torch.equal(mine, kept)
    model = AutoModelForCausalLM.from_pretrained(model_dirs["llama"])
    weight = model.get_input_embeddings().weight.data
    start = weight.data_ptr()
    end = start + weight.numel() * weight.element_size()
    assert any(a <= start and end <= b for a, b in _weight_file_ranges())  # a view of the file
    want = weight.clone()
    copied = _copy_out(weight)
    assert torch.equal(copied, want) and copied.data_ptr() != weight.data_ptr()
    assert torch.equal(weight, want)  # the pages given back come again from the file
