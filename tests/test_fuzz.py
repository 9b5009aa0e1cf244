"""Property-based tests (Hypothesis): whatever bytes a data file holds and whatever JSON a
client sends, softprompt answers with its own clear error, never a crash."""

from __future__ import annotations

import json
import urllib.error
import urllib.request

import pytest
from conftest import random_prompt
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from softprompt.artifacts import save_prompt
from softprompt.config import DataConfig, ServeConfig
from softprompt.data import load_examples
from softprompt.errors import SoftpromptError
from softprompt.loading import load_model
from softprompt.serving.api import create_app
from softprompt.serving.server import BackgroundServer

FAST = settings(max_examples=120, deadline=None, suppress_health_check=list(HealthCheck))
JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)


@pytest.mark.parametrize("suffix", [".jsonl", ".csv", ".tsv", ".txt"])
@FAST
@given(content=st.binary(max_size=300))
def test_any_bytes_give_examples_or_a_data_error(tmp_path_factory, suffix, content):
    path = tmp_path_factory.mktemp("fuzz") / f"d{suffix}"
    path.write_bytes(content)
    try:
        load_examples(str(path), DataConfig(data="x"))
    except SoftpromptError:
        pass


@FAST
@given(records=st.lists(st.dictionaries(st.sampled_from(["input", "target", "text", "messages",
                                                          "prompt", "completion", "x"]), JSON,
                                         max_size=4), min_size=1, max_size=4))  # fmt: skip
def test_any_json_records_give_examples_or_a_data_error(tmp_path_factory, records):
    path = tmp_path_factory.mktemp("fuzz") / "d.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    try:
        load_examples(str(path), DataConfig(data="x", template="q: {input} ?"))
    except SoftpromptError:
        pass


@pytest.fixture(scope="module")
def live(model_dirs, tmp_path_factory):
    loaded = load_model(model=str(model_dirs["llama"]))
    root = tmp_path_factory.mktemp("p")
    save_prompt(root / "short", random_prompt(0, 3), loaded.model, loaded.name,
                {"template": "review : {input} sentiment :"})  # fmt: skip
    cfg = ServeConfig(prompts=str(root), max_tokens=4, max_prompt_tokens=64, batch_wait_ms=1)
    app = create_app(loaded, cfg)
    app.state.softprompt.store.rescan()
    server = BackgroundServer(app)
    yield server.url
    server.stop()
    app.state.softprompt.batcher.close()


def _post(url: str, path: str, body: bytes) -> tuple[int, str]:
    req = urllib.request.Request(url + path, data=body, method="POST")
    req.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(req, timeout=60) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as err:
        return err.code, err.read().decode()


FIELDS = {
    "model": st.sampled_from(["base", "short", "nope", "../x", ""]) | JSON,
    "prompt": st.text(max_size=30) | st.lists(st.text(max_size=10), max_size=3) | JSON,
    "messages": st.lists(
        st.fixed_dictionaries(
            {
                "role": st.sampled_from(["user", "system", "assistant", "tool", ""]),
                "content": st.text(max_size=20) | JSON,
            }
        ),
        max_size=3,
    )
    | JSON,  # fmt: skip
    "max_tokens": st.integers(-2, 6) | JSON,
    "temperature": st.floats(allow_nan=False) | JSON,
    "top_p": st.floats(allow_nan=False) | JSON,
    "stop": st.text(max_size=3) | st.lists(st.text(max_size=3), max_size=5) | JSON,
    "stream": st.booleans() | JSON,
    "n": st.integers(0, 3),
    "fields": st.dictionaries(st.text(max_size=5), st.text(max_size=5), max_size=2) | JSON,
}


@settings(max_examples=80, deadline=None, suppress_health_check=list(HealthCheck))
@given(
    path=st.sampled_from(["/v1/completions", "/v1/chat/completions"]),
    body=st.fixed_dictionaries({}, optional=FIELDS),
)
def test_no_client_mistake_gets_a_5xx(live, path, body):
    if body.get("stream") is True:
        body["stream"] = False  # a stream reports errors inside a 200 response
    status, text = _post(live, path, json.dumps(body).encode())
    assert status < 500, text
    assert "Traceback" not in text
    if status != 200:
        assert json.loads(text)["error"]["message"]
    with urllib.request.urlopen(live + "/health", timeout=10) as resp:
        assert resp.status == 200
