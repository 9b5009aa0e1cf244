"""The HTTP server through the official openai client, on 127.0.0.1 with a tiny model."""

from __future__ import annotations

import asyncio
import json
import shutil
import threading
import urllib.error
import urllib.request

import openai
import pytest
from conftest import random_prompt

from softprompt.artifacts import save_prompt
from softprompt.cli import flat_fields, main
from softprompt.config import GenerateConfig, ServeConfig
from softprompt.errors import ConfigError
from softprompt.generation import generate
from softprompt.loading import load_model
from softprompt.serving.api import create_app
from softprompt.serving.batcher import Batcher
from softprompt.serving.batcher import Job as Row
from softprompt.serving.server import BackgroundServer

TEMPLATE = "review : {input} sentiment :"
TEXTS = ["the movie was great", "i hate this screen and the battery was slow", "good"]


@pytest.fixture(scope="module")
def server(model_dirs, tmp_path_factory):
    """A running server with prompts short (3 tokens), long (12) and tmpl (with template)."""
    loaded = load_model(model=str(model_dirs["llama"]))
    folder = tmp_path_factory.mktemp("prompts")
    prompts = {
        "short": random_prompt(0, 3),
        "long": random_prompt(1, 12),
        "tmpl": random_prompt(2, 5),
    }
    for name, prompt in prompts.items():
        meta = {"template": TEMPLATE} if name == "tmpl" else {}
        save_prompt(folder / name, prompt, loaded.model, loaded.name, meta)
    cfg = ServeConfig(
        prompts=str(folder), max_batch_size=8, batch_wait_ms=30, max_prompt_tokens=40, max_tokens=64
    )
    app = create_app(loaded, cfg)
    assert app.state.softprompt.store.rescan()["added"] == ["long", "short", "tmpl"]
    background = BackgroundServer(app)
    client = openai.OpenAI(
        base_url=f"{background.url}/v1", api_key="unused", max_retries=0, timeout=30
    )
    yield {"client": client, "url": background.url, "loaded": loaded, "prompts": prompts,
           "folder": folder, "state": app.state.softprompt}  # fmt: skip
    background.stop()
    app.state.softprompt.batcher.close()


def _complete(client, model: str, text: str, **kw) -> openai.types.Completion:
    return client.completions.create(
        model=model, prompt=text, max_tokens=kw.pop("max_tokens", 6), temperature=0, **kw
    )


def _raw(url: str, path: str, body: bytes | None = None, method: str = "POST"):
    """(status, parsed body) of a raw request, for inputs the openai client cannot send."""
    req = urllib.request.Request(url + path, data=body, method=method)
    req.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def test_models_lists_base_and_prompts(server):
    ids = [m.id for m in server["client"].models.list().data]
    assert ids == ["base", "long", "short", "tmpl"]


@pytest.mark.parametrize("model", ["base", "short", "long", "tmpl"])
def test_completion_equals_library_generate(server, model):
    """Greedy text from the API is the library's text for the same prompt and template."""
    out = _complete(server["client"], model, TEXTS[1])
    prompt = server["prompts"].get(model)
    template = TEMPLATE if model == "tmpl" else None
    cfg = GenerateConfig(max_new_tokens=6)
    expected = generate(server["loaded"], [TEXTS[1]], prompt, cfg, template)[0]
    assert out.choices[0].text == expected and out.model == model
    assert out.usage.completion_tokens == 6 and out.choices[0].finish_reason == "length"


def test_concurrent_requests_share_batches_and_match_alone(server):
    """16 clients over four models at once: same text as alone, and batched together."""
    client, state = server["client"], server["state"]
    jobs = [(m, t) for m in ("base", "short", "long", "tmpl") for t in TEXTS[:2] * 2]
    alone = {job: _complete(client, *job).choices[0].text for job in set(jobs)}
    before = (state.batcher.metrics.batches, state.batcher.metrics.batch_rows)
    results: dict[int, str] = {}

    def worker(i: int) -> None:
        results[i] = _complete(client, *jobs[i]).choices[0].text

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(len(jobs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert [results[i] for i in range(len(jobs))] == [alone[job] for job in jobs]
    batches = state.batcher.metrics.batches - before[0]
    rows = state.batcher.metrics.batch_rows - before[1]
    assert rows == len(jobs) and batches < rows  # some requests shared a batch


def test_stream_matches_non_stream(server):
    client = server["client"]
    full = _complete(client, "long", TEXTS[0], max_tokens=8).choices[0].text
    chunks = list(_complete(client, "long", TEXTS[0], max_tokens=8, stream=True))
    assert "".join(c.choices[0].text for c in chunks) == full
    assert chunks[-1].choices[0].finish_reason == "length"
    messages = [{"role": "user", "content": "the food was awful"}]
    chat = client.chat.completions.create(
        model="short", messages=messages, max_tokens=8, temperature=0
    )
    parts = client.chat.completions.create(
        model="short", messages=messages, max_tokens=8, temperature=0, stream=True
    )
    streamed = "".join(c.choices[0].delta.content or "" for c in parts)
    assert streamed == chat.choices[0].message.content and streamed
    assert chat.usage.completion_tokens == 8


def test_stop_string_cuts_the_text(server):
    client = server["client"]
    full = _complete(client, "short", TEXTS[2], max_tokens=10).choices[0].text
    words = full.split()
    assert len(words) > 2
    stop = " " + words[2]
    cut = _complete(client, "short", TEXTS[2], max_tokens=10, stop=[stop])
    assert cut.choices[0].text == full[: full.index(stop)]
    assert cut.choices[0].finish_reason == "stop"


def test_sampling_returns_the_asked_tokens(server):
    out = server["client"].completions.create(
        model="tmpl", prompt=TEXTS[0], max_tokens=7, temperature=0.9, top_p=0.8
    )
    assert out.usage.completion_tokens <= 7 and out.choices[0].finish_reason in ("length", "stop")


def test_a_request_without_temperature_gets_the_servers(server, monkeypatch):
    """A request that names no temperature is answered as `softprompt generate` answers
    (greedy) unless the server was given --temperature; its own temperature always wins."""
    client, state = server["client"], server["state"]
    plain = client.completions.create(model="tmpl", prompt=TEXTS[1], max_tokens=6)
    assert plain.choices[0].text == _complete(client, "tmpl", TEXTS[1]).choices[0].text
    seen, submit = [], state.batcher.submit
    monkeypatch.setattr(state.batcher, "submit", lambda jobs: seen.extend(jobs) or submit(jobs))
    monkeypatch.setattr(state.cfg, "temperature", 0.7)
    client.completions.create(model="tmpl", prompt=TEXTS[1], max_tokens=2)
    client.completions.create(model="tmpl", prompt=TEXTS[1], max_tokens=2, temperature=0)
    assert [job.temperature for job in seen] == [0.7, 0.0]
    with pytest.raises(ConfigError, match="temperature must be 0 .greedy. or 0.01 to 2"):
        ServeConfig(prompts="x", temperature=0.001)


def test_limits_and_bad_input_get_4xx(server):
    client, url = server["client"], server["url"]
    with pytest.raises(openai.NotFoundError, match="not found"):
        _complete(client, "nope", "good")
    with pytest.raises(openai.BadRequestError, match="over this server's limit 64"):
        _complete(client, "base", "good", max_tokens=65)
    with pytest.raises(openai.BadRequestError, match="limit is 40"):
        _complete(client, "long", " ".join(["good"] * 30))
    with pytest.raises(openai.BadRequestError, match="1 to 8 prompts"):
        _complete(client, "base", ["good"] * 9)
    with pytest.raises(openai.BadRequestError, match="temperature"):
        client.completions.create(model="base", prompt="good", temperature=-1)
    with pytest.raises(openai.BadRequestError, match="n:"):
        client.completions.create(model="base", prompt="good", n=2)
    status, body = _raw(url, "/v1/completions", b'{"model": "base", "prompt": ')
    assert status == 400 and body["error"]["message"] == "the body is not valid JSON"
    status, body = _raw(url, "/v1/chat/completions", b'{"model": "base", "messages": []}')
    assert status == 400 and "messages" in body["error"]["message"]
    assert _complete(client, "short", "good").choices[0].text  # still serving
    status, health = _raw(url, "/health", method="GET")
    assert status == 200 and health["status"] == "ok" and health["prompts"] == 3


def test_prompt_names_cannot_leave_the_folder(server, tmp_path):
    url, folder = server["url"], server["folder"]
    outside = tmp_path / "outside"
    shutil.copytree(folder / "short", outside)
    (folder / "escape").symlink_to(outside, target_is_directory=True)
    try:
        for name in ("escape", "..", ".hidden", "a..b", "base"):
            status, body = _raw(url, f"/v1/prompts/{name}")
            assert status in (400, 404), name
            assert body["error"]["message"]
        assert _raw(url, "/v1/prompts/..%2F..%2Fetc")[0] == 404  # no route: '/' in a name
        rescan = _raw(url, "/v1/rescan")[1]
        assert rescan["added"] == [] and "outside the prompts folder" in rescan["errors"]["escape"]
    finally:
        (folder / "escape").unlink()
    with pytest.raises(openai.NotFoundError):
        _complete(server["client"], "../short", "good")


def test_prompts_added_and_removed_without_restart(server):
    client, url, folder = server["client"], server["url"], server["folder"]
    loaded = server["loaded"]
    save_prompt(folder / "fresh", random_prompt(9, 4), loaded.model, loaded.name)
    with pytest.raises(openai.NotFoundError):
        _complete(client, "fresh", "good")
    assert _raw(url, "/v1/rescan")[1]["added"] == ["fresh"]
    expected = generate(loaded, ["good"], random_prompt(9, 4), GenerateConfig(max_new_tokens=6))[0]
    assert _complete(client, "fresh", "good").choices[0].text == expected
    assert _raw(url, "/v1/prompts/fresh", method="DELETE") == (200, {"removed": "fresh"})
    with pytest.raises(openai.NotFoundError):
        _complete(client, "fresh", "good")
    assert _raw(url, "/v1/prompts/fresh")[1]["num_virtual_tokens"] == 4  # load by name
    shutil.rmtree(folder / "fresh")
    assert _raw(url, "/v1/rescan")[1]["removed"] == ["fresh"]
    assert "fresh" not in [m.id for m in client.models.list().data]


def test_a_failing_request_leaves_the_others_served(server, monkeypatch):
    """A batch that fails is retried row by row: only the request at fault gets a 500."""
    client, state = server["client"], server["state"]
    poison = server["loaded"].tokenizer.convert_tokens_to_ids("boring")
    kind = type(server["loaded"].kind)  # the batcher generates through the model's kind
    real = kind.generate_ids

    def faulty(self, model, ids, *args, **kwargs):
        if any(poison in row for row in ids):
            raise RuntimeError("poisoned row")
        return real(self, model, ids, *args, **kwargs)

    monkeypatch.setattr(kind, "generate_ids", faulty)
    failed_before = state.batcher.metrics.failed_requests
    outcome: dict[str, object] = {}

    def call(text: str) -> None:
        try:
            outcome[text] = _complete(client, "short", text).choices[0].text
        except openai.InternalServerError as err:
            outcome[text] = err

    texts = ["boring book", *TEXTS]
    threads = [threading.Thread(target=call, args=(t,)) for t in texts]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert isinstance(outcome["boring book"], openai.InternalServerError)
    assert "poisoned row" in str(outcome["boring book"])
    assert all(isinstance(outcome[t], str) for t in TEXTS)
    assert state.batcher.metrics.failed_requests == failed_before + 1


def test_metrics_count_requests_and_tokens(server):
    _complete(server["client"], "base", "good", max_tokens=3)
    with urllib.request.urlopen(server["url"] + "/metrics", timeout=10) as resp:
        text = resp.read().decode()
    values = dict(line.split() for line in text.strip().splitlines())
    assert int(values["softprompt_requests_total"]) >= 1
    assert int(values["softprompt_completion_tokens_total"]) >= 3
    assert values["softprompt_queue_length"] == "0"
    assert values["softprompt_prompts_loaded"] == "3"


def test_cli_serve_rejects_a_missing_folder(tmp_path, capsys):
    assert main(["serve", "--prompts", str(tmp_path / "none")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "--prompts" in err and "not a folder" in err


def test_cli_serve_help_shows_every_field(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "3000")  # no wrapping, so help texts stay whole
    with pytest.raises(SystemExit):
        main(["serve", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    for f in flat_fields(ServeConfig):
        assert "--" + f.name.replace("_", "-") in out
        assert " ".join(f.metadata["help"].split()) in out
    with pytest.raises(SystemExit):
        main(["--help"])
    assert "serve serve many prompts from one model" in " ".join(capsys.readouterr().out.split())


def test_batcher_splits_identical_requests_into_batches(server):
    """More identical rows than one batch holds: every row is answered, in full batches."""
    loaded, prefix = server["loaded"], server["state"].store.get("short").prefix
    ids = loaded.tokenizer("the movie was great")["input_ids"]

    async def run():
        batcher = Batcher(loaded, max_batch_size=2, wait_ms=50, max_queue=5)
        loop = asyncio.get_running_loop()
        rows = [Row(ids, prefix, 3, 0.0, 1.0, [], loaded.tokenizer, loop) for _ in range(5)]
        assert not batcher.submit(rows + rows[:1])  # over --max-queue: refused whole
        assert batcher.submit(rows)
        for row in rows:
            while (await asyncio.wait_for(row.events.get(), 30))[0] == "text":
                pass
        batcher.close()
        return [r.text for r in rows], batcher.metrics

    texts, metrics = asyncio.run(run())
    assert len(set(texts)) == 1 and texts[0]
    assert (metrics.batches, metrics.batch_rows, metrics.completion_tokens) == (3, 5, 15)


def test_a_labelled_prompts_stream_ends_after_its_label():
    """A job of a prompt trained on labels finishes once a whole label is written."""
    import asyncio

    from softprompt.serving.batcher import Job

    class Pieces:  # token i decodes to PIECES[i]
        def decode(self, tokens, skip_special_tokens=True):
            return "".join([" neg", "ative", ".", "\nThe", " end"][t] for t in tokens)

    loop = asyncio.new_event_loop()
    try:
        job = Job([1], None, 10, 0.0, 1.0, [], Pieces(), loop, labels=["positive", "negative"])
        for token in range(5):
            if job.finish_reason is None:
                job.push(token, eos=set())
        assert job.text == " negative" and job.finish_reason == "stop"
        assert len(job.tokens) == 3  # stopped at the first token after the label
        free = Job([1], None, 10, 0.0, 1.0, [], Pieces(), loop)
        for token in range(5):
            free.push(token, eos=set())
        assert free.text == " negative.\nThe end"
    finally:
        loop.close()


def test_a_labelled_prompt_answers_with_one_of_its_labels(server):
    """A prompt trained in classification mode (softprompt.json's choices) answers with a
    label and stops, whatever the base model would write (the tiny model writes noise)."""
    folder = server["folder"] / "labelled"
    meta = {
        "template": TEMPLATE,
        "choices": {"requested": "auto", "used": ["positive", "negative"]},
    }
    save_prompt(folder, random_prompt(3, 4), server["loaded"].model, server["loaded"].name, meta)
    try:
        assert server["state"].store.rescan()["added"] == ["labelled"]
        for text in TEXTS:
            out = _complete(server["client"], "labelled", text, max_tokens=8).choices[0]
            assert out.text.strip() in ("positive", "negative") and out.finish_reason == "stop"
        free = _complete(server["client"], "short", TEXTS[0], max_tokens=8).choices[0]
        assert free.finish_reason == "length"  # an unlabelled prompt is not held to labels
    finally:
        shutil.rmtree(folder)
        server["state"].store.rescan()
