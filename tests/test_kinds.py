"""Beyond decoders: tiny random T5, BART (seq2seq) and BERT (classify) models.

No real T5 or BART is available offline: these are random models built from configs, with
the tests' word-level tokenizer (T5-style: text + EOS; BART/BERT-style: BOS + text + EOS).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import REVIEWS, train_config, write_reviews

from softprompt.artifacts import load_prompt
from softprompt.errors import ConfigError
from softprompt.loading import load_model
from softprompt.training import train


def cfg_for(folder, tmp_path, name="run", **kw):
    data = write_reviews(tmp_path / "train.jsonl")
    kw.setdefault("lr", 0.05)
    return train_config(folder, data, tmp_path / name, template="review : {input}", **kw)


# --- kind detection -------------------------------------------------------------------


def test_kind_detected_from_config(kind_dirs, tiny_dir):
    assert load_model(model=str(kind_dirs["t5"])).kind.name == "seq2seq"
    assert load_model(model=str(kind_dirs["bart"])).kind.name == "seq2seq"
    bert = load_model(model=str(kind_dirs["bert"]), labels=["negative", "positive"])
    assert bert.kind.name == "classify" and bert.labels == ["negative", "positive"]
    assert bert.model.config.id2label == {0: "negative", 1: "positive"}
    assert load_model(model=str(tiny_dir)).kind.name == "causal"


def test_task_override_and_clear_errors(kind_dirs, tiny_dir):
    with pytest.raises(ConfigError, match="task seq2seq: .* no seq2seq model class"):
        load_model(model=str(tiny_dir), task="seq2seq")
    with pytest.raises(ConfigError, match="task must be one of"):
        load_model(model=str(tiny_dir), task="encoder")
    # BERT has a causal-LM class too: --task causal takes it
    assert load_model(model=str(kind_dirs["bert"]), task="causal").kind.name == "causal"


def test_unknown_architecture_is_refused():
    from transformers import CLIPVisionConfig

    from softprompt.kinds import detect

    with pytest.raises(ConfigError, match="neither a causal LM, an encoder-decoder nor"):
        detect(CLIPVisionConfig(), "auto", "vision")


def test_new_head_is_the_same_on_every_load_and_keeps_the_rng(kind_dirs):
    torch.manual_seed(5)
    expected = torch.rand(1)
    torch.manual_seed(5)
    a = load_model(model=str(kind_dirs["bert"]), labels=["a", "b"])
    after = torch.rand(1)
    b = load_model(model=str(kind_dirs["bert"]), labels=["a", "b"])
    assert torch.equal(after, expected)  # loading did not move the global RNG
    assert torch.equal(a.model.classifier.weight, b.model.classifier.weight)


# --- seq2seq: T5 and BART -------------------------------------------------------------


def train_losses(output: Path) -> list[float]:
    lines = (output / "metrics.jsonl").read_text().splitlines()
    return [r["loss"] for r in map(json.loads, lines) if r.get("kind") == "train"]


@pytest.mark.parametrize("arch", ["t5", "bart"])
def test_seq2seq_training_lowers_the_validation_loss(kind_dirs, tmp_path, arch):
    result = train(cfg_for(kind_dirs[arch], tmp_path, epochs=4, lr=0.3), progress=False)
    m = result.summary
    assert m["best_val_loss"] < m["initial_val_loss"]
    adapter = json.loads((result.output / "adapter_config.json").read_text())
    assert adapter["task_type"] == "SEQ_2_SEQ_LM" and adapter["num_transformer_submodules"] == 2
    from safetensors.torch import load_file

    rows = load_file(str(result.output / "adapter_model.safetensors"))["prompt_embeddings"]
    assert rows.shape == (8, 16)  # 2N rows: PEFT's layout; the first N are the prompt
    assert torch.equal(rows[:4], result.prompt.embedding.detach())


def seq2seq_batch(loaded):
    from softprompt.data import Example
    from softprompt.kinds.seq2seq import collate, tokenize_pairs

    examples = [Example(f"review : {r}", y, "x") for r, y in REVIEWS[:4]]
    rows = tokenize_pairs(examples, loaded.tokenizer, 64)
    return rows, collate(rows, loaded.tokenizer.pad_token_id)


@pytest.mark.parametrize("arch", ["t5", "bart"])
def test_peft_loads_our_seq2seq_prompt_with_the_same_logits(kind_dirs, tmp_path, arch):
    from peft import PeftModel

    result = train(cfg_for(kind_dirs[arch], tmp_path, max_steps=2, lr=0.3), progress=False)
    loaded = load_model(model=str(kind_dirs[arch]))
    prompt, _ = load_prompt(result.output, loaded.model)
    rows, batch = seq2seq_batch(loaded)
    from softprompt.prompt import before_input

    embeds, mask = before_input(loaded.model, prompt, batch)
    decoder_ids = loaded.model.prepare_decoder_input_ids_from_labels(labels=batch["labels"])
    with torch.no_grad():
        ours = loaded.model(inputs_embeds=embeds, attention_mask=mask,
                            decoder_input_ids=decoder_ids).logits  # fmt: skip
        base = load_model(model=str(kind_dirs[arch])).model
        peft = PeftModel.from_pretrained(base, str(result.output)).eval()
        theirs = peft(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                      labels=batch["labels"]).logits  # fmt: skip
    assert torch.allclose(ours, theirs, atol=1e-5)


def test_we_load_a_peft_saved_seq2seq_prompt(kind_dirs, tmp_path):
    from peft import PromptTuningConfig, TaskType, get_peft_model

    base = load_model(model=str(kind_dirs["t5"])).model
    torch.manual_seed(1)
    peft = get_peft_model(base, PromptTuningConfig(task_type=TaskType.SEQ_2_SEQ_LM,
                                                   num_virtual_tokens=5))  # fmt: skip
    peft.save_pretrained(tmp_path / "peft")
    loaded = load_model(model=str(kind_dirs["t5"]))
    prompt, _ = load_prompt(tmp_path / "peft", loaded.model)
    assert prompt.num_virtual_tokens == 5  # PEFT saved 10 rows; the encoder's are the first 5
    rows, batch = seq2seq_batch(loaded)
    from softprompt.kinds.seq2seq import rows_loss

    with torch.no_grad():
        ours, n, _ = rows_loss(loaded.model, prompt, rows, 0, "cpu")
        theirs = peft.eval()(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                             labels=batch["labels"]).loss  # fmt: skip
    assert torch.allclose(ours / n, theirs, atol=1e-5)


@pytest.mark.parametrize("arch", ["t5", "bart"])
def test_seq2seq_batched_equals_alone(kind_dirs, arch):
    from conftest import random_prompt

    from softprompt.config import GenerateConfig
    from softprompt.generation import generate
    from softprompt.kinds.seq2seq import rows_loss

    loaded = load_model(model=str(kind_dirs[arch]))
    prompt, (rows, _) = random_prompt(n=3), seq2seq_batch(loaded)
    with torch.no_grad():
        together, _, _ = rows_loss(loaded.model, prompt, rows, 0, "cpu")
        alone = sum(rows_loss(loaded.model, prompt, [r], 0, "cpu")[0] for r in rows)
    assert torch.allclose(together, alone, rtol=1e-5)
    sources = [f"review : {r}" for r, _ in REVIEWS[:4]]
    batched = generate(loaded, sources, prompt, GenerateConfig(max_new_tokens=5, batch_size=4))
    alone = generate(loaded, sources, prompt, GenerateConfig(max_new_tokens=5, batch_size=1))
    assert batched == alone


def test_seq2seq_resume_equals_an_uninterrupted_run(kind_dirs, tmp_path):
    from dataclasses import replace

    from conftest import interrupted_kind_loss

    whole = train(cfg_for(kind_dirs["t5"], tmp_path, "whole", epochs=2, save_every=1),
                  progress=False)  # fmt: skip
    cfg = cfg_for(kind_dirs["t5"], tmp_path, "cut", epochs=2, save_every=1)
    with interrupted_kind_loss(4):
        train(cfg, progress=False)
    resumed = train(replace(cfg, resume=True), progress=False)
    assert torch.equal(whole.prompt.embedding, resumed.prompt.embedding)
    assert train_losses(whole.output) == train_losses(resumed.output)


# --- classify: BERT -------------------------------------------------------------------


def test_classifier_training_lowers_the_loss_and_saves_the_head(kind_dirs, tmp_path):
    from safetensors.torch import load_file

    result = train(cfg_for(kind_dirs["bert"], tmp_path, epochs=6, lr=0.1), progress=False)
    m = result.summary
    assert m["best_val_loss"] < m["initial_val_loss"]
    losses = train_losses(result.output)
    assert sum(losses[-3:]) < sum(losses[:3])
    adapter = json.loads((result.output / "adapter_config.json").read_text())
    assert adapter["task_type"] == "SEQ_CLS"
    assert adapter["modules_to_save"] == ["classifier", "score"]
    tensors = load_file(str(result.output / "adapter_model.safetensors"))
    assert set(tensors) == {
        "prompt_embeddings",
        "base_model.classifier.weight",
        "base_model.classifier.bias",
    }
    assert tensors["base_model.classifier.weight"].shape == (2, 16)
    meta = json.loads((result.output / "softprompt.json").read_text())
    assert meta["labels"] == ["negative", "positive"]
    assert meta["trainable_parameters"] == {"prompt": 4 * 16, "head": 2 * 16 + 2}
    # the head learned: it is no longer the freshly initialised one
    fresh = load_model(model=str(kind_dirs["bert"]), labels=["negative", "positive"])
    assert not torch.equal(fresh.model.classifier.weight, tensors["base_model.classifier.weight"])


def bert_batch(loaded, n=6):
    from softprompt.data import Example
    from softprompt.kinds.classify import collate, tokenize_labels

    examples = [Example(f"review : {r}", y, "x") for r, y in REVIEWS[:n]]
    rows = tokenize_labels(examples, loaded.tokenizer, 64, loaded.labels)
    return rows, collate(rows, loaded.tokenizer.pad_token_id)


def test_peft_loads_our_classifier_with_the_same_logits(kind_dirs, tmp_path):
    from peft import PeftModel

    from softprompt.kinds.classify import logits

    result = train(cfg_for(kind_dirs["bert"], tmp_path, max_steps=3, lr=0.1), progress=False)
    labels = ["negative", "positive"]
    loaded = load_model(model=str(kind_dirs["bert"]), labels=labels)
    prompt, _ = load_prompt(result.output, loaded.model)  # puts the trained head in place
    rows, batch = bert_batch(loaded)
    with torch.no_grad():
        ours = logits(loaded.model, prompt, batch)
        base = load_model(model=str(kind_dirs["bert"]), labels=labels).model
        peft = PeftModel.from_pretrained(base, str(result.output)).eval()
        theirs = peft(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                      token_type_ids=torch.zeros_like(batch["input_ids"])).logits  # fmt: skip
    assert torch.allclose(ours, theirs, atol=1e-5)


def test_we_load_a_peft_saved_classifier(kind_dirs, tmp_path):
    from peft import PromptTuningConfig, TaskType, get_peft_model

    from softprompt.kinds.classify import logits

    labels = ["negative", "positive"]
    base = load_model(model=str(kind_dirs["bert"]), labels=labels).model
    peft = get_peft_model(base, PromptTuningConfig(task_type=TaskType.SEQ_CLS,
                                                   num_virtual_tokens=3))  # fmt: skip
    with torch.no_grad():  # a head unlike the fresh one, as after training
        peft.base_model.classifier.modules_to_save["default"].weight.normal_()
    peft.save_pretrained(tmp_path / "peft")
    loaded = load_model(model=str(kind_dirs["bert"]), labels=labels)
    prompt, _ = load_prompt(tmp_path / "peft", loaded.model)
    rows, batch = bert_batch(loaded)
    with torch.no_grad():
        ours = logits(loaded.model, prompt, batch)
        theirs = peft.eval()(input_ids=batch["input_ids"],
                             attention_mask=batch["attention_mask"]).logits  # fmt: skip
    assert torch.allclose(ours, theirs, atol=1e-5)


def test_classifier_batched_equals_alone(kind_dirs):
    from conftest import random_prompt

    from softprompt.kinds.classify import predict

    loaded = load_model(model=str(kind_dirs["bert"]), labels=["negative", "positive"])
    prompt = random_prompt(n=3)
    sources = [f"review : {r}" for r, _ in REVIEWS]
    together = torch.tensor(predict(loaded.model, loaded.tokenizer, prompt, sources, 8))
    alone = torch.tensor(
        [predict(loaded.model, loaded.tokenizer, prompt, [s], 1)[0] for s in sources]
    )
    assert torch.allclose(together, alone, atol=1e-6)


def test_classifier_validation_accuracy_is_the_heads_argmax(kind_dirs):
    """A classifier's validation reports its accuracy: the share of rows whose head argmax
    is their label (what `--select accuracy` keeps by)."""
    from conftest import random_prompt

    from softprompt.kinds.classify import logits

    loaded = load_model(model=str(kind_dirs["bert"]), labels=["negative", "positive"])
    rows, batch = bert_batch(loaded, n=len(REVIEWS))
    prompt = random_prompt(n=3)
    result = loaded.kind.evaluate_loss(loaded.model, prompt, rows, 4, loaded.tokenizer.pad_token_id)
    with torch.no_grad():
        want = (logits(loaded.model, prompt, batch).argmax(-1) == batch["labels"]).float().mean()
    assert result["accuracy"] == pytest.approx(float(want))
    assert result["tokens"] == len(rows)


def test_classifier_resume_equals_an_uninterrupted_run(kind_dirs, tmp_path):
    from dataclasses import replace

    from conftest import interrupted_kind_loss

    whole = train(cfg_for(kind_dirs["bert"], tmp_path, "whole", epochs=2, save_every=1),
                  progress=False)  # fmt: skip
    cfg = cfg_for(kind_dirs["bert"], tmp_path, "cut", epochs=2, save_every=1)
    with interrupted_kind_loss(4):
        train(cfg, progress=False)
    resumed = train(replace(cfg, resume=True), progress=False)
    assert torch.equal(whole.prompt.embedding, resumed.prompt.embedding)
    assert train_losses(whole.output) == train_losses(resumed.output)
    from safetensors.torch import load_file

    a = load_file(str(whole.output / "adapter_model.safetensors"))
    b = load_file(str(resumed.output / "adapter_model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)  # the head too


def test_classifier_refuses_what_it_cannot_do(kind_dirs, tmp_path):
    with pytest.raises(ConfigError, match="restricted loss is for causal LMs"):
        train(cfg_for(kind_dirs["bert"], tmp_path, choices="negative,positive"), progress=False)
    with pytest.raises(ConfigError, match="one head, so one task"):
        train(cfg_for(kind_dirs["bert"], tmp_path, "b", task_field="label"), progress=False)


# --- eval and generate from the command line ----------------------------------------------


def test_cli_classifier_train_eval_generate(kind_dirs, tmp_path, capsys):
    from softprompt.cli import main

    data = write_reviews(tmp_path / "train.jsonl")
    out = tmp_path / "run"
    common = ["--input-field", "review", "--target-field", "label"]
    assert main(["train", "--model", str(kind_dirs["bert"]), "--task", "classify",
                 "--data", str(data), "--output", str(out), "--num-virtual-tokens", "4",
                 "--epochs", "3", "--lr", "0.1", "--batch-size", "4", *common]) == 0  # fmt: skip
    assert main(["eval", "--prompt", str(out), "--data", str(data),
                 "--output", str(tmp_path / "ev"), *common]) == 0  # fmt: skip
    results = json.loads((tmp_path / "ev" / "results.json").read_text())
    m = results["metrics"]
    assert m["confusion"]["labels"] == ["negative", "positive"]
    assert sum(map(sum, m["confusion"]["matrix"])) == len(REVIEWS)
    assert 0.0 <= m["macro_f1"] <= 1.0 and 0.0 <= m["accuracy"] <= 1.0
    lines = (tmp_path / "ev" / "predictions.jsonl").read_text().splitlines()
    preds = [json.loads(x) for x in lines]
    assert all(p["prediction"] in ("negative", "positive") for p in preds)
    assert m["accuracy"] == sum(p["prediction"] == p["target"] for p in preds) / len(preds)
    capsys.readouterr()
    assert main(["generate", "--prompt", str(out), "the food was awful"]) == 0
    printed = capsys.readouterr().out
    assert "tuned" in printed and ("'negative'" in printed or "'positive'" in printed)


def test_cli_seq2seq_eval_scores_choices_and_generates(kind_dirs, tmp_path, capsys):
    from softprompt.cli import main

    data = write_reviews(tmp_path / "train.jsonl")
    out = tmp_path / "run"
    common = ["--input-field", "review", "--target-field", "label"]
    assert main(["train", "--model", str(kind_dirs["t5"]), "--data", str(data),
                 "--output", str(out), "--num-virtual-tokens", "4", "--epochs", "6",
                 "--lr", "0.3", "--batch-size", "4", *common]) == 0  # fmt: skip
    assert main(["eval", "--prompt", str(out), "--data", str(data), "--choices",
                 "negative,positive", "--generate", "--max-new-tokens", "3",
                 "--output", str(tmp_path / "ev"), *common]) == 0  # fmt: skip
    m = json.loads((tmp_path / "ev" / "results.json").read_text())["metrics"]
    assert {"loss", "accuracy", "macro_f1", "exact_match"} <= set(m)
    preds = [json.loads(x) for x in (tmp_path / "ev" / "predictions.jsonl").read_text().split("\n")
             if x]  # fmt: skip
    # the prediction is the choice the decoder scores highest
    assert all(p["prediction"] == max(p["scores"], key=p["scores"].get) for p in preds)
    capsys.readouterr()
    assert main(["generate", "--prompt", str(out), "--max-new-tokens", "3", "i love it"]) == 0
    assert "tuned" in capsys.readouterr().out


def test_seq2seq_choice_scores_match_the_loss(kind_dirs):
    from conftest import random_prompt

    from softprompt.data import Example
    from softprompt.kinds.seq2seq import rows_loss, score_choices, tokenize_pairs

    loaded = load_model(model=str(kind_dirs["bart"]))
    prompt, tok = random_prompt(n=3), loaded.tokenizer
    sources, choices = ["the movie was great", "boring book"], ["positive", "negative"]
    scores = score_choices(loaded.model, tok, prompt, sources, choices)
    for i, source in enumerate(sources):
        for c, choice in enumerate(choices):
            rows = tokenize_pairs([Example(source, choice, "x")], tok, 64)
            with torch.no_grad():
                loss, _, _ = rows_loss(loaded.model, prompt, rows, 0, "cpu")
            assert scores[i][c] == pytest.approx(-float(loss), rel=1e-5)


def test_serve_refuses_a_classifier_in_one_line(kind_dirs, tmp_path):
    from softprompt.config import ServeConfig
    from softprompt.serving.api import create_app

    loaded = load_model(model=str(kind_dirs["bert"]), labels=["a", "b"])
    with pytest.raises(ConfigError, match="is a classification model: use `softprompt generate`"):
        create_app(loaded, ServeConfig(prompts=str(tmp_path)))


@pytest.mark.parametrize("arch", ["t5", "bart"])
def test_serve_a_seq2seq_prompt(kind_dirs, tmp_path, arch):
    import openai
    from conftest import random_prompt

    from softprompt.artifacts import save_prompt
    from softprompt.config import GenerateConfig, ServeConfig
    from softprompt.generation import generate
    from softprompt.serving.api import create_app
    from softprompt.serving.server import BackgroundServer

    loaded = load_model(model=str(kind_dirs[arch]))
    prompt = random_prompt(3, 4)
    save_prompt(tmp_path / "p" / "tuned", prompt, loaded.model, loaded.name)
    app = create_app(loaded, ServeConfig(prompts=str(tmp_path / "p"), batch_wait_ms=50))
    assert app.state.softprompt.store.rescan()["added"] == ["tuned"]
    background = BackgroundServer(app)
    try:
        client = openai.OpenAI(base_url=f"{background.url}/v1", api_key="x", max_retries=0)
        texts = ["the movie was great", "i hate this screen and the battery was slow"]
        for model, p in (("tuned", prompt), ("base", None)):
            got = client.completions.create(model=model, prompt=texts, max_tokens=5,
                                            temperature=0)  # fmt: skip
            answers = [c.text for c in sorted(got.choices, key=lambda c: c.index)]
            want = generate(loaded, texts, p, GenerateConfig(max_new_tokens=5))
            assert [a.strip() for a in answers] == want
        with pytest.raises(openai.BadRequestError, match="no conversations"):
            client.chat.completions.create(model="tuned", messages=[{"role": "user",
                                                                     "content": "hi"}])  # fmt: skip
    finally:
        background.stop()
        app.state.softprompt.batcher.close()


def test_bench_classify_quick_runs(kind_dirs, tmp_path):
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    out = tmp_path / "bench.json"
    proc = subprocess.run(
        [sys.executable, str(root / "benchmarks" / "bench_classify.py"), "--quick",
         "--model", str(kind_dirs["bert"]), "--limit", "16", "--json", str(out)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    methods = [r["method"] for r in json.loads(out.read_text())["results"]]
    assert methods == ["prompt + head", "deep prompt + head", "head alone", "full FT"]
    assert "| prompt + head | 98 |" in proc.stdout  # 4 x 16 prompt + 2 x 16 + 2 head
    # 4 tokens x 2 layers x (key, value) x 16, and the head
    assert "| deep prompt + head | 290 |" in proc.stdout


def test_a_checkpoint_written_before_task_existed_still_resumes():
    from softprompt.training.checkpoint import _differences

    saved = {"model": {"model": "m", "dtype": "float32"}}  # no "task": an older checkpoint
    assert _differences(saved, {"model": {"model": "m", "dtype": "float32", "task": "auto"}}) == []
    changed = {"model": {"model": "m", "dtype": "float32", "task": "seq2seq"}}
    assert _differences(saved, changed) == [("model.task", None, "seq2seq")]


def test_every_kind_says_how_many_rows_max_length_cut(capsys):
    from conftest import make_tokenizer

    from softprompt.data import Example
    from softprompt.kinds.classify import tokenize_labels
    from softprompt.kinds.seq2seq import tokenize_pairs

    tok = make_tokenizer()
    exs = [Example("good", "positive", "a:1"),
           Example("i love this movie and it was good", "negative", "a:2")]  # fmt: skip
    rows = tokenize_labels(exs, tok, 4, ["negative", "positive"])
    assert [len(r.input_ids) for r in rows] == [2, 4]
    assert "1 of 2 rows were longer than 4 text tokens and were cut" in capsys.readouterr().err
    tokenize_pairs(exs, tok, 3)
    assert "1 of 2 rows were longer than 3 text tokens and were cut" in capsys.readouterr().err
    tokenize_pairs(exs, tok, 30)
    assert "were cut" not in capsys.readouterr().err


def test_a_classifier_takes_a_label_seen_only_in_validation(kind_dirs, tmp_path):
    """A rare class missing from the training sample but present in validation is one of
    the head's outputs (the suite's 128-row TREC sample stopped on it before)."""
    import json

    val = tmp_path / "val.jsonl"
    val.write_text("".join(json.dumps({"review": t, "label": lab}) + "\n"
                           for t, lab in [("good", "positive"), ("bad", "negative"),
                                          ("it is", "neutral")]))  # fmt: skip
    cfg = cfg_for(kind_dirs["bert"], tmp_path, max_steps=1)
    cfg.data.validation = str(val)
    train(cfg, progress=False)
    meta = json.loads((tmp_path / "run" / "softprompt.json").read_text())
    assert meta["labels"] == ["negative", "neutral", "positive"]


# --- a classifier's pooling (--pooling) ------------------------------------------------


def sentence_transformers_copy(folder: Path, out: Path, mode: str = "mean",
                               path: str = "1_Pooling") -> Path:  # fmt: skip
    """``folder`` as a sentence-transformers checkpoint that declares ``mode`` pooling (its
    modules.json and the Pooling module's config.json, as all-MiniLM-L6-v2 ships them)."""
    import shutil

    shutil.copytree(folder, out)
    modules = [
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": path, "type": "sentence_transformers.models.Pooling"},
    ]
    (out / "modules.json").write_text(json.dumps(modules))
    (out / "1_Pooling").mkdir()
    flags = {"cls": "pooling_mode_cls_token", "mean": "pooling_mode_mean_tokens"}
    conf = {"word_embedding_dimension": 16, "pooling_mode_max_tokens": False,
            **{flag: m == mode for m, flag in flags.items()}}  # fmt: skip
    (out / "1_Pooling" / "config.json").write_text(json.dumps(conf))
    return out


def test_a_classifier_reads_the_mean_its_checkpoint_declares(kind_dirs, tmp_path):
    from conftest import random_prompt

    from softprompt.kinds.classify import logits, pooling, predict
    from softprompt.prompt import before_input

    labels = ["negative", "positive"]
    mean = sentence_transformers_copy(kind_dirs["bert"], tmp_path / "mean")
    cls = sentence_transformers_copy(kind_dirs["bert"], tmp_path / "cls", mode="cls")
    outside = sentence_transformers_copy(kind_dirs["bert"], tmp_path / "out", path="../x")
    assert pooling(load_model(model=str(kind_dirs["bert"]), labels=labels).model) == "cls"
    assert pooling(load_model(model=str(cls), labels=labels).model) == "cls"
    assert pooling(load_model(model=str(outside), labels=labels).model) == "cls"  # not read
    assert pooling(load_model(model=str(mean), labels=labels, pooling="cls").model) == "cls"
    assert pooling(load_model(model=str(kind_dirs["bert"]), labels=labels,
                              pooling="mean").model) == "mean"  # fmt: skip
    loaded = load_model(model=str(mean), labels=labels)
    assert pooling(loaded.model) == "mean"

    # the head reads the mean of the row's own last hidden states: no virtual token, no pad
    prompt = random_prompt(n=3)
    _, batch = bert_batch(loaded)
    with torch.no_grad():
        got = logits(loaded.model, prompt, batch)
        embeds, mask = before_input(loaded.model, prompt, batch)
        hidden = loaded.model.bert(inputs_embeds=embeds, attention_mask=mask).last_hidden_state
        weights = batch["attention_mask"][..., None].float()
        want = loaded.model.classifier((hidden[:, 3:] * weights).sum(1) / weights.sum(1))
        own = load_model(model=str(mean), labels=labels, pooling="cls").model
        assert not torch.allclose(logits(own, prompt, batch), got, atol=1e-3)
    torch.testing.assert_close(got, want)
    sources = [f"review : {r}" for r, _ in REVIEWS]
    together = predict(loaded.model, loaded.tokenizer, prompt, sources, 8)
    alone = [predict(loaded.model, loaded.tokenizer, prompt, [s], 1)[0] for s in sources]
    torch.testing.assert_close(torch.tensor(together), torch.tensor(alone))


def test_a_saved_head_brings_its_pooling(kind_dirs, tmp_path):
    """Trained on a mean-pooling checkpoint (a deep prompt, the kind's default), the saved
    prompt records it and reads the mean wherever it loads; a PEFT adapter's head (no
    softprompt.json) reads [CLS], as PEFT runs it; a forged pooling is refused."""
    import shutil

    from softprompt.errors import ArtifactError
    from softprompt.kinds.classify import logits, pooling

    labels = ["negative", "positive"]
    mean = sentence_transformers_copy(kind_dirs["bert"], tmp_path / "st")
    result = train(cfg_for(mean, tmp_path, max_steps=3, lr=0.1), progress=False)
    meta = json.loads((result.output / "softprompt.json").read_text())
    assert meta["pooling"] == "mean"
    on_mean = load_model(model=str(mean), labels=labels)
    on_plain = load_model(model=str(kind_dirs["bert"]), labels=labels)  # declares nothing
    assert pooling(on_plain.model) == "cls"
    _, batch = bert_batch(on_plain)
    with torch.no_grad():
        outs = []
        for loaded in (on_mean, on_plain):
            prompt, _ = load_prompt(result.output, loaded.model)
            assert pooling(loaded.model) == "mean"
            outs.append(logits(loaded.model, prompt, batch))
    torch.testing.assert_close(outs[0], outs[1])

    bare = tmp_path / "peft-only"  # the PEFT files alone
    shutil.copytree(result.output, bare)
    (bare / "softprompt.json").unlink()
    load_prompt(bare, on_mean.model)
    assert pooling(on_mean.model) == "cls"

    meta["pooling"] = "max"
    (result.output / "softprompt.json").write_text(json.dumps(meta))
    with pytest.raises(ArtifactError, match="softprompt.json's pooling 'max' is not one of"):
        load_prompt(result.output, on_plain.model)


@pytest.mark.parametrize("model_type", ["flaubert", "modernbert"])
def test_pooling_a_head_cannot_read_is_refused_in_one_line(model_type, tmp_path):
    import matrix
    from transformers import FlaubertConfig, FlaubertForSequenceClassification

    from softprompt.kinds.classify import pooling

    folder = tmp_path / model_type
    if model_type == "flaubert":  # XLM's head: a SequenceSummary, whose pooling its config sets
        tok = matrix.tokenizer_for("classify")
        config = FlaubertConfig(vocab_size=len(tok), emb_dim=16, n_layers=2, n_heads=2,
                                pad_index=tok.pad_token_id, num_labels=2)  # fmt: skip
        FlaubertForSequenceClassification(config).save_pretrained(folder)
        tok.save_pretrained(folder)
    else:
        matrix.save_type(model_type, "classify", folder)
    labels = {"labels": matrix.LABELS}
    loaded = load_model(model=str(folder), **labels)
    assert pooling(loaded.model) == "cls"  # its own head: XLM's summary, ModernBERT's config
    with pytest.raises(ConfigError, match="pooling mean: .*(cannot read|pools as its config)"):
        load_model(model=str(folder), pooling="mean", **labels)


FIRST_POSITION_BUILT = ["camembert", "convbert", "deberta", "deberta-v2", "distilbert",
                        "electra", "lilt", "mpnet", "mra", "nystromformer", "roberta",
                        "xlm-roberta", "yoso"]  # fmt: skip


@pytest.mark.parametrize("model_type", FIRST_POSITION_BUILT)
def test_a_first_position_head_reads_the_mean_there(model_type, tmp_path):
    """FIRST_POSITION's claim, checked on each type the architecture matrix builds: the
    model's own head reads position 0 of the body's last hidden states and nothing else; with
    --pooling mean position 0 holds the mean of the row's own states (no virtual token, no
    padding), and the rest of the head runs as the model's own."""
    import matrix

    from softprompt.kinds.classify import FIRST_POSITION, logits, pooling
    from softprompt.prompt import SoftPrompt, before_input

    assert model_type in FIRST_POSITION
    matrix.save_type(model_type, "classify", tmp_path / "m")
    loaded = load_model(model=str(tmp_path / "m"), labels=matrix.LABELS, pooling="mean")
    model = loaded.model.eval()
    assert pooling(model) == "mean"
    _, batch = bert_batch(loaded)
    assert not batch["attention_mask"].all()  # rows of different lengths: padding to leave out
    width = model.get_input_embeddings().weight.shape[1]  # LiLT's: 24
    prompt = SoftPrompt(torch.randn(3, width, generator=torch.Generator().manual_seed(0)) * 2)

    def with_states(at, value):  # the model's own logits, the body's states changed at `at`
        def hook(module, args, out):
            states = out[0].clone()
            states[:, at] = value(states)
            out["last_hidden_state"] = states
            return out

        handle = model.base_model.register_forward_hook(hook)
        try:
            return model(inputs_embeds=embeds, attention_mask=mask).logits
        finally:
            handle.remove()

    with torch.no_grad():
        embeds, mask = before_input(model, prompt, batch)
        own = model(inputs_embeds=embeds, attention_mask=mask).logits
        torch.testing.assert_close(with_states(slice(1, None), lambda h: h[:, 1:] + 1.0), own)
        assert not torch.allclose(with_states(0, lambda h: h[:, 0] + 1.0), own, atol=1e-4)
        hidden = model.base_model(inputs_embeds=embeds, attention_mask=mask)[0][:, 3:]
        weights = batch["attention_mask"][..., None].float()
        mean = (hidden * weights).sum(1) / weights.sum(1)
        want = with_states(0, lambda h: mean)
        got = logits(model, prompt, batch)
    torch.testing.assert_close(got, want)
    assert not torch.allclose(got, own, atol=1e-4)


def test_a_roberta_checkpoint_that_declares_the_mean_trains_on_it(tmp_path):
    """all-distilroberta-v1 and all-mpnet-base-v2 declare the mean, as MiniLM does: auto
    reads it (RoBERTa's head over the mean, by hand), a deep prompt (the kind's default)
    trains on it, and the saved prompt brings it to a checkpoint that declares nothing,
    batched rows scoring as alone."""
    import matrix

    from softprompt.kinds.classify import logits, pooling, predict
    from softprompt.prefix import deep_cache
    from softprompt.prompt import DeepPrompt, deep_layout, rows_prompts

    matrix.save_type("roberta", "classify", tmp_path / "plain")
    st = sentence_transformers_copy(tmp_path / "plain", tmp_path / "st")
    loaded = load_model(model=str(st), labels=matrix.LABELS)
    assert pooling(loaded.model) == "mean"
    assert pooling(load_model(model=str(tmp_path / "plain"), labels=matrix.LABELS).model) == "cls"
    model = loaded.model.eval()
    _, batch = bert_batch(loaded)
    layers, heads, dim = 2, 2, 8  # the matrix's tiny model: 2 layers, 2 heads of 8
    deep = DeepPrompt(torch.randn(4, layers * 2 * heads * dim), layers, heads, dim)
    with torch.no_grad():
        got = logits(model, deep, batch)
        flat, which = rows_prompts(deep, batch)
        cache = deep_cache(model, flat, deep_layout(deep), which)
        rows = batch["input_ids"].shape[0]
        mask = torch.cat([torch.ones(rows, 4, dtype=torch.long), batch["attention_mask"]], 1)
        hidden = model.roberta(input_ids=batch["input_ids"], attention_mask=mask,
                               past_key_values=cache, use_cache=True).last_hidden_state  # fmt: skip
        weights = batch["attention_mask"][..., None].float()
        mean = (hidden * weights).sum(1) / weights.sum(1)
        want = model.classifier(mean[:, None])  # RobertaClassificationHead reads position 0
    torch.testing.assert_close(got, want)

    result = train(cfg_for(st, tmp_path, max_steps=3, lr=0.1, method="prefix"), progress=False)
    meta = json.loads((result.output / "softprompt.json").read_text())
    assert meta["pooling"] == "mean"
    plain = load_model(model=str(tmp_path / "plain"), labels=matrix.LABELS)
    prompt, _ = load_prompt(result.output, plain.model)
    assert pooling(plain.model) == "mean" and isinstance(prompt, DeepPrompt)
    sources = [f"review : {r}" for r, _ in REVIEWS]
    together = predict(plain.model, plain.tokenizer, prompt, sources, 8)
    alone = [predict(plain.model, plain.tokenizer, prompt, [s], 1)[0] for s in sources]
    torch.testing.assert_close(torch.tensor(together), torch.tensor(alone))


def test_a_classifier_cuts_an_input_longer_than_its_positions(kind_dirs, tmp_path, capsys):
    """A text longer than the encoder's positions (MiniLM's 512) is cut at its end, its last
    token ([SEP]) kept, as training cuts rows, the prompt's positions counted, in `generate`,
    `eval`'s scores and `predict`, said once; it stopped on a shape error before. RoBERTa's
    positions start after its padding id, so it holds fewer than its table, and a longer
    --max-length is refused before training."""
    import matrix
    from conftest import TEMPLATES, kind_tokenizer, random_prompt
    from transformers import BertConfig, BertForSequenceClassification

    from softprompt import GenerateConfig, generate
    from softprompt.kinds.classify import positions, predict, predict_ids

    tok = kind_tokenizer(TEMPLATES["bert"])
    config = BertConfig(vocab_size=len(tok), hidden_size=16, num_hidden_layers=2,
                        num_attention_heads=2, intermediate_size=32,
                        max_position_embeddings=32)  # fmt: skip
    BertForSequenceClassification(config).save_pretrained(tmp_path / "short")
    tok.save_pretrained(tmp_path / "short")
    loaded = load_model(model=str(tmp_path / "short"), labels=["negative", "positive"])
    model, pad = loaded.model.eval(), tok.pad_token_id
    long, short = "review : " + " ".join(["the movie was great"] * 20), "review : bad"
    ids = tok(long)["input_ids"]
    assert len(ids) > 32
    prompt = random_prompt(n=3)
    want = predict_ids(model, [ids[:28] + ids[-1:]], prompt, pad)  # 32 - 3 virtual tokens
    capsys.readouterr()
    got = predict(model, tok, prompt, [short, long], 2)
    torch.testing.assert_close(torch.tensor(got[1]), torch.tensor(want[0]))
    assert "1 of 2 inputs were longer than the model's 32 positions" in capsys.readouterr().err
    encoded = [(None, tok(t)["input_ids"]) for t in (long, short)]
    scores, _ = loaded.kind.score_choices(loaded, prompt, encoded, None, None, {})
    torch.testing.assert_close(torch.tensor(scores[0]), torch.tensor(want[0]))
    labels = generate(loaded, [long, short], prompt, GenerateConfig(batch_size=2))
    assert labels[0] == loaded.labels[max(range(2), key=want[0].__getitem__)]

    matrix.save_type("roberta", "classify", tmp_path / "roberta")
    roberta = load_model(model=str(tmp_path / "roberta"), labels=matrix.LABELS)
    limit = roberta.model.config.max_position_embeddings - roberta.model.config.pad_token_id - 1
    assert positions(roberta.model, roberta.tokenizer) == limit
    longer = "review : " + " ".join(["the movie was great"] * 200)
    assert len(roberta.tokenizer(longer)["input_ids"]) > limit
    predict(roberta.model, roberta.tokenizer, None, [longer])  # no index error
    with pytest.raises(ConfigError, match=f"longer than the {limit} positions"):
        train(cfg_for(tmp_path / "roberta", tmp_path, max_length=limit + 1), progress=False)
