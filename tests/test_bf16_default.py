"""The default `--dtype auto` on a host with native bf16: every command runs end to end on
bfloat16 weights. The other tests run float32 (conftest: `auto` as on a host without native
bf16) because they compare numbers exactly; here `_cpu_has_bf16` says yes, as it does on an
x86 CPU with AVX-512 BF16 or AMX, so these hold wherever CI runs (an emulated bf16 matmul is
slow, not wrong, and the models are 16 wide)."""

from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import write_reviews
from safetensors.torch import load_file

from softprompt.cli import main

TEMPLATE = "review : {input} sentiment :"


@pytest.fixture(autouse=True)
def _native_bf16(monkeypatch):
    from softprompt import loading

    monkeypatch.setattr(loading, "_cpu_has_bf16", lambda: True)
    monkeypatch.setattr(loading.torch.cuda, "is_available", lambda: False)


def _run(argv: list[str], capsys) -> str:
    code = main(argv)
    said = capsys.readouterr()
    assert code == 0, said.err
    return said.out + said.err


def _data(tmp_path) -> list[str]:
    data = write_reviews(tmp_path / "train.jsonl")
    return ["--data", str(data), "--input-field", "review", "--target-field", "label"]


def test_a_decoder_trains_evaluates_and_generates_in_bf16(model_dirs, tmp_path, capsys):
    """train (a deep prompt, the decoders' default), eval with choices and generation,
    generate: bfloat16 weights chosen by auto and said; the saved prompt is float32, as PEFT
    stores it; the losses and scores are finite."""
    data, out = _data(tmp_path), tmp_path / "run"
    model = ["--model", str(model_dirs["llama"])]
    said = _run(["train", *model, *data, "--template", TEMPLATE, "--val-fraction", "0.25",
                 "--max-steps", "4", "--batch-size", "3", "--output", str(out)],
                capsys)  # fmt: skip
    assert "bfloat16, chosen by --dtype auto" in said
    adapter = json.loads((out / "adapter_config.json").read_text())
    assert adapter["peft_type"] == "PREFIX_TUNING"  # the deep default
    tensors = load_file(str(out / "adapter_model.safetensors"))
    assert tensors and all(t.dtype == torch.float32 for t in tensors.values())
    summary = json.loads((out / "softprompt.json").read_text())["metrics"]
    assert math.isfinite(summary["best_val_loss"]) and math.isfinite(summary["initial_val_loss"])

    _run(["eval", "--prompt", str(out), *data, "--choices", "negative,positive", "--generate",
          "--max-new-tokens", "2", "--output", str(tmp_path / "eval")], capsys)  # fmt: skip
    results = json.loads((tmp_path / "eval" / "results.json").read_text())
    assert 0.0 <= results["metrics"]["accuracy"] <= 1.0
    lines = (tmp_path / "eval" / "predictions.jsonl").read_text().splitlines()
    rows = [json.loads(x) for x in lines]
    assert rows and all(math.isfinite(s) for r in rows for s in r["scores"].values())

    said = _run(["generate", "--prompt", str(out), "--max-new-tokens", "2", "the movie was great"],
                capsys)  # fmt: skip
    assert "bfloat16, chosen by --dtype auto" in said


def test_a_classifier_trains_and_evaluates_in_bf16(kind_dirs, tmp_path, capsys):
    """An encoder classifier: its head trains beside the prompt on bfloat16 weights and is
    saved in float32 under PEFT's names; eval reads it back."""
    data, out = _data(tmp_path), tmp_path / "run"
    said = _run(["train", "--model", str(kind_dirs["bert"]), *data, "--val-fraction", "0.25",
                 "--max-steps", "4", "--batch-size", "3", "--output", str(out)],
                capsys)  # fmt: skip
    assert "bfloat16, chosen by --dtype auto" in said
    tensors = load_file(str(out / "adapter_model.safetensors"))
    assert tensors["base_model.classifier.weight"].dtype == torch.float32
    _run(["eval", "--prompt", str(out), *data, "--output", str(tmp_path / "eval")], capsys)
    results = json.loads((tmp_path / "eval" / "results.json").read_text())
    assert 0.0 <= results["metrics"]["accuracy"] <= 1.0


def test_compare_runs_every_method_in_bf16(model_dirs, tmp_path, capsys):
    """compare: zero-shot, few-shot, prompt tuning, prefix tuning, LoRA and full fine-tuning
    on the same bfloat16 base, each row with an accuracy."""
    data = _data(tmp_path)
    _run(["compare", "--model", str(model_dirs["llama"]), *data, "--template", TEMPLATE,
          "--test", data[1], "--choices", "negative,positive", "--val-fraction", "0.25",
          "--methods", "zero-shot,few-shot,prompt-tuning,prefix-tuning,lora,full-ft",
          "--steps", "2", "--batch-size", "4", "--shots", "2", "--num-virtual-tokens", "4",
          "--lora-r", "2", "--output", str(tmp_path / "cmp")], capsys)  # fmt: skip
    lines = (tmp_path / "cmp" / "metrics.jsonl").read_text().splitlines()
    results = {r["method"]: r for r in map(json.loads, lines) if r["kind"] == "result"}
    assert set(results) == {"zero-shot", "few-shot", "prompt-tuning", "prefix-tuning", "lora",
                            "full-ft"}  # fmt: skip
    for r in results.values():
        assert 0 <= r["quality"]["accuracy"] <= 1 and math.isfinite(r["quality"]["loss"])


def test_serve_answers_in_bf16(model_dirs, tmp_path):
    """serve on bfloat16 weights: prompts and the base model answer over HTTP, each row sent
    with others in one batch as it is sent alone (padding moves nothing, in bf16 too)."""
    from conftest import random_prompt, served_side_by_side

    from softprompt.loading import load_model

    loaded = load_model(model=str(model_dirs["llama"]))
    assert loaded.model.dtype == torch.bfloat16
    prompts = {"a": random_prompt(0), "b": random_prompt(1, n=5)}
    texts = ["the movie was great", "boring book , not good at all"]
    with served_side_by_side(loaded, prompts, tmp_path, texts, max_tokens=3) as (state, _):
        assert state.batcher.metrics.batches > 0


def test_the_lm_head_reads_contiguous_rows(model_dirs):
    """transformers' generate runs ``lm_head(hidden[:, -1:])``, a strided 3-D view, which
    torch's CPU bfloat16 linear multiplies by copying the head's weight once per row
    (seconds and gigabytes for a 262k-word head): the head gets the rows contiguous, with
    the same logits."""
    from softprompt.loading import dense_strides, load_model

    loaded = load_model(model=str(model_dirs["llama"]))
    head = loaded.model.get_output_embeddings()
    seen = []
    handle = head.register_forward_pre_hook(lambda m, args: seen.append(args[0].is_contiguous()))
    try:
        hidden = torch.randn(3, 5, 16, dtype=torch.bfloat16)
        got = head(hidden[:, -2:])
    finally:
        handle.remove()
    assert seen == [True]
    assert torch.equal(got, torch.nn.functional.linear(hidden[:, -2:].contiguous(), head.weight))
    # batch 1: the view counts as contiguous, but its size-1 batch dimension keeps the
    # sequence's stride, which the bf16 linear also meets by copying the weight
    one = torch.randn(1, 5, 16, dtype=torch.bfloat16)[:, -1:]
    assert one.is_contiguous() and one.stride() != dense_strides(one.shape)
    strides = []
    handle = head.register_forward_pre_hook(lambda m, args: strides.append(args[0].stride()))
    try:
        got = head(one)
    finally:
        handle.remove()
    assert strides == [dense_strides(one.shape)] == [(16, 16, 1)]
    assert torch.equal(got, torch.nn.functional.linear(one, head.weight))
    loaded.head_hook.remove()  # the loader's handle takes it off (bench_generate's 'strided')
    handle = head.register_forward_pre_hook(lambda m, args: seen.append(args[0].is_contiguous()))
    try:
        head(hidden[:, -2:])
    finally:
        handle.remove()
    assert seen == [True, False]
