"""Property-based tests (Hypothesis): whatever bytes a data file holds and whatever JSON a
client sends, softprompt answers with its own clear error, never a crash.

Every test is derandomized (the same examples on every run: a flaky test is a defect) and
bounded by its example count. The request fuzzer draws bodies from the server's own OpenAPI
schema (every route's body model), mixed with values the schema does not allow: tiny and
huge numbers, lone surrogates, wrong types, unknown roles."""

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

FAST = settings(max_examples=120, deadline=None, suppress_health_check=list(HealthCheck),
               derandomize=True, database=None)  # fmt: skip
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


@settings(max_examples=80, deadline=None, suppress_health_check=list(HealthCheck),
          derandomize=True, database=None)  # fmt: skip
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


# --- bodies drawn from the server's own OpenAPI schema ------------------------------------

SURROGATE = st.text(st.characters(categories=["Cs"]), min_size=1, max_size=2)
HOSTILE = (JSON | SURROGATE | st.sampled_from([1e-300, 5e-324, 1e300, -1, 0, 2**63, "bogus"])
           | st.text(max_size=5).map(lambda t: t + "\udc80"))  # fmt: skip


# Fields whose random strings would never be valid: the names the server knows, and one not.
NAMED = {
    "model": st.sampled_from(["short", "base", "nope"]),
    "type": st.sampled_from(["text", "image_url"]),
}


def from_schema(schema: dict, components: dict, depth: int = 0) -> st.SearchStrategy:
    """Values of a JSON schema (what pydantic wrote into the app's OpenAPI document)."""
    return _valid(schema, components, depth) if depth < 6 else JSON


@st.composite
def bodies(draw, schema: dict, components: dict):
    """A body of the schema; half of them with one value (anywhere in it, the body itself
    included) replaced by something the schema does not allow."""
    body = draw(from_schema(schema, components))
    if draw(st.booleans()):
        places = list(_places(body))
        path = draw(st.sampled_from(places))
        value = draw(HOSTILE)
        if not path:
            return value
        *parents, last = path
        holder = body
        for key in parents:
            holder = holder[key]
        holder[last] = value
    return body


def _places(value, path=()):
    yield path
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(
        value, list) else ()  # fmt: skip
    for key, inner in items:
        yield from _places(inner, (*path, key))


def _valid(schema: dict, components: dict, depth: int) -> st.SearchStrategy:
    if "$ref" in schema:
        return from_schema(components[schema["$ref"].rsplit("/", 1)[1]], components, depth + 1)
    if "anyOf" in schema:
        return st.one_of([from_schema(s, components, depth + 1) for s in schema["anyOf"]])
    if "enum" in schema:
        return st.sampled_from(schema["enum"])
    kind = schema.get("type")
    if kind == "object" and "properties" not in schema:  # a free mapping (``fields``)
        extra = schema.get("additionalProperties")
        values = from_schema(extra, components, depth + 1) if isinstance(extra, dict) else JSON
        return st.dictionaries(st.text(max_size=6), values, max_size=3)
    if kind == "object":
        props = {k: NAMED[k] if k in NAMED else from_schema(v, components, depth + 1)
                 for k, v in schema["properties"].items()}  # fmt: skip
        required = {k: props.pop(k) for k in schema.get("required", [])}
        return st.fixed_dictionaries(required, optional=props)
    if kind == "array":
        item = from_schema(schema.get("items", {}), components, depth + 1)
        return st.lists(item, min_size=schema.get("minItems", 0), max_size=3)
    lo, hi = schema.get("minimum"), schema.get("maximum")
    simple = {
        "string": st.sampled_from(["base", "short", "user", "text"]) | st.text(max_size=12),
        "integer": st.integers(int(lo) if lo is not None else -4, int(hi) if hi is not None else 6),
        "number": st.floats(lo if lo is not None else -1e9, hi if hi is not None else 1e9),
        "boolean": st.booleans(),
        "null": st.none(),
    }
    return simple.get(kind, JSON)


def _request_schemas(live_app) -> dict[str, tuple[dict, dict]]:
    doc = live_app.openapi()
    components = doc["components"]["schemas"]
    out = {}
    for path in ("/v1/completions", "/v1/chat/completions"):
        body = doc["paths"][path]["post"]["requestBody"]["content"]["application/json"]["schema"]
        out[path] = (body, components)
    return out


@pytest.fixture(scope="module")
def schema_live(model_dirs, tmp_path_factory):
    loaded = load_model(model=str(model_dirs["llama"]))
    root = tmp_path_factory.mktemp("p")
    save_prompt(root / "short", random_prompt(0, 3), loaded.model, loaded.name)
    cfg = ServeConfig(prompts=str(root), max_tokens=16, max_prompt_tokens=64, batch_wait_ms=1)
    app = create_app(loaded, cfg)
    app.state.softprompt.store.rescan()
    server = BackgroundServer(app)
    yield server.url, _request_schemas(app)
    server.stop()
    app.state.softprompt.batcher.close()


@settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck),
          derandomize=True, database=None)  # fmt: skip
@given(data=st.data(), path=st.sampled_from(["/v1/completions", "/v1/chat/completions"]))
def test_schema_driven_bodies_never_get_a_5xx_or_hang(schema_live, data, path):
    url, schemas = schema_live
    body = data.draw(bodies(*schemas[path]))
    status, text = _post(url, path, json.dumps(body).encode())  # a hang is its timeout
    assert status < 500, text
    assert "Traceback" not in text
    if status != 200:
        assert json.loads(text)["error"]["message"]
    elif isinstance(body, dict) and body.get("stream") is True:
        assert "data: [DONE]" in text and "server_error" not in text, text
    with urllib.request.urlopen(url + "/health", timeout=10) as resp:
        assert resp.status == 200
