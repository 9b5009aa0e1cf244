"""Safe by default: a user's files are never removed, full disks and bad files end in one
clear line, prompt folders from elsewhere are checked, lengths are checked against the
model, and the server keeps strangers and oversized requests out."""

from __future__ import annotations

import json
import subprocess
import urllib.request
from contextlib import contextmanager

import openai
import pytest
import torch
from conftest import interrupted_at, random_prompt, train_config
from safetensors.torch import load_file

from softprompt.artifacts import load_prompt, save_prompt
from softprompt.cli import main
from softprompt.config import DataConfig, GenerateConfig, ServeConfig
from softprompt.data import load_examples
from softprompt.errors import ArtifactError, ConfigError, DataError
from softprompt.generation import generate
from softprompt.loading import load_model
from softprompt.outputs import MARKER
from softprompt.serving.api import create_app
from softprompt.serving.registry import base_model_of
from softprompt.serving.server import BackgroundServer
from softprompt.training import train


def _train_args(model, data, out, *extra) -> list[str]:
    return ["train", "--model", str(model), "--data", str(data), "--input-field", "review",
            "--target-field", "label", "--num-virtual-tokens", "4", "--batch-size", "3",
            "--output", str(out), *extra]  # fmt: skip


def _one_line_error(capsys) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = [x for x in err.strip().splitlines() if x.startswith("softprompt: error:")]
    assert len(lines) == 1, err
    return lines[0]


# --- 1. a user's files are never removed -------------------------------------------------


def test_overwrite_never_removes_files_softprompt_did_not_write(tiny_dir, pairs_file, tmp_path,
                                                                capsys):  # fmt: skip
    proj = tmp_path / "proj"
    (proj / "src").mkdir(parents=True)
    (proj / "README").write_text("keep")
    (proj / "metrics.jsonl").write_text("{}\n")
    code = main(_train_args(tiny_dir, pairs_file, proj, "--max-steps", "1", "--overwrite"))
    assert code == 2
    line = _one_line_error(capsys)
    assert "holds files softprompt did not write (README, metrics.jsonl, src)" in line
    assert sorted(p.name for p in proj.iterdir()) == ["README", "metrics.jsonl", "src"]


def test_output_dot_and_overwrite_of_its_own_run(tiny_dir, pairs_file, tmp_path, monkeypatch):
    """`--output .` in an empty folder works; --overwrite then replaces the run's files and
    keeps a file the user put there afterwards."""
    run = tmp_path / "run"
    run.mkdir()
    monkeypatch.chdir(run)
    assert main(_train_args(tiny_dir, pairs_file, ".", "--max-steps", "1")) == 0
    (run / "notes.txt").write_text("mine")
    assert main(_train_args(tiny_dir, pairs_file, ".", "--max-steps", "2", "--overwrite")) == 0
    assert (run / "notes.txt").read_text() == "mine"
    assert json.loads((run / "softprompt.json").read_text())["metrics"]["steps"] == 2
    assert "notes.txt" not in json.loads((run / MARKER).read_text())["entries"]


@pytest.mark.parametrize("command", ["compare", "sweep", "eval"])
def test_other_outputs_refuse_foreign_folders(tiny_dir, pairs_file, tmp_path, capsys, command):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "thesis.tex").write_text("keep")
    args = {
        "compare": ["compare", "--test", str(pairs_file), "--steps", "1", "--overwrite"],
        "sweep": ["sweep", "--steps", "1", "--overwrite"],
        "eval": ["eval"],
    }[command]
    code = main([*args, "--model", str(tiny_dir), "--data", str(pairs_file), "--input-field",
                 "review", "--target-field", "label", "--output", str(out)])  # fmt: skip
    assert code == 2 and "did not write (thesis.tex)" in _one_line_error(capsys)
    assert [p.name for p in out.iterdir()] == ["thesis.tex"]


# --- 2. a full disk, a torn metrics line ------------------------------------------------


@contextmanager
def _small_disk(path, size: str = "4m"):
    path.mkdir()
    try:
        subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                       check=True, capture_output=True)  # fmt: skip
    except (OSError, subprocess.CalledProcessError) as err:
        pytest.skip(f"cannot mount a small tmpfs here to fill ({err}); needs root")
    try:
        yield path
    finally:  # lazily: a file still mapped by a test must not keep the mount
        subprocess.run(["umount", "-l", str(path)], check=False)


def test_full_disk_ends_the_run_in_one_line_and_resumes(tiny_dir, pairs_file, tmp_path, capsys):
    """The disk fills mid-run: one line, no traceback, no temporary files; after space is
    freed --resume ends with the prompt of an uninterrupted run."""
    args = ["--epochs", "3", "--save-every", "2"]
    assert main(_train_args(tiny_dir, pairs_file, tmp_path / "ref", *args)) == 0
    ref = load_file(str(tmp_path / "ref" / "adapter_model.safetensors"))["prompt_embeddings"]
    with _small_disk(tmp_path / "disk") as disk:
        out = disk / "run"
        filler = disk / "filler"

        def fill():  # at step 5 the disk fills up (what a long run meets at some point)
            with open(filler, "wb") as fh:
                try:
                    while True:
                        fh.write(b"\0" * 65536)
                except OSError:
                    pass

        step = __import__("softprompt.kinds.causal", fromlist=["x"])
        real, calls = step.lm_loss, {"n": 0}

        def filling(*a, **k):
            calls["n"] += 1
            if calls["n"] == 5:
                fill()
            return real(*a, **k)

        step.lm_loss = filling
        try:
            assert main(_train_args(tiny_dir, pairs_file, out, *args)) == 2
        finally:
            step.lm_loss = real
        assert "the disk is full" in _one_line_error(capsys)
        leftovers = [p.name for p in out.rglob("*") if ".tmp" in p.name]
        assert leftovers == []
        filler.unlink()
        assert main(_train_args(tiny_dir, pairs_file, out, *args, "--resume")) == 0
        got = load_file(str(out / "adapter_model.safetensors"))["prompt_embeddings"].clone()
    torch.testing.assert_close(got, ref)


def test_resume_trims_a_torn_metrics_line(tiny_dir, pairs_file, tmp_path, capsys):
    train(train_config(tiny_dir, pairs_file, tmp_path / "ref", epochs=3), progress=False)
    cut = tmp_path / "cut"
    with interrupted_at(5):
        train(train_config(tiny_dir, pairs_file, cut, epochs=3, save_every=2), progress=False)
    with (cut / "metrics.jsonl").open("a") as fh:
        fh.write('{"kind": "train", "step": 5, "lo')  # the write a full disk cut short
    cfg = train_config(tiny_dir, pairs_file, cut, epochs=3, save_every=2, resume=True)
    train(cfg, progress=False)
    assert "the last line is cut off" in capsys.readouterr().err
    for name in ("ref", "cut"):
        assert load_file(str(tmp_path / name / "adapter_model.safetensors"))
    torch.testing.assert_close(
        load_file(str(cut / "adapter_model.safetensors"))["prompt_embeddings"],
        load_file(str(tmp_path / "ref" / "adapter_model.safetensors"))["prompt_embeddings"],
    )
    lines = (cut / "metrics.jsonl").read_text().splitlines()
    assert all(json.loads(x) for x in lines)


# --- 3. file-system errors --------------------------------------------------------------


def test_output_that_is_a_file_or_read_only(tiny_dir, pairs_file, tmp_path, capsys):
    afile = tmp_path / "f"
    afile.write_text("x")
    assert main(_train_args(tiny_dir, pairs_file, afile)) == 2
    assert "is a file" in _one_line_error(capsys)
    with _small_disk(tmp_path / "ro", "1m") as ro:
        subprocess.run(["mount", "-o", "remount,ro", str(ro)], check=True)
        assert main(_train_args(tiny_dir, pairs_file, ro / "run")) == 2
        captured = capsys.readouterr().err
    assert "cannot write in --output" in captured and "Traceback" not in captured
    assert "loaded" not in captured  # refused before the model was loaded


@pytest.mark.parametrize("encoding", ["utf-16", "utf-32", "utf-8-sig"])
def test_data_files_are_decoded_by_their_bom(tmp_path, encoding):
    path = tmp_path / "d.jsonl"
    path.write_text('{"input": "café", "target": "ok"}\n', encoding=encoding)
    (ex,) = load_examples(str(path), DataConfig(data="x"))
    assert ex.source == "café"


def test_binary_or_latin1_data_is_one_line(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_bytes(b'{"input": "caf\xe9", "target": "x"}\n')
    with pytest.raises(DataError, match=r"d.jsonl: not readable as utf-8 text .*save it as UTF-8"):
        load_examples(str(path), DataConfig(data="x"))


# --- 4. lengths the model cannot hold -----------------------------------------------------


def test_lengths_are_checked_against_the_model(model_dirs, pairs_file, tmp_path, capsys):
    gpt2 = load_model(model=str(model_dirs["gpt2"]))  # 512 positions
    out = generate(gpt2, ["good " * 100_000], random_prompt(0, 3), GenerateConfig(max_new_tokens=3))
    assert isinstance(out[0], str)
    assert "lost their start" in capsys.readouterr().err
    cfg = train_config(model_dirs["gpt2"], pairs_file, tmp_path / "r", max_length=200_000,
                       max_steps=1)  # fmt: skip
    with pytest.raises(ConfigError, match="longer than the 512 positions"):
        train(cfg, progress=False)


# --- 5. --init DIR and --num-virtual-tokens --------------------------------------------


def test_init_folder_of_another_length_is_refused(tiny_dir, pairs_file, tmp_path):
    train(train_config(tiny_dir, pairs_file, tmp_path / "a", max_steps=1), progress=False)
    cfg = train_config(tiny_dir, pairs_file, tmp_path / "b", max_steps=1, init=str(tmp_path / "a"))
    cfg.prompt.num_virtual_tokens = 8
    with pytest.raises(
        ConfigError, match="holds a prompt of 4 virtual tokens.*num_virtual_tokens=4"
    ):
        train(cfg, progress=False)


# --- 6. labels that are not text -----------------------------------------------------------


def test_number_labels_warn_once_and_list_labels_fail(tmp_path, capsys):
    path = tmp_path / "d.jsonl"
    path.write_text('{"input": "a", "target": 1}\n{"input": "b", "target": 0}\n')
    examples = load_examples(str(path), DataConfig(data="x"))
    assert [ex.target for ex in examples] == ["1", "0"]
    assert capsys.readouterr().err.count("holds numbers") == 1
    path.write_text('{"input": "a", "target": "x"}\n{"input": "b", "target": ["p", "x"]}\n')
    with pytest.raises(DataError, match=r"d.jsonl:2: field 'target' holds a list"):
        load_examples(str(path), DataConfig(data="x"))


# --- 7/8. prompt folders from elsewhere ------------------------------------------------


@pytest.fixture
def prompt_folders(tiny_dir, tmp_path):
    loaded = load_model(model=str(tiny_dir))
    root = tmp_path / "prompts"
    for name in ("good", "list", "shape", "peft", "attr", "spec"):
        save_prompt(root / name, random_prompt(0, 3), loaded.model, loaded.name)
    (root / "list" / "softprompt.json").write_text("[1, 2]")
    meta = json.loads((root / "shape" / "softprompt.json").read_text())
    (root / "shape" / "softprompt.json").write_text(json.dumps({**meta, "base_model": "llama"}))
    (root / "peft" / "adapter_config.json").write_text('{"num_virtual_tokens": "many"}')
    for name, template in (("attr", "{input.__init__.__globals__}"), ("spec", "{input:.>1000000}")):
        meta = json.loads((root / name / "softprompt.json").read_text())
        (root / name / "softprompt.json").write_text(json.dumps({**meta, "template": template}))
    return loaded, root


def test_bad_prompt_folders_are_one_clear_error(prompt_folders, capsys):
    loaded, root = prompt_folders
    expected = {"list": "not an object", "shape": "base_model", "peft": "num_virtual_tokens",
                "attr": "only plain names", "spec": "only plain names"}  # fmt: skip
    for name, words in expected.items():
        with pytest.raises(ArtifactError, match=words):
            load_prompt(root / name, loaded.model)
        assert (
            main(["generate", "--prompt", str(root / name), "--model", str(loaded.name), "x"]) == 2
        )
        assert words in _one_line_error(capsys)


def test_server_skips_bad_folders_and_serves_the_rest(prompt_folders):
    loaded, root = prompt_folders
    assert base_model_of(root) == loaded.name  # without --model: the damaged folders are passed
    app = create_app(loaded, ServeConfig(prompts=str(root)))
    report = app.state.softprompt.store.rescan()
    assert report["added"] == ["good"]
    server = BackgroundServer(app)
    try:
        with urllib.request.urlopen(server.url + "/health", timeout=10) as resp:
            health = json.loads(resp.read())
        req = urllib.request.Request(server.url + "/v1/rescan", method="POST")
        with urllib.request.urlopen(req, timeout=10) as resp:
            assert resp.status == 200
    finally:
        server.stop()
        app.state.softprompt.batcher.close()
    assert sorted(health["skipped"]) == ["attr", "list", "peft", "shape", "spec"]
    assert str(root) not in json.dumps(health)  # no server paths in answers


# --- 9/10/11. the server under abuse ---------------------------------------------------


@pytest.fixture(scope="module")
def guarded(model_dirs, tmp_path_factory):
    loaded = load_model(model=str(model_dirs["llama"]))
    root = tmp_path_factory.mktemp("p")
    save_prompt(root / "short", random_prompt(0, 3), loaded.model, loaded.name)
    cfg = ServeConfig(prompts=str(root), api_key="sekret", no_admin=True,
                      max_request_bytes=4096, max_prompt_tokens=64)  # fmt: skip
    app = create_app(loaded, cfg)
    app.state.softprompt.store.rescan()
    server = BackgroundServer(app)
    yield server.url
    server.stop()
    app.state.softprompt.batcher.close()


def _post(url, path, body: bytes, key: str | None = "sekret", method: str = "POST"):
    req = urllib.request.Request(url + path, data=body, method=method)
    req.add_header("Content-Type", "application/json")
    if key:
        req.add_header("Authorization", f"Bearer {key}")
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def test_api_key_is_required_except_for_health(guarded):
    body = json.dumps({"model": "short", "prompt": "good", "max_tokens": 2}).encode()
    for key in (None, "wrong"):
        status, answer = _post(guarded, "/v1/completions", body, key)
        assert status == 401 and answer["error"]["type"] == "invalid_request_error"
    client = openai.OpenAI(base_url=f"{guarded}/v1", api_key="sekret", max_retries=0)
    assert client.completions.create(model="short", prompt="good", max_tokens=2).choices
    with urllib.request.urlopen(guarded + "/health", timeout=10) as resp:
        assert resp.status == 200
    assert _post(guarded, "/v1/rescan", b"")[0] == 404  # --no-admin


def test_oversized_bodies_and_inputs_are_refused_early(guarded):
    status, answer = _post(guarded, "/v1/completions", b"x" * 10_000)
    assert status == 413 and "4096 bytes" in answer["error"]["message"]
    body = json.dumps({"model": "base", "prompt": "good " * 600, "max_tokens": 2}).encode()
    status, answer = _post(guarded, "/v1/completions", body[:4000] + b'"}')
    assert status == 400
    body = json.dumps({"model": "base", "prompt": "x" * 3000}).encode()
    status, answer = _post(guarded, "/v1/completions", body)
    assert status == 400 and "characters" in answer["error"]["message"]
    body = b'{"model": "base", "prompt": "good", "temperature": NaN}'
    status, answer = _post(guarded, "/v1/completions", body)
    assert status == 400 and "finite" in answer["error"]["message"]


def test_open_hosts_need_a_key_or_insecure(monkeypatch):
    monkeypatch.delenv("SOFTPROMPT_API_KEY", raising=False)
    with pytest.raises(ConfigError, match="api_key=KEY.*insecure=True"):
        ServeConfig(prompts="p", host="0.0.0.0")
    assert ServeConfig(prompts="p", host="0.0.0.0", insecure=True).api_key is None
    monkeypatch.setenv("SOFTPROMPT_API_KEY", "k")
    assert ServeConfig(prompts="p", host="0.0.0.0").api_key == "k"


def test_serve_without_its_extra_names_it(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(__import__("sys").modules, "softprompt.serving", None)
    assert main(["serve", "--prompts", str(tmp_path)]) == 2
    assert "pip install 'softprompt[serve]'" in _one_line_error(capsys)
