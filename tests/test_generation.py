"""Generation: batched rows match rows alone, sampling is seeded, the CLI compares."""

from __future__ import annotations

import pytest
from conftest import random_prompt

from softprompt.artifacts import save_prompt
from softprompt.cli import main
from softprompt.config import GenerateConfig
from softprompt.errors import ConfigError
from softprompt.generation import generate
from softprompt.loading import load_model
from softprompt.templates import apply_template

TEXTS = ["the movie was great", "i hate this screen and the battery was slow", "good"]


@pytest.mark.parametrize("arch", ["llama", "gemma3", "gpt2"])
def test_batched_rows_equal_rows_alone(loaded_all, arch):
    """Left padding + positions from the mask: a row's greedy output does not depend on the
    other rows of its batch, with or without a prompt."""
    loaded = loaded_all[arch]
    cfg_batch = GenerateConfig(max_new_tokens=6, batch_size=3)
    cfg_single = GenerateConfig(max_new_tokens=6, batch_size=1)
    for prompt in (None, random_prompt()):
        together = generate(loaded, TEXTS, prompt, cfg_batch)
        alone = generate(loaded, TEXTS, prompt, cfg_single)
        assert together == alone
        assert all(isinstance(t, str) for t in together)


def test_prompt_changes_the_output(loaded_all):
    loaded = loaded_all["llama"]
    cfg = GenerateConfig(max_new_tokens=6)
    assert generate(loaded, TEXTS, None, cfg) != generate(loaded, TEXTS, random_prompt(1, 6), cfg)


def test_sampling_is_seeded(loaded_all):
    loaded = loaded_all["llama"]
    cfg = GenerateConfig(max_new_tokens=8, temperature=1.5, top_p=0.9, seed=7)
    first = generate(loaded, TEXTS, None, cfg)
    assert generate(loaded, TEXTS, None, cfg) == first
    other = GenerateConfig(max_new_tokens=8, temperature=1.5, top_p=0.9, seed=8)
    assert generate(loaded, TEXTS * 3, None, other) != generate(loaded, TEXTS * 3, None, cfg)


def test_generate_options_are_validated():
    with pytest.raises(ConfigError, match="top_p"):
        GenerateConfig(top_p=0)
    with pytest.raises(ConfigError, match="temperature"):
        GenerateConfig(temperature=-1)


def test_template_fills_input():
    assert apply_template("nice", "review : {input}\nsentiment :") == "review : nice\nsentiment :"
    assert apply_template("nice", "{review} ?") == "nice ?"
    assert apply_template("nice", None) == "nice"


def test_cli_compare_uses_the_prompt_base_model_and_template(tiny_dir, tmp_path, capsys):
    """`generate --prompt DIR --compare` needs no --model: the artifact names its base."""
    loaded = load_model(model=str(tiny_dir))
    save_prompt(
        tmp_path / "p",
        random_prompt(2),
        loaded.model,
        loaded.name,
        {"template": "review : {input} sentiment :"},
    )
    data = tmp_path / "d.jsonl"
    data.write_text('{"input": "boring book", "target": "negative"}\n' * 3)
    rc = main(
        [
            "generate",
            "--prompt",
            str(tmp_path / "p"),
            "--compare",
            "--max-new-tokens",
            "3",
            "--file",
            str(data),
            "--limit",
            "2",
            "the movie was great",
        ]
    )
    out = capsys.readouterr().out
    assert rc == 0
    assert out.count("  base    : ") == 3 and out.count("  tuned   : ") == 3
    assert "[1] the movie was great" in out and "[3] boring book" in out
    assert out.count("  expected: 'negative'") == 2


def test_cli_base_only(tiny_dir, capsys):
    rc = main(["generate", "--model", str(tiny_dir), "--max-new-tokens", "2", "good"])
    out = capsys.readouterr().out
    assert rc == 0 and "  base    : " in out and "tuned" not in out


def test_python_generate_returns_answers_as_the_cli_prints_them(loaded_all, monkeypatch):
    """No leading whitespace (the space a model writes after 'Sentiment:')."""
    loaded = loaded_all["llama"]
    real = loaded.tokenizer.decode
    monkeypatch.setattr(loaded.tokenizer, "decode", lambda *a, **k: " " + real(*a, **k))
    (out,) = generate(loaded, ["the movie was great"], None, GenerateConfig(max_new_tokens=2))
    assert out and not out[0].isspace()


def test_cut_at_label_ends_the_answer_after_a_whole_label():
    from softprompt.generation import cut_at_label

    labels = ["positive", "negative", "neutral"]
    assert cut_at_label(" negative.\nThe battery died", labels) == " negative"
    assert cut_at_label("positive", labels) == "positive"
    assert cut_at_label("positively good", labels) == "positively good"  # not a whole label
    assert cut_at_label("I think negative", labels) == "I think negative"  # not first
    assert cut_at_label("neutral!", ["neutral", "neutral zone"]) == "neutral"
    assert cut_at_label("neutral zone, far", ["neutral", "neutral zone"]) == "neutral zone"


def _answers_after_label(tokenizer, monkeypatch):
    """The model's text always continues after its label, as a base model does."""
    monkeypatch.setattr(tokenizer, "decode", lambda *a, **k: " negative.\nThe battery died")


def test_python_generate_stops_a_labelled_prompt_after_its_label(loaded_all, monkeypatch):
    loaded = loaded_all["llama"]
    _answers_after_label(loaded.tokenizer, monkeypatch)
    texts = ["the movie was great", "good"]
    prompts = [random_prompt(1), None]  # the base model's row is left as it is
    cfg = GenerateConfig(max_new_tokens=2)
    out = generate(loaded, texts, prompts, cfg, labels=["positive", "negative"])
    assert out == ["negative", "negative.\nThe battery died"]
    assert generate(loaded, texts, prompts, cfg)[0] == "negative.\nThe battery died"


def test_cli_generate_stops_after_the_trained_label_unless_free_text(
    tiny_dir, tmp_path, capsys, monkeypatch
):
    from transformers import PreTrainedTokenizerFast

    loaded = load_model(model=str(tiny_dir))
    meta = {"template": "review : {input} sentiment :",
            "choices": {"requested": "auto", "used": ["positive", "negative"]}}  # fmt: skip
    save_prompt(tmp_path / "p", random_prompt(2), loaded.model, loaded.name, meta)
    _answers_after_label(PreTrainedTokenizerFast, monkeypatch)
    argv = ["generate", "--prompt", str(tmp_path / "p"), "--max-new-tokens", "3", "good"]
    assert main(argv) == 0
    got = capsys.readouterr()
    assert "  tuned   : 'negative'\n" in got.out
    assert "trained on the labels positive,negative: its answers end after the label" in got.err
    assert main([*argv, "--free-text"]) == 0
    assert "  tuned   : 'negative.\\nThe battery died'" in capsys.readouterr().out


def test_a_labelled_prompt_generates_only_its_labels(loaded_all):
    """Without mocks: the tiny random model's free answer is noise, the labelled one a label."""
    loaded = loaded_all["llama"]
    texts = ["the movie was great", "i hate this screen", "good"]
    cfg = GenerateConfig(max_new_tokens=5)
    prompts = [random_prompt(1), random_prompt(1), None]
    out = generate(loaded, texts, prompts, cfg, template="review : {input} sentiment :",
                   labels=["positive", "negative"])  # fmt: skip
    assert out[0] in ("positive", "negative") and out[1] in ("positive", "negative")
    free = generate(loaded, texts, prompts, cfg, template="review : {input} sentiment :")
    assert out[2] == free[2]  # the row without a prompt is left free


def test_labels_only_allows_what_continues_a_label_then_eos():
    import torch

    from softprompt.generation import LabelsOnly

    only = LabelsOnly([[[5], [6, 7]], None], eos=1)
    scores = torch.zeros(2, 10)
    got = only(torch.zeros(2, 3, dtype=torch.long), scores.clone())  # nothing written yet
    assert torch.isfinite(got[0]).nonzero().flatten().tolist() == [5, 6]
    assert torch.isfinite(got[1]).all()  # a free row
    ids = torch.tensor([[0, 0, 0, 6], [0, 0, 0, 2]])
    assert torch.isfinite(only(ids, scores.clone())[0]).nonzero().flatten().tolist() == [7]
    ids = torch.tensor([[0, 0, 0, 6, 7], [0, 0, 0, 2, 2]])
    assert torch.isfinite(only(ids, scores.clone())[0]).nonzero().flatten().tolist() == [1]
