"""Instruct models: conversational data, the prompt placed inside the chat template, and the
same rendering in training, generation, evaluation and serving."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import openai
import pytest
import torch
from conftest import REVIEWS, train_config

from softprompt.artifacts import load_prompt, read_meta
from softprompt.cli import main
from softprompt.commands.eval import run_eval
from softprompt.config import DataConfig, EvalConfig, GenerateConfig, ModelConfig, ServeConfig
from softprompt.data import load_examples
from softprompt.errors import ConfigError, DataError
from softprompt.generation import generate, generate_chat
from softprompt.loading import load_model
from softprompt.prompt import embed_tokens
from softprompt.rows import IGNORE_INDEX, collate, tokenize
from softprompt.serving.api import create_app
from softprompt.serving.server import BackgroundServer
from softprompt.templates import PromptFormat
from softprompt.training import train

SYSTEM = "answer : positive , negative"


def _conversations(path, n: int = 12, shape: str = "messages"):
    lines = []
    for review, label in REVIEWS[:n]:
        user, answer = {"role": "user", "content": review}, {"role": "assistant", "content": label}
        if shape == "messages":
            lines.append({"messages": [user, answer]})
        else:
            lines.append({"prompt": [user], "completion": [answer]})
    path.write_text("".join(json.dumps(x) + "\n" for x in lines))
    return path


@pytest.fixture(scope="module")
def chat(chat_dir):
    return load_model(model=str(chat_dir))


# --- data ------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", ["messages", "prompt-completion"])
def test_both_conversational_shapes_read_alike(tmp_path, shape):
    (ex,) = load_examples(str(_conversations(tmp_path / "c.jsonl", 1, shape)), DataConfig(data="x"))
    assert ex.messages[-1] == {"role": "assistant", "content": "positive"}
    assert (ex.source, ex.target) == ("the movie was great", "positive")


@pytest.mark.parametrize(
    "record,message",
    [
        ({"messages": [{"role": "robot", "content": "x"}]}, "unknown role 'robot'"),
        ({"messages": [{"role": "user", "content": "x"}]}, "must end with an assistant"),
        ({"messages": [{"role": "user", "content": ["x"]}]}, "content is list, not a string"),
        ({"messages": [{"role": "user"}]}, "needs a 'role' and a 'content'"),
        ({"prompt": [{"role": "user", "content": "x"}]}, "needs a 'completion' list"),
    ],
)
def test_malformed_conversations_name_file_and_line(tmp_path, record, message):
    path = tmp_path / "c.jsonl"
    ok = {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}
    path.write_text(json.dumps(ok) + "\n" + json.dumps(record) + "\n")
    with pytest.raises(DataError, match=f"^{path}:2: .*{message}"):
        load_examples(str(path), DataConfig(data="x"))


def test_a_file_mixing_conversations_and_pairs_is_refused(tmp_path):
    path = _conversations(tmp_path / "c.jsonl", 2)
    with path.open("a") as fh:
        fh.write('{"input": "a", "target": "b"}\n')
    with pytest.raises(DataError, match=":3: not a conversation"):
        load_examples(str(path), DataConfig(data="x"))


def _row(chat, position: str, messages, loss_on="all-assistant", system=SYSTEM):
    fmt = PromptFormat(chat=True, position=position, system=system)
    ex = load_examples(_write(messages), DataConfig(data="x"))[0]
    return tokenize([ex], chat.tokenizer, 256, "", None, fmt, loss_on)[0]


def _write(messages) -> str:
    """A one-conversation data file, in a fresh folder."""
    path = Path(tempfile.mkdtemp()) / "c.jsonl"
    path.write_text(json.dumps({"messages": messages}) + "\n")
    return str(path)


TWO_TURNS = [
    {"role": "user", "content": "the movie was great"},
    {"role": "assistant", "content": "positive"},
    {"role": "user", "content": "the food was awful"},
    {"role": "assistant", "content": "negative"},
]


def test_loss_only_on_assistant_turns_with_their_end_token(chat):
    tok = chat.tokenizer
    end = tok.convert_tokens_to_ids("<|im_end|>")
    every = _row(chat, "start", TWO_TURNS)
    learned = [t for t in every.labels if t != IGNORE_INDEX]
    assert tok.convert_ids_to_tokens(learned) == [
        "positive",
        "<|im_end|>",
        "negative",
        "<|im_end|>",
    ]
    last = _row(chat, "start", TWO_TURNS, loss_on="last-assistant")
    assert [t for t in last.labels if t != IGNORE_INDEX] == [
        tok.convert_tokens_to_ids("negative"),
        end,
    ]


def test_positions_put_the_prompt_where_asked(chat):
    tok = chat.tokenizer
    for position, before in [
        ("start", []),
        ("after-system", ["<|im_start|>", "system", "answer", ":", "positive", ",", "negative"]),
        (
            "before-user",
            ["<|im_start|>", "system", "answer", ":", "positive", ",", "negative", "<|im_end|>"],
        ),
    ]:
        row = _row(chat, position, TWO_TURNS[:2])
        assert tok.convert_ids_to_tokens(row.input_ids[: row.prompt_at]) == before, position
    # without a system message the template's default system turn is the head
    row = _row(chat, "before-user", TWO_TURNS[:2], system=None)
    head = tok.convert_ids_to_tokens(row.input_ids[: row.prompt_at])
    assert head[:2] == ["<|im_start|>", "system"] and head[-1] == "<|im_end|>"
    with pytest.raises(DataError, match="after-system needs a system message.*--system"):
        _row(chat, "after-system", TWO_TURNS[:2], system=None)


def test_a_model_without_chat_template_names_the_flag(tiny_dir, tmp_path):
    loaded = load_model(model=str(tiny_dir))
    ex = load_examples(str(_conversations(tmp_path / "c.jsonl", 1)), DataConfig(data="x"))
    with pytest.raises(ConfigError, match="chat_template=FILE"):
        tokenize(ex, loaded.tokenizer, 64, "", None, PromptFormat(chat=True))


def test_chat_template_file_overrides_the_tokenizers(chat, tmp_path):
    path = tmp_path / "t.jinja"
    path.write_text("{% for m in messages %}{{ m['role'] }} : {{ m['content'] }} ! {% endfor %}")
    fmt = DataConfig(data="x", chat_template=str(path)).prompt_format(chat=True)
    ex = load_examples(str(_conversations(tmp_path / "c.jsonl", 1)), DataConfig(data="x"))
    row = tokenize(ex, chat.tokenizer, 64, "", None, fmt)[0]
    assert chat.tokenizer.decode(row.input_ids).startswith("user : the movie was great !")


# --- training, generation, serving: one rendering ------------------------------------


@pytest.fixture(scope="module")
def chat_run(chat_dir, tmp_path_factory):
    """A prompt trained on conversations, placed after the system message."""
    root = tmp_path_factory.mktemp("chat")
    data = _conversations(root / "train.jsonl")
    cfg = train_config(chat_dir, data, root / "run", epochs=3, system=SYSTEM, template=None,
                       prompt_position="after-system")  # fmt: skip
    result = train(cfg, progress=False)
    return root / "run", result


def test_training_on_conversations_records_the_format(chat_run):
    out, result = chat_run
    meta = read_meta(out)
    assert meta["placement"] == "after-system" and meta["peft_compatible"] is False
    fmt = PromptFormat.from_meta(meta)
    assert fmt.chat and fmt.position == "after-system" and fmt.system == SYSTEM
    assert meta["data"]["mode"] == "chat"
    assert result.summary["best_val_loss"] < result.summary["base_val_loss"]


def _training_logits(chat, prompt, messages) -> torch.Tensor:
    """The distribution over the answer's first token, as training computes it: the row's
    whole sequence with the prompt spliced in, through the model's own forward."""
    fmt = PromptFormat(chat=True, position="after-system", system=SYSTEM)
    ex = load_examples(_write(messages), DataConfig(data="x"))
    row = tokenize(ex, chat.tokenizer, 256, "", None, fmt, "last-assistant")[0]
    batch = collate([row], chat.tokenizer.pad_token_id)
    emb, _, labels = prompt.prepend(
        embed_tokens(chat.model, batch["input_ids"]),
        batch["attention_mask"],
        batch["labels"],
        batch.get("prompt_at"),
    )
    first = int((labels[0] != IGNORE_INDEX).nonzero()[0])  # the answer's first token
    with torch.no_grad():
        return chat.model(inputs_embeds=emb).logits[0, first - 1]


def test_server_sees_what_training_saw(chat, chat_run):
    """/v1/chat/completions renders the conversation as training did (same template, system
    message, placement): its logits at the answer position equal training's."""
    out, _ = chat_run
    prompt, _ = load_prompt(out, chat.model)
    messages = [{"role": "user", "content": "i hate this screen"}]
    expected = _training_logits(chat, prompt, [*messages, {"role": "assistant", "content": "x"}])
    seen = []
    hook = chat.model.get_output_embeddings().register_forward_hook(
        lambda mod, args, output: seen.append(output[0, -1].detach().clone())
    )
    app = create_app(chat, ServeConfig(prompts=str(out.parent), batch_wait_ms=1))
    app.state.softprompt.store.load("run")
    server = BackgroundServer(app)
    try:
        client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="x", max_retries=0)
        reply = client.chat.completions.create(
            model="run", messages=messages, max_tokens=3, temperature=0
        )
        status = client.completions.with_raw_response.create
        with pytest.raises(openai.BadRequestError, match="trained on conversations"):
            status(model="run", prompt="the movie", max_tokens=2)
    finally:
        server.stop()
        app.state.softprompt.batcher.close()
        hook.remove()
    torch.testing.assert_close(seen[0], expected, atol=1e-4, rtol=1e-4)
    fmt = PromptFormat.from_meta(read_meta(out))
    local = generate_chat(chat, [messages], prompt, GenerateConfig(max_new_tokens=3), fmt)
    assert reply.choices[0].message.content == local[0]


def test_cli_generate_uses_the_saved_chat_format(chat_run, capsys):
    out, _ = chat_run
    assert main(["generate", "--prompt", str(out), "--compare", "--max-new-tokens", "3",
                 "the food was awful"]) == 0  # fmt: skip
    text = capsys.readouterr().out
    assert "[1] the food was awful" in text and "  tuned   : " in text and "  base    : " in text
    code = main(["generate", "--prompt", str(out), "--template", "{soft_prompt} {input}", "x"])
    assert code == 2 and "is for raw templates" in capsys.readouterr().err


def test_eval_baselines_on_conversations(chat_dir, chat_run, tmp_path):
    """The system-prompt and few-shot (prior turns) baselines and the tuned prompt, scored on
    the same conversations: loss on the answer and exact match of the generation."""
    out, _ = chat_run
    data = str(_conversations(tmp_path / "test.jsonl", 4))
    shots = str(_conversations(tmp_path / "shots.jsonl", 12))
    common = dict(model=ModelConfig(model=str(chat_dir)), generate=True, max_new_tokens=2)
    system = run_eval(EvalConfig(data=DataConfig(data=data, system=SYSTEM), **common))
    few = run_eval(
        EvalConfig(data=DataConfig(data=data, system=SYSTEM), shots=2, shots_data=shots, **common)
    )
    tuned = run_eval(EvalConfig(data=DataConfig(data=data), prompt=str(out), **common))
    assert few["shots"] == 2
    for result in (system, few, tuned):
        assert 0 <= result["metrics"]["exact_match"] <= 1 and result["metrics"]["loss"] > 0
    assert tuned["metrics"]["loss"] < system["metrics"]["loss"]


# --- raw templates: {soft_prompt} and fields ------------------------------------------


def test_soft_prompt_marker_and_fields_in_generation_and_serving(tiny_dir, pairs_file, tmp_path):
    """A template with {soft_prompt} and a second field trains, generates with --field, and is
    served with the request's `fields`; a missing field is a one-line error / a 400."""
    cfg = train_config(tiny_dir, pairs_file, tmp_path / "runs" / "p", max_steps=2,
                       template="{topic} : {soft_prompt}review : {input} sentiment :")  # fmt: skip
    with pytest.raises(DataError, match="template field {topic} is not in the record"):
        train(cfg, progress=False)
    records = [json.loads(x) | {"topic": "film"} for x in pairs_file.read_text().splitlines()]
    pairs_file.write_text("".join(json.dumps(r) + "\n" for r in records))
    train(cfg, progress=False)
    meta = read_meta(tmp_path / "runs" / "p")
    assert meta["placement"] == "marker" and meta["peft_compatible"] is False
    loaded = load_model(model=str(tiny_dir))
    prompt, _ = load_prompt(tmp_path / "runs" / "p", loaded.model)
    fmt = PromptFormat.from_meta(meta)
    want = generate(loaded, ["good"], prompt, fmt=fmt, fields={"topic": "film"})
    assert main(["generate", "--prompt", str(tmp_path / "runs" / "p"), "good"]) == 2
    app = create_app(loaded, ServeConfig(prompts=str(tmp_path / "runs")))
    app.state.softprompt.store.rescan()
    server = BackgroundServer(app)
    try:
        client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="x", max_retries=0)
        got = client.completions.create(model="p", prompt="good", max_tokens=32, temperature=0,
                                        extra_body={"fields": {"topic": "film"}})  # fmt: skip
        with pytest.raises(openai.BadRequestError, match="template field {topic}"):
            client.completions.create(model="p", prompt="good", max_tokens=2)
        with pytest.raises(openai.BadRequestError, match="use /v1/completions"):
            client.chat.completions.create(
                model="p", messages=[{"role": "user", "content": "good"}], max_tokens=2
            )
    finally:
        server.stop()
        app.state.softprompt.batcher.close()
    assert got.choices[0].text == want[0]


def test_json_answers_are_checked_for_format():
    from softprompt.measure.metrics import generation_metrics

    refs = ['{"topic": "price", "sentiment": "positive"}'] * 3
    preds = ['{"topic": "screen", "sentiment": "positive"}\nmore', "topic: price", '{"topic": 1}']
    got = generation_metrics(preds, refs)
    assert got["json_valid"] == pytest.approx(1 / 3) and got["exact_match"] == 0
    assert "json_valid" not in generation_metrics(["a"], ["b"])
