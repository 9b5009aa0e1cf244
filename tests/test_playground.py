"""The playground page: served at / and /playground without the API key (it is static), and
the API calls its script makes (models, streamed completions for base and tuned) answer
what the page reads."""

from __future__ import annotations

import json
import urllib.error
import urllib.request

import pytest
from conftest import random_prompt

from softprompt.artifacts import save_prompt
from softprompt.config import GenerateConfig, ServeConfig
from softprompt.generation import generate
from softprompt.loading import load_model
from softprompt.serving.api import create_app
from softprompt.serving.server import BackgroundServer

KEY = "sekret"


@pytest.fixture(scope="module")
def served(model_dirs, tmp_path_factory):
    loaded = load_model(model=str(model_dirs["llama"]))
    root = tmp_path_factory.mktemp("prompts")
    prompt = random_prompt(4, 3)
    save_prompt(root / "sentiment", prompt, loaded.model, loaded.name,
                {"template": "review : {input} sentiment :"})  # fmt: skip
    app = create_app(loaded, ServeConfig(prompts=str(root), api_key=KEY))
    app.state.softprompt.store.rescan()
    background = BackgroundServer(app)
    yield {"url": background.url, "loaded": loaded, "prompt": prompt}
    background.stop()
    app.state.softprompt.batcher.close()


def _get(url: str, key: str | None = None, method: str = "GET", body: dict | None = None):
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, method=method)
    req.add_header("Content-Type", "application/json")
    if key:
        req.add_header("Authorization", f"Bearer {key}")
    try:
        with urllib.request.urlopen(req, timeout=60) as resp:
            return resp.status, resp.headers.get("content-type", ""), resp.read().decode()
    except urllib.error.HTTPError as err:
        return err.code, err.headers.get("content-type", ""), err.read().decode()


@pytest.mark.parametrize("path", ["/", "/playground"])
def test_page_is_served_without_the_key(served, path):
    status, kind, page = _get(served["url"] + path)
    assert status == 200 and kind.startswith("text/html")
    for piece in ('<select id="model"', '<textarea id="input"', 'id="base"', 'id="tuned"',
                  'fetch("/v1/models"', '"/v1/chat/completions" : "/v1/completions"',
                  "stream: true", '"Bearer " + key'):  # fmt: skip
        assert piece in page, piece
    assert _get(served["url"] + path, method="POST", body={})[0] == 401  # only the page is open
    assert _get(served["url"] + "/v1/models")[0] == 401  # the API still needs the key


def _stream_like_the_page(url: str, model: str, text: str) -> str:
    """What the page's script does: POST with stream, split the events at blank lines, read
    each chunk's text until [DONE]."""
    body = {"model": model, "prompt": text, "stream": True, "temperature": 0, "max_tokens": 6}
    status, kind, raw = _get(url + "/v1/completions", KEY, "POST", body)
    assert status == 200 and kind.startswith("text/event-stream")
    out = ""
    for event in raw.split("\n\n"):
        data = event.removeprefix("data: ")
        if data == "[DONE]":
            return out
        if data:
            out += json.loads(data)["choices"][0]["text"] or ""
    raise AssertionError("no [DONE]")


def test_what_the_page_calls(served):
    status, _, models = _get(served["url"] + "/v1/models", KEY)
    names = [m["id"] for m in json.loads(models)["data"] if m["id"] != "base"]
    assert status == 200 and names == ["sentiment"]
    text = "the movie was great"
    tuned = _stream_like_the_page(served["url"], "sentiment", text)
    base = _stream_like_the_page(served["url"], "base", text)
    cfg = GenerateConfig(max_new_tokens=6)
    loaded = served["loaded"]
    want = generate(loaded, [text], served["prompt"], cfg, template="review : {input} sentiment :")
    assert tuned.lstrip() == want[0]
    assert base.lstrip() == generate(loaded, [text], None, cfg)[0]


def test_page_in_a_headless_browser(served, tmp_path):
    """Debian's chromium driven by Playwright (its executable path; no browser download):
    type the key and an input, submit, and both answers stream in, equal to generate's."""
    import shutil

    sync_api = pytest.importorskip("playwright.sync_api")
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        pytest.skip("no chromium on this machine (apt-get install chromium)")
    text = "the movie was great"
    cfg = GenerateConfig(max_new_tokens=32)
    loaded = served["loaded"]
    tuned = generate(loaded, [text], served["prompt"], cfg, template="review : {input} sentiment :")
    base = generate(loaded, [text], None, cfg)
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
        page = browser.new_page()
        page.goto(served["url"] + "/")
        page.fill("#key", KEY)
        page.dispatch_event("#key", "change")
        page.wait_for_function("document.querySelector('#model').options.length > 0")
        assert page.eval_on_selector("#model", "s => s.value") == "sentiment"
        page.fill("#input", text)
        page.click("#run")
        page.wait_for_function("document.querySelector('#status').textContent === 'done'")
        shown_base, shown_tuned = page.inner_text("#base"), page.inner_text("#tuned")
        page.screenshot(path=str(tmp_path / "playground.png"), full_page=True)
        browser.close()
    assert shown_tuned.strip() == tuned[0].strip() and shown_base.strip() == base[0].strip()
    assert (tmp_path / "playground.png").stat().st_size > 10_000
