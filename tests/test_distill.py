"""`softprompt distill`: a long context compiled into a few virtual tokens, on tiny models.

The loss (KL over the teacher's top-k tokens plus a rest bucket, in chunks) against a
full-logits reference; a student that *is* the teacher's context scores KL 0; the teacher's
answers cached in the run folder and reused on resume (and regenerated, never trusted, when
they do not match); batch == alone; the command line and --against-teacher.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import REVIEWS, interrupted_at, write_reviews

from softprompt.config import DataConfig, DistillConfig, ModelConfig, PromptConfig
from softprompt.errors import ConfigError

TEMPLATE = "review : {input} sentiment :"
CONTEXT = "the movie was great . positive . the food was awful . negative ."


def _teacher_distribution(logits: torch.Tensor, k: int):
    lse = logits.logsumexp(1, keepdim=True)
    top, ids = logits.topk(k, 1)
    rest = logits.scatter(1, ids, -math.inf).logsumexp(1, keepdim=True)
    return ids, torch.cat([top, rest], 1) - lse


def _reference_kl(student_logits, ids, logp):
    """KL(teacher || student) over the k+1 buckets, written out on full logits."""
    p_student = student_logits.float().softmax(1)
    top = p_student.gather(1, ids)
    buckets = torch.cat([top, 1 - top.sum(1, keepdim=True)], 1)
    teacher = logp.exp()
    return (teacher * (logp - buckets.log())).sum()


@pytest.mark.parametrize("cap", [None, 2.5])
def test_chunked_kl_equals_full_logits_kl(cap, monkeypatch):
    from softprompt import loss

    gen = torch.Generator().manual_seed(0)
    weight, bias = torch.randn(40, 8, generator=gen), torch.randn(40, generator=gen)
    hidden = torch.randn(11, 8, generator=gen, requires_grad=True)
    ids, logp = _teacher_distribution(torch.randn(11, 40, generator=gen) * 3, 6)
    monkeypatch.setattr(loss, "CHUNK_ELEMENTS", 40 * 3)  # chunks of 3 rows: 4 chunks
    got = loss.teacher_kl(hidden, weight, bias, ids, logp, cap)
    (g_got,) = torch.autograd.grad(got, hidden)
    logits = torch.nn.functional.linear(hidden, weight, bias)
    if cap is not None:
        logits = torch.tanh(logits / cap) * cap
    want = _reference_kl(logits, ids, logp)
    (g_want,) = torch.autograd.grad(want, hidden)
    assert got.item() == pytest.approx(want.item(), rel=1e-5)
    torch.testing.assert_close(g_got, g_want, rtol=1e-4, atol=1e-6)


def test_kl_is_zero_for_the_teachers_own_distribution():
    from softprompt.loss import _soft_kl

    logits = torch.randn(5, 30, generator=torch.Generator().manual_seed(1)) * 4
    ids, logp = _teacher_distribution(logits, 4)
    assert float(_soft_kl(logits, ids, logp)) == pytest.approx(0.0, abs=1e-5)
    assert float(_soft_kl(logits.flip(1), ids, logp)) > 0.1


def test_collate_points_labels_at_the_teachers_table():
    from softprompt.rows import IGNORE_INDEX, Row, collate

    soft = lambda n, v: (torch.full((n, 2), v), torch.zeros(n, 3))  # noqa: E731
    rows = [Row([5, 6, 7], [IGNORE_INDEX, 6, 7], soft=soft(2, 1)),
            Row([5, 8], [IGNORE_INDEX, 8], soft=soft(1, 2))]  # fmt: skip
    batch = collate(rows, pad_id=0)
    assert batch["labels"].tolist() == [[IGNORE_INDEX, 0, 1], [IGNORE_INDEX, 2, IGNORE_INDEX]]
    assert batch["soft_ids"][:, 0].tolist() == [1, 1, 2]
    with pytest.raises(ValueError, match="mixes"):
        collate([rows[0], Row([5], [5])], pad_id=0)


def _cfg(model_dir, tmp_path, **kw):
    data = write_reviews(tmp_path / "inputs.jsonl")
    (tmp_path / "ctx.txt").write_text(CONTEXT)
    kw.setdefault("teacher_context", str(tmp_path / "ctx.txt"))
    template = kw.pop("template", TEMPLATE)
    position = kw.pop("prompt_position", "start")
    return DistillConfig(
        model=ModelConfig(model=str(model_dir)),
        data=DataConfig(
            data=str(data),
            input_field="review",
            target_field="label",
            template=template,
            val_fraction=0.25,
            prompt_position=position,
        ),
        prompt=PromptConfig(num_virtual_tokens=kw.pop("n", 4), init=kw.pop("init", "auto")),
        output=str(tmp_path / "out"),
        batch_size=3,
        lr=0.3,
        max_steps=kw.pop("max_steps", 4),
        teacher_max_new_tokens=kw.pop("new", 4),
        agreement_inputs=kw.pop("agreement_inputs", 3),
        **kw,
    )


def test_a_student_equal_to_the_context_has_kl_zero(tiny_dir, tmp_path):
    """The prompt at {soft_prompt} holding the context's own token embeddings is the teacher:
    KL 0 on every answer token (the rows, targets and loss line up exactly)."""
    from softprompt import distill as d
    from softprompt.loading import load_model
    from softprompt.prompt import SoftPrompt, embed_tokens
    from softprompt.scoring import evaluate_loss

    cfg = _cfg(tiny_dir, tmp_path, template="{soft_prompt} " + TEMPLATE)
    loaded = load_model(cfg.model)
    with torch.no_grad():  # a random model's distributions are near uniform: sharpen them
        loaded.model.lm_head.weight.mul_(100)
    source = d.DistillSource(cfg)
    train_ex, val_ex = source.examples(cfg)
    data = source.prepare(cfg, train_ex, val_ex, loaded, tmp_path / "out", "cpu")
    tok = loaded.tokenizer
    ids = tok(CONTEXT, add_special_tokens=False)["input_ids"]
    own = SoftPrompt(embed_tokens(loaded.model, torch.tensor([ids]))[0])
    result = evaluate_loss(loaded.model, own, data.train_rows, 4, tok.pad_token_id)
    assert result["tokens"] == sum(len(r.soft[0]) for r in data.train_rows) > 0
    other = SoftPrompt(torch.randn(len(ids), 16, generator=torch.Generator().manual_seed(0)))
    far = evaluate_loss(loaded.model, other, data.train_rows, 4, tok.pad_token_id)["loss"]
    assert far > 0.05
    assert result["loss"] == pytest.approx(0.0, abs=1e-4 * far)


def test_batch_equals_alone(tiny_dir, tmp_path):
    from softprompt import distill as d
    from softprompt.loading import load_model
    from softprompt.loss import lm_loss
    from softprompt.rows import collate

    cfg = _cfg(tiny_dir, tmp_path)
    loaded = load_model(cfg.model)
    source = d.DistillSource(cfg)
    data = source.prepare(cfg, *source.examples(cfg), loaded, tmp_path / "out", "cpu")
    prompt = __import__("conftest").random_prompt(n=4)
    rows = data.train_rows[:5]
    pad = loaded.tokenizer.pad_token_id
    together, n = lm_loss(loaded.model, prompt, collate(rows, pad))
    alone = [lm_loss(loaded.model, prompt, collate([r], pad)) for r in rows]
    assert n == sum(m for _, m in alone)
    assert together.item() == pytest.approx(sum(x.item() for x, _ in alone), rel=1e-4)


def test_distill_trains_caches_the_teacher_and_reuses_it_on_resume(tiny_dir, tmp_path, monkeypatch):
    from softprompt import distill as d

    cfg = _cfg(tiny_dir, tmp_path, max_steps=6, save_every=1)
    with interrupted_at(4):
        d.distill(cfg, progress=False)
    out = tmp_path / "out"
    assert (out / "teacher" / "targets.safetensors").is_file()
    spec = json.loads((out / "teacher" / "spec.json").read_text())
    assert spec["mode"] == "context" and spec["text"] == CONTEXT

    def no_teacher(*args, **kwargs):
        raise AssertionError("the teacher's answers were generated again")

    monkeypatch.setattr(d, "_teacher_answers", no_teacher)
    import dataclasses

    result = d.distill(dataclasses.replace(cfg, resume=True), progress=False)
    assert result.summary["steps"] == 6
    meta = json.loads((out / "softprompt.json").read_text())
    assert meta["data"]["mode"] == "distill"
    assert meta["data"]["teacher"]["sha256"] == d.Teacher("context", CONTEXT).digest
    report = json.loads((out / "teacher-agreement.json").read_text())
    assert report["inputs"] == 3 and 0 <= report["answer_match"] <= 1
    assert report["teacher_prefill_tokens"] > report["student_prefill_tokens"] - 4
    assert "teacher_metric" in report  # the inputs have labels


def test_a_changed_or_damaged_cache_is_regenerated(tiny_dir, tmp_path):
    from softprompt import distill as d
    from softprompt.loading import load_model

    cfg = _cfg(tiny_dir, tmp_path)
    loaded = load_model(cfg.model)
    source = d.DistillSource(cfg)
    source.examples(cfg)
    folder = tmp_path / "teacher"
    first = d.teacher_targets(cfg, source.teacher, loaded, source.fmt, source.inputs[0], folder)
    again = d.teacher_targets(cfg, source.teacher, loaded, source.fmt, source.inputs[0], folder)
    assert again.answers == first.answers
    torch.testing.assert_close(torch.cat(again.logp), torch.cat(first.logp))
    other = d.Teacher("context", CONTEXT + " boring .")
    changed = d.teacher_targets(cfg, other, loaded, source.fmt, source.inputs[0], folder)
    assert changed.prompt_tokens != first.prompt_tokens
    (folder / "targets.safetensors").write_bytes(b"not a safetensors file")
    fresh = d.teacher_targets(cfg, source.teacher, loaded, source.fmt, source.inputs[0], folder)
    assert fresh.answers == first.answers


def test_teacher_modes_place_the_context(chat_dir, tiny_dir, tmp_path):
    """Each teacher's tokens: the context where the prompt goes, the shots in the template,
    the system message and the shots as turns of a conversation."""
    from softprompt import distill as d
    from softprompt.loading import load_model

    tok = load_model(ModelConfig(model=str(tiny_dir))).tokenizer
    fmt = DataConfig(data="x", template=TEMPLATE).prompt_format()
    x = d.Input("the film was boring", {}, None, "negative", "x:1")
    text = tok.decode(d.teacher_ids(d.Teacher("context", CONTEXT), tok, fmt, x))
    assert text.startswith("<bos> the movie was great") and text.endswith("boring sentiment :")
    shots = d.Teacher("shots", "", (("i love it", "positive"),))
    text = tok.decode(d.teacher_ids(shots, tok, fmt, x))
    assert "review : i love it sentiment : positive" in text
    assert text.endswith("review : the film was boring sentiment :")

    chat_tok = load_model(ModelConfig(model=str(chat_dir))).tokenizer
    chat = DataConfig(data="x", prompt_position="before-user").prompt_format(chat=True)
    turn = d.Input("the film was boring", {}, [{"role": "user", "content": "the film was boring"}],
                   None, "x:1")  # fmt: skip
    system = d.teacher_ids(d.Teacher("system", "answer positive and negative"), chat_tok, chat,
                           turn)  # fmt: skip
    text = chat_tok.decode(system)
    assert "system answer positive and negative" in text and "good answer bot" not in text
    assert text.endswith("user the film was boring <|im_end|> <|im_start|> assistant")
    as_turns = chat_tok.decode(d.teacher_ids(shots, chat_tok, chat, turn))
    assert as_turns.index("i love it") < as_turns.index("positive") < as_turns.index("boring")


def test_one_teacher_and_settings_checked(tmp_path, tiny_dir):
    from softprompt import distill as d

    with pytest.raises(ConfigError, match="exactly one teacher"):
        d.DistillSource(_cfg(tiny_dir, tmp_path, teacher_context=None))
    (tmp_path / "sys.txt").write_text("be brief")
    with pytest.raises(ConfigError, match="exactly one teacher"):
        d.DistillSource(_cfg(tiny_dir, tmp_path, teacher_system=str(tmp_path / "sys.txt")))
    with pytest.raises(ConfigError, match="greedy answers are all the same"):
        _cfg(tiny_dir, tmp_path, teacher_samples=2)
    with pytest.raises(ConfigError, match="the student.s template"):
        d.DistillSource(_cfg(tiny_dir, tmp_path, teacher_context=None, template=None,
                             teacher_template=str(tmp_path / "sys.txt")))  # fmt: skip


def test_cli_distill_and_eval_against_teacher(tiny_dir, tmp_path, capsys):
    from softprompt.cli import main

    data = write_reviews(tmp_path / "inputs.jsonl")
    shots = tmp_path / "shots.jsonl"
    shots.write_text("".join(json.dumps({"review": r, "label": y}) + "\n" for r, y in REVIEWS[:2]))
    out = tmp_path / "run"
    code = main(["distill", "--model", str(tiny_dir), "--data", str(data), "--input-field",
                 "review", "--target-field", "label", "--template", TEMPLATE, "--shots",
                 str(shots), "--num-virtual-tokens", "3", "--max-steps", "2", "--batch-size",
                 "4", "--teacher-max-new-tokens", "3", "--agreement-inputs", "2",
                 "--val-fraction", "0.25", "--output", str(out)])  # fmt: skip
    assert code == 0
    err = capsys.readouterr().err
    assert "teacher:" in err, err
    assert "against the teacher on 2 held-out inputs" in err, err
    code = main(["eval", "--prompt", str(out), "--data", str(data), "--input-field", "review",
                 "--target-field", "label", "--against-teacher", "--limit", "4", "--output",
                 str(tmp_path / "ev")])  # fmt: skip
    assert code == 0
    printed = capsys.readouterr().out
    assert "answers agreeing with the teacher" in printed and "teacher prefill tokens" in printed
    results = json.loads((tmp_path / "ev" / "results.json").read_text())
    assert results["metrics"]["inputs"] == 4
    lines = (tmp_path / "ev" / "predictions.jsonl").read_text().splitlines()
    assert len(lines) == 4 and {"teacher", "student", "agree"} <= set(json.loads(lines[0]))
    # a prompt that was not distilled, and a changed teacher record, are refused in one line
    (out / "teacher" / "spec.json").write_text(json.dumps({"mode": "context", "text": "x"}))
    assert main(["eval", "--prompt", str(out), "--data", str(data), "--input-field", "review",
                 "--against-teacher"]) == 2  # fmt: skip
    assert "does not match" in capsys.readouterr().err


def test_distill_a_deep_prompt_and_sampled_answers(tiny_dir, tmp_path):
    """--method prefix distils into keys/values per layer; --teacher-samples K gives K
    answers per input (sampled), each a row of its own."""
    from softprompt import distill as d
    from softprompt.prompt import DeepPrompt

    cfg = _cfg(tiny_dir, tmp_path, method="prefix", teacher_samples=2, teacher_temperature=1.0)
    result = d.distill(cfg, progress=False)
    assert isinstance(result.prompt, DeepPrompt)
    meta = json.loads((tmp_path / "out" / "softprompt.json").read_text())
    assert meta["data"]["teacher"]["answers"] == 2 * len(REVIEWS)
    assert meta["data"]["train_examples"] + meta["data"]["val_examples"] == 2 * len(REVIEWS)
    assert json.loads((tmp_path / "out" / "teacher-agreement.json").read_text())["inputs"] == 3


def test_distill_a_system_message_on_a_chat_model(chat_dir, tmp_path):
    """A system-message teacher on a chat model: plain inputs become user turns, the teacher's
    answers end at the end-of-turn token, the prompt sits before the user turn."""
    from softprompt import distill as d
    from softprompt.artifacts import read_meta

    (tmp_path / "sys.txt").write_text("answer positive and negative")
    cfg = _cfg(chat_dir, tmp_path, teacher_context=None, teacher_system=str(tmp_path / "sys.txt"),
               template=None, prompt_position="before-user", new=6)  # fmt: skip
    d.distill(cfg, progress=False)
    meta = read_meta(tmp_path / "out")
    assert meta["prompt_format"]["chat"] and meta["prompt_format"]["position"] == "before-user"
    targets = d._read_targets(tmp_path / "out" / "teacher" / "targets.safetensors", None)
    assert targets is None  # another key: refused, not trusted
    source = d.DistillSource(cfg)
    source.examples(cfg)
    from softprompt.loading import load_model

    loaded = load_model(cfg.model)
    got = d.teacher_targets(cfg, source.teacher, loaded, source.fmt, source.inputs[0],
                            tmp_path / "out" / "teacher")  # fmt: skip
    end = loaded.tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert all(a[-1] == end or len(a) == 6 for a in got.answers)


@pytest.mark.parametrize("name", ["llama", "gemma3"])
def test_the_shared_context_runs_once_with_the_same_targets(model_dirs, tmp_path, monkeypatch,
                                                            name):  # fmt: skip
    """The context every teacher input starts with runs once (a compiled prefix, a shared
    cache): the same answers and distributions as every row run whole."""
    from softprompt import distill as d
    from softprompt.loading import load_model

    cfg = _cfg(model_dirs[name], tmp_path, new=5)
    loaded = load_model(cfg.model)
    with torch.no_grad():  # sharper distributions, so an answer depends on its input
        loaded.model.lm_head.weight.mul_(30)
    source = d.DistillSource(cfg)
    source.examples(cfg)
    args = (cfg, source.teacher, loaded, source.fmt, source.inputs[0], None)
    monkeypatch.setattr(d, "MIN_SHARED", 10**6)
    whole = d.teacher_targets(*args)
    monkeypatch.setattr(d, "MIN_SHARED", 4)
    rows = [
        d.teacher_ids(source.teacher, loaded.tokenizer, source.fmt, x) for x in source.inputs[0]
    ]
    assert d.shared_length(loaded.model, rows) >= 15  # <bos> and the context's 14 tokens
    shared = d.teacher_targets(*args)
    assert shared.answers == whole.answers
    for a, b in zip(shared.ids, whole.ids):
        assert torch.equal(a[:, :3], b[:, :3])  # the three most likely tokens (ties aside)
    torch.testing.assert_close(torch.cat(shared.logp), torch.cat(whole.logp), atol=1e-4, rtol=1e-4)


def test_gold_answers_mixed_in_learn_with_the_cross_entropy(tiny_dir, tmp_path):
    """--mix-labels: a gold answer's row has a one-hot teacher distribution, whose KL
    divergence is the cross-entropy of the plain labelled row."""
    import dataclasses

    from softprompt import distill as d
    from softprompt.loading import load_model
    from softprompt.loss import lm_loss
    from softprompt.rows import collate

    cfg = _cfg(tiny_dir, tmp_path, mix_labels=True)
    loaded = load_model(cfg.model)
    source = d.DistillSource(cfg)
    source.examples(cfg)
    rows = d.gold_rows(cfg, loaded, source.fmt, source.inputs[0], 200, 7)
    assert len(rows) == len(source.inputs[0]) and all(r.soft[0].shape[1] == 7 for r in rows)
    prompt = __import__("conftest").random_prompt(n=4)
    pad = loaded.tokenizer.pad_token_id
    soft, n = lm_loss(loaded.model, prompt, collate(rows, pad))
    plain_rows = [dataclasses.replace(r, soft=None) for r in rows]
    plain, m = lm_loss(loaded.model, prompt, collate(plain_rows, pad))
    assert n == m and soft.item() == pytest.approx(plain.item(), rel=1e-5)
    data = source.prepare(cfg, *source.examples(cfg), loaded, tmp_path / "out", "cpu")
    assert data.info["labelled_rows"] == len(source.inputs[0])
    assert len(data.train_rows) == 2 * len(source.inputs[0])
