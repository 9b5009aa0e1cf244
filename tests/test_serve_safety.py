"""Issue 23, cases 4-8: the server never falls over for one folder or one request: damaged
prompt folders are skipped and listed, chat templates run with limits, a client's mistakes
are 4xx, numeric flags are checked, /health tells the truth and says little to strangers,
chunked bodies are counted, and a stream whose client hangs up stops generating."""

from __future__ import annotations

import http.client
import json
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

import pytest
import torch
from conftest import random_prompt
from safetensors.torch import save_file

import softprompt.chat_sandbox as sandbox
from softprompt.artifacts import save_prompt
from softprompt.chat_sandbox import TemplateLimit, render_chat_template
from softprompt.config import ServeConfig
from softprompt.errors import ConfigError
from softprompt.loading import load_model
from softprompt.serving.api import create_app
from softprompt.serving.batcher import Batcher, Job
from softprompt.serving.server import BackgroundServer

HEADERS = {"Authorization": "Bearer k", "Content-Type": "application/json"}
BOMBS = {
    "huge": "{{ 'x' * 120000000 }}",
    "loops": "{% for a in range(100000) %}{% for b in range(100000) %}ab{% endfor %}{% endfor %}",
    "width": "{{ 'x'.ljust(100000000) }}",
    "filter": "{{ ('\\n' * 1000) | indent(1000000) }}",
    "doubling": "{% set ns = namespace(s='xx') %}{% for i in range(64) %}{% set ns.s = ns.s + "
    "ns.s %}{% endfor %}{{ ns.s }}",
}


def _request(url, path, body=None, key=None, method=None):
    data = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
    req = urllib.request.Request(url + path, data=data, method=method or ("POST" if data is
                                 not None else "GET"))  # fmt: skip
    req.add_header("Content-Type", "application/json")
    if key:
        req.add_header("Authorization", f"Bearer {key}")
    try:
        with urllib.request.urlopen(req, timeout=60) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


# --- 4. damaged prompt folders ------------------------------------------------------------


def _damage(root, loaded):
    for name in ("good", "deep", "metadir", "tmpl5", "empty", "nan", "long", "bomb"):
        n = 5000 if name == "long" else 3
        save_prompt(root / name, random_prompt(0, n), loaded.model, loaded.name)
    (root / "deep" / "softprompt.json").write_text("[" * 100_000 + "]" * 100_000)
    (root / "metadir" / "softprompt.json").unlink()
    (root / "metadir" / "softprompt.json").mkdir()
    meta = json.loads((root / "tmpl5" / "softprompt.json").read_text())
    meta["prompt_format"] = {"template": 5}
    (root / "tmpl5" / "softprompt.json").write_text(json.dumps(meta))
    save_file({"prompt_embeddings": torch.zeros(0, 16)}, str(root / "empty" /
              "adapter_model.safetensors"))  # fmt: skip
    rows = torch.randn(3, 16)
    rows[1, 2] = float("nan")
    save_file({"prompt_embeddings": rows}, str(root / "nan" / "adapter_model.safetensors"))
    meta = json.loads((root / "bomb" / "softprompt.json").read_text())
    meta["prompt_format"] = {"chat": True, "chat_template": BOMBS["huge"]}
    (root / "bomb" / "softprompt.json").write_text(json.dumps(meta))
    return sorted(p.name for p in root.iterdir() if p.name != "good")


@pytest.fixture(scope="module")
def damaged(model_dirs, tmp_path_factory):
    loaded = load_model(model=str(model_dirs["llama"]))
    root = tmp_path_factory.mktemp("damaged")
    bad = _damage(root, loaded)
    app = create_app(loaded, ServeConfig(prompts=str(root), max_prompt_tokens=256))
    report = app.state.softprompt.store.rescan()
    server = BackgroundServer(app)
    yield server.url, root, report, bad
    server.stop()
    app.state.softprompt.batcher.close()


def test_damaged_folders_are_skipped_at_start(damaged):
    url, root, report, bad = damaged
    assert report["added"] == ["good"]
    assert sorted(report["errors"]) == bad
    status, health = _request(url, "/health")
    assert status == 200 and sorted(health["skipped"]) == bad
    assert str(root) not in json.dumps(health)
    assert "5000 virtual tokens" in health["skipped"]["long"]
    assert "not finite" in health["skipped"]["nan"] and "empty" in health["skipped"]["empty"]


def test_damaged_folders_answer_4xx_without_paths(damaged):
    url, root, _, bad = damaged
    for name in bad:
        status, answer = _request(url, f"/v1/prompts/{name}", b"")
        assert 400 <= status < 500, (name, answer)
        assert str(root) not in json.dumps(answer) and str(root.parent) not in json.dumps(answer)
    status, answer = _request(url, "/v1/rescan", b"")
    assert status == 200 and sorted(answer["errors"]) == bad


def test_a_removed_prompts_folder_then_rescan_is_4xx(model_dirs, tmp_path):
    loaded = load_model(model=str(model_dirs["llama"]))
    root = tmp_path / "prompts"
    save_prompt(root / "good", random_prompt(0, 3), loaded.model, loaded.name)
    app = create_app(loaded, ServeConfig(prompts=str(root)))
    app.state.softprompt.store.rescan()
    shutil.rmtree(root)
    server = BackgroundServer(app)
    try:
        status, answer = _request(server.url, "/v1/rescan", b"")
    finally:
        server.stop()
        app.state.softprompt.batcher.close()
    assert status == 409 and str(tmp_path) not in json.dumps(answer)


# --- 5. chat templates with limits ---------------------------------------------------------


@pytest.mark.parametrize("name", sorted(BOMBS))
def test_bomb_templates_stop_at_a_limit(name):
    with pytest.raises(TemplateLimit):
        render_chat_template(BOMBS[name], messages=[])


def test_a_template_that_loops_without_output_stops_in_time(monkeypatch):
    monkeypatch.setattr(sandbox, "MAX_SECONDS", 0.2)
    spin = "{% for a in 'x' * 100000 %}{% for b in 'x' * 100000 %}{% endfor %}{% endfor %}"
    with pytest.raises(TemplateLimit, match="ran for more than"):
        render_chat_template(spin, messages=[])


def test_the_sandbox_renders_what_transformers_renders(chat_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(chat_dir))
    msgs = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"},
            {"role": "assistant", "content": "hello"}]  # fmt: skip
    for generate in (False, True):
        want = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=generate)
        got = render_chat_template(tok.chat_template, messages=msgs, add_generation_prompt=generate,
                                   **sandbox.tokenizer_variables(tok))  # fmt: skip
        assert got == want


def test_the_sandboxed_range_acts_as_range():
    got = render_chat_template("{{ range(3)|list }} {{ range(3)|length }} "
                               "{% for i in range(1, 4)|reverse %}{{ i }}{% endfor %}")  # fmt: skip
    assert got == "[0, 1, 2] 3 321"


def test_the_sandbox_keeps_python_out():
    with pytest.raises(Exception, match="unsafe|not safely|access"):
        render_chat_template("{{ messages.__class__.__mro__ }}", messages=[])
    with pytest.raises(Exception, match="unsafe|immutable|modify"):
        render_chat_template("{{ messages.append(1) }}", messages=[])


# --- 6. client mistakes are 4xx --------------------------------------------------------------


@pytest.fixture(scope="module")
def live(model_dirs, tmp_path_factory):
    loaded = load_model(model=str(model_dirs["llama"]))
    root = tmp_path_factory.mktemp("live")
    save_prompt(root / "short", random_prompt(0, 3), loaded.model, loaded.name)
    cfg = ServeConfig(prompts=str(root), api_key="k", max_request_bytes=4096, max_tokens=480)
    app = create_app(loaded, cfg)
    app.state.softprompt.store.rescan()
    server = BackgroundServer(app)
    yield server.url, app
    server.stop()
    app.state.softprompt.batcher.close()


@pytest.mark.parametrize(
    "path, body",
    [
        ("/v1/completions", {"model": "short", "prompt": "good", "temperature": 1e-300}),
        ("/v1/completions", b'{"model": "short", "prompt": "bad \\udc80 text"}'),
        ("/v1/chat/completions", {"model": "base", "messages": [
            {"role": "user", "content": [{"type": "text", "text": 5}]}]}),
        ("/v1/chat/completions", {"model": "base", "messages": [
            {"role": "bogus", "content": "hi"}]}),
        ("/v1/completions", b"[" * 2000 + b"]" * 2000),
    ],
)  # fmt: skip
def test_client_mistakes_are_4xx(live, path, body):
    url, _ = live
    status, answer = _request(url, path, body, key="k")
    assert 400 <= status < 500, answer
    assert answer["error"]["message"]


# --- 7. numeric flags, a dead batcher, SIGTERM -----------------------------------------------


@pytest.mark.parametrize("value", [float("nan"), float("inf"), 1e300, -1.0])
def test_batch_wait_ms_must_be_finite_and_in_range(value):
    with pytest.raises(ConfigError, match="batch.wait.ms"):
        ServeConfig(prompts="p", batch_wait_ms=value)


def test_health_reports_a_dead_batcher(model_dirs, tmp_path, monkeypatch):
    loaded = load_model(model=str(model_dirs["llama"]))
    monkeypatch.setattr(Batcher, "_next_batch", lambda self: 1 / 0)  # the worker dies at once
    app = create_app(loaded, ServeConfig(prompts=str(tmp_path)))
    batcher = app.state.softprompt.batcher
    server = BackgroundServer(app)
    try:
        batcher._thread.join(timeout=60)
        status, health = _request(server.url, "/health")
        body = {"model": "base", "prompt": "good", "max_tokens": 2}
        code, _ = _request(server.url, "/v1/completions", body)
    finally:
        server.stop()
        batcher.close()
    assert status == 503 and "stopped" in health["status"]
    assert code == 503


def test_sigterm_stops_serve(tiny_dir, tmp_path):
    (tmp_path / "p").mkdir()
    with socket.socket() as probe:  # a free port, so the test can see the server listen
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    proc = subprocess.Popen(
        [sys.executable, "-m", "softprompt", "serve", "--model", str(tiny_dir), "--prompts",
         str(tmp_path / "p"), "--port", str(port), "--batch-wait-ms", "1"],
        stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        for _ in range(3000):  # until it accepts connections (its signal handlers are set)
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                assert proc.poll() is None, "serve ended before it listened"
                time.sleep(0.02)
        proc.send_signal(signal.SIGTERM)
        # uvicorn shuts down, then re-raises the signal for the process manager to see
        assert proc.wait(timeout=60) in (0, -signal.SIGTERM)
    finally:
        proc.kill()


# --- 8. /health for strangers, chunked bodies, hung-up streams ---------------------------------


def test_health_without_the_key_says_only_ok_and_counts(live):
    url, _ = live
    status, health = _request(url, "/health")
    assert status == 200 and set(health) == {"status", "prompts", "skipped", "queue_length"}
    assert isinstance(health["skipped"], int)
    status, health = _request(url, "/health", key="k")
    assert "base_model" in health and isinstance(health["skipped"], dict)


def test_a_chunked_body_over_the_limit_is_413(live):
    url, _ = live
    host, port = url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=60)
    chunks = (b'{"model": "base", "prompt": "' + b"x" * 1000 for _ in range(3000))
    conn.request("POST", "/v1/completions", body=chunks, encode_chunked=True,
                 headers=HEADERS)  # fmt: skip
    resp = conn.getresponse()
    assert resp.status == 413 and "4096 bytes" in json.loads(resp.read())["error"]["message"]
    conn.close()


def test_a_stream_whose_client_hangs_up_stops_generating(live, monkeypatch):
    url, app = live
    batcher, jobs, hung_up = app.state.softprompt.batcher, [], threading.Event()
    submit, push = batcher.submit, Job.push

    def capture(rows):
        jobs.extend(rows)
        return submit(rows)

    def held(self, token, eos):  # after two tokens, wait until the client is gone
        push(self, token, eos)
        if len(self.tokens) == 2:
            hung_up.wait(60)
            for _ in range(6000):
                if self.cancelled:
                    break
                time.sleep(0.01)

    monkeypatch.setattr(batcher, "submit", capture)
    monkeypatch.setattr(Job, "push", held)
    host, port = url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=60)
    body = {"model": "short", "prompt": "good", "max_tokens": 400, "stream": True,
            "temperature": 0, "stop": []}  # fmt: skip
    conn.request("POST", "/v1/completions", body=json.dumps(body),
                 headers=HEADERS)  # fmt: skip
    resp = conn.getresponse()
    assert resp.status == 200
    resp.fp.read1(64)  # the first bytes
    conn.sock.close()
    conn.close()
    hung_up.set()
    for _ in range(6000):  # until the batch has ended (bounded; not a timing assertion)
        if jobs and jobs[0].finish_reason is not None and batcher.queue_length() == 0:
            break
        time.sleep(0.01)
    assert jobs[0].finish_reason == "cancelled"
    assert len(jobs[0].tokens) < 400
