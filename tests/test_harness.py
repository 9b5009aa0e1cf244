"""lm-evaluation-harness adapter: a local task over a local JSONL file (no network) gives the
same answers as `softprompt eval`, and the three requests match softprompt's own scoring."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import REVIEWS, random_prompt, write_reviews

lm_eval = pytest.importorskip("lm_eval")  # the `eval` extra

from lm_eval.api.instance import Instance  # noqa: E402
from lm_eval.tasks import TaskManager  # noqa: E402

from softprompt.artifacts import save_prompt  # noqa: E402
from softprompt.commands.eval import run_eval  # noqa: E402
from softprompt.config import DataConfig, EvalConfig, GenerateConfig, ModelConfig  # noqa: E402
from softprompt.generation import generate  # noqa: E402
from softprompt.harness import SoftPromptLM  # noqa: E402
from softprompt.rows import IGNORE_INDEX, Row  # noqa: E402
from softprompt.scoring import row_logprobs  # noqa: E402
from softprompt.templates import PromptFormat  # noqa: E402

TEMPLATE = "review : {input} sentiment :"


def _task(folder: Path, data: Path) -> Path:
    """A harness task over the local file: the same template and label words."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "sp_reviews.yaml").write_text(
        "task: sp_reviews\n"
        "dataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {data}\n"
        "test_split: test\n"
        "output_type: multiple_choice\n"
        'doc_to_text: "review : {{review}} sentiment :"\n'
        "doc_to_choice: ['negative', 'positive']\n"
        "doc_to_target: \"{{ ['negative', 'positive'].index(label) }}\"\n"
        "metric_list:\n  - metric: acc\n"
    )
    return folder


@pytest.fixture
def offline(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "datasets-cache"))


def _prompt_dir(tmp_path, loaded, seed=1) -> Path:
    prompt = random_prompt(seed, n=4)
    meta = {"prompt_format": PromptFormat(template=TEMPLATE).to_meta(), "template": TEMPLATE,
            "data": {"input_field": "review", "target_field": "label"}}  # fmt: skip
    return save_prompt(tmp_path / "prompt", prompt, loaded.model, loaded.name, meta)


def test_agrees_with_softprompt_eval(tmp_path, loaded_all, offline):
    """Accuracy of the harness's multiple-choice task == `softprompt eval --choices`, and the
    same prediction on every example."""
    loaded = loaded_all["llama"]
    data = write_reviews(tmp_path / "test.jsonl")
    folder = _prompt_dir(tmp_path, loaded)
    ours = run_eval(
        EvalConfig(
            model=ModelConfig(model=str(loaded.name)),
            data=DataConfig(
                data=str(data), input_field="review", target_field="label", val_fraction=0.0
            ),  # fmt: skip
            prompt=str(folder),
            choices="negative,positive",
            output=str(tmp_path / "eval"),
        ),
        loaded,
    )
    lm = SoftPromptLM(prompt=str(folder))
    res = lm_eval.simple_evaluate(
        model=lm,
        tasks=["sp_reviews"],
        task_manager=TaskManager(include_path=str(_task(tmp_path / "tasks", data))),
        log_samples=True,
    )
    acc = res["results"]["sp_reviews"]["acc,none"]
    assert acc == pytest.approx(ours["metrics"]["accuracy"])
    preds = [json.loads(x)["prediction"] for x in open(tmp_path / "eval" / "predictions.jsonl")]
    samples = sorted(res["samples"]["sp_reviews"], key=lambda s: s["doc_id"])
    theirs = [["negative", "positive"][max(range(2), key=lambda c: s["resps"][c][0][0])]
              for s in samples]  # fmt: skip
    assert theirs == preds
    assert 0 < acc < 1 or len(set(preds)) == 1  # a real prediction, not a constant guess


def _req(kind: str, args: tuple) -> Instance:
    return Instance(request_type=kind, doc={}, arguments=args, idx=0)


def test_loglikelihood_matches_row_logprobs(tmp_path, loaded_all):
    loaded = loaded_all["llama"]
    folder = _prompt_dir(tmp_path, loaded)
    lm = SoftPromptLM(prompt=str(folder), batch_size=2)
    ctx, cont = "review : the movie was great sentiment : ", "positive"
    (logp, greedy), (logp2, _) = lm.loglikelihood(
        [_req("loglikelihood", (ctx, cont)), _req("loglikelihood", (ctx.strip(), " positive"))]
    )
    assert logp == logp2  # trailing space moved to the continuation
    tok = loaded.tokenizer
    src = tok(ctx.strip(), add_special_tokens=True)["input_ids"]
    tgt = tok(" positive", add_special_tokens=False)["input_ids"]
    row = Row(src + tgt, [IGNORE_INDEX] * len(src) + tgt)
    want = row_logprobs(loaded.model, lm.prompt, [row], 1, tok.pad_token_id)[0][0]
    assert logp == pytest.approx(want, abs=1e-5)
    with torch.no_grad():  # greedy: the continuation's token is the argmax after the context
        emb = loaded.model.get_input_embeddings()(torch.tensor([src]))
        full = torch.cat([lm.prompt.embedding[None], emb], 1)
        top = int(loaded.model(inputs_embeds=full).logits[0, -1].argmax())
    assert greedy == (top == tgt[0])


def test_loglikelihood_rolling_is_the_whole_text(tmp_path, loaded_all):
    """The text's log-probability from the BOS on, one window or several (a long text in a
    model with few positions): the same number either way, the first window conditioned on
    the prompt."""
    loaded = loaded_all["llama"]
    lm = SoftPromptLM(prompt=str(_prompt_dir(tmp_path, loaded)))
    text = "the movie was great but the food was awful and the staff was very lovely"
    (total,) = lm.loglikelihood_rolling([_req("loglikelihood_rolling", (text,))])
    tok = loaded.tokenizer
    ids = [tok.bos_token_id] + tok(text, add_special_tokens=False)["input_ids"]
    row = Row(ids, [IGNORE_INDEX] + ids[1:])
    want = row_logprobs(loaded.model, lm.prompt, [row], 1, tok.pad_token_id)[0][0]
    assert total == pytest.approx(want, abs=1e-4)
    base = SoftPromptLM(model=str(loaded.name))
    (plain,) = base.loglikelihood_rolling([_req("loglikelihood_rolling", (text,))])
    assert plain != pytest.approx(total)
    config = base.loaded.model.config
    config.max_position_embeddings = 6  # windows of 6 tokens: later ones see less context
    (windowed,) = base.loglikelihood_rolling([_req("loglikelihood_rolling", (text,))])
    assert windowed != pytest.approx(plain) and windowed > -1e6


def test_generate_until_is_softprompt_generate(tmp_path, loaded_all):
    loaded = loaded_all["gemma3"]
    folder = _prompt_dir(tmp_path, loaded, seed=2)
    lm = SoftPromptLM(prompt=str(folder), batch_size=2)
    texts = [r for r, _ in REVIEWS[:3]]
    contexts = [TEMPLATE.format(input=t) for t in texts]
    outs = lm.generate_until(
        [_req("generate_until", (c, {"until": [], "max_gen_toks": 6})) for c in contexts]
    )
    want = generate(loaded, contexts, lm.prompt, GenerateConfig(max_new_tokens=6))
    assert [o.lstrip() for o in outs] == want
    # `until` cuts the answer before the first stop string
    stop = outs[0].split()[1] if len(outs[0].split()) > 1 else None
    if stop:
        (cut,) = lm.generate_until(
            [_req("generate_until", (contexts[0], {"until": [stop], "max_gen_toks": 6}))]
        )
        assert stop not in cut and outs[0].startswith(cut)
    # template=prompt renders a bare input through the saved template: the same answers
    templated = SoftPromptLM(prompt=str(folder), template="prompt")
    outs2 = templated.generate_until(
        [_req("generate_until", (t, {"until": [], "max_gen_toks": 6})) for t in texts]
    )
    assert [o.lstrip() for o in outs2] == want


def test_command_line_finds_the_model(tmp_path, loaded_all, offline):
    """`python -m softprompt.harness run --model softprompt ...` is lm_eval's own command
    with the model registered; results land in --output_path."""
    loaded = loaded_all["llama"]
    data = write_reviews(tmp_path / "test.jsonl")
    folder = _prompt_dir(tmp_path, loaded)
    tasks = _task(tmp_path / "tasks", data)
    cmd = [sys.executable, "-m", "softprompt.harness", "run", "--model", "softprompt",
           "--model_args", f"prompt={folder}", "--tasks", "sp_reviews", "--include_path",
           str(tasks), "--output_path", str(tmp_path / "out"), "--limit", "4"]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ), timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "sp_reviews" in proc.stdout and "acc" in proc.stdout
    assert list((tmp_path / "out").rglob("results_*.json"))


def test_batch_size_in_model_args_and_from_lm_eval_together(tmp_path, loaded_all):
    """The README's command, `--model_args prompt=DIR,batch_size=8`: lm_eval passes its own
    --batch_size too; the model arguments' value wins, with no TypeError."""
    folder = _prompt_dir(tmp_path, loaded_all["llama"])
    extra = {"batch_size": 1, "max_batch_size": None, "device": "cpu"}  # as lm_eval's CLI does
    lm = SoftPromptLM.create_from_arg_string(f"prompt={folder},batch_size=8", extra)
    assert lm.batch_size == 8 and lm.prompt is not None
    assert SoftPromptLM.create_from_arg_string(f"prompt={folder}", extra).batch_size == 1
