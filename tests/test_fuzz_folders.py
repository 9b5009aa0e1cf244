"""Fuzzing what lies on disk (Hypothesis, derandomized and bounded by its example count):
random and hostile prompt folders (nested JSON, wrong types, folders in place of files,
links out of the folder, NaN/inf/huge/empty tensors, bomb chat templates) and output
markers. Whatever they hold: serve starts, the good folder is served, every bad one is listed
as skipped, and no file outside the output folder is ever touched."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest
import torch
from conftest import random_prompt
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file
from test_fuzz import JSON

from softprompt.artifacts import save_prompt
from softprompt.config import ServeConfig
from softprompt.errors import ConfigError
from softprompt.loading import load_model
from softprompt.outputs import FORMAT, KINDS, MARKER, claim_output
from softprompt.serving.api import create_app

BOUNDED = settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck),
                   derandomize=True, database=None)  # fmt: skip
DEEP = "[" * 50_000 + "]" * 50_000
BOMBS = ["{{ 'x' * 120000000 }}", "{% for a in range(100000) %}{% for b in range(100000) %}"
         "ab{% endfor %}{% endfor %}", "{{ 'x'.center(999999999) }}", "{% if %}"]  # fmt: skip
TENSORS = {
    "nan": lambda: torch.full((3, 16), float("nan")),
    "inf": lambda: torch.full((3, 16), float("inf")),
    "huge": lambda: torch.full((3, 16), 3e38),
    "empty": lambda: torch.zeros(0, 16),
    "3d": lambda: torch.zeros(2, 3, 16),
    "wide": lambda: torch.zeros(3, 17),
    "long": lambda: torch.randn(5000, 16),
    "ints": lambda: torch.ones(3, 16, dtype=torch.int64),
}
META_KEYS = ["template", "prompt_format", "base_model", "num_virtual_tokens", "data", "task"]
FORMAT_KEYS = ["template", "chat", "chat_template", "position", "system", "input_field", "x"]
DAMAGE = st.one_of(
    st.tuples(st.just("json"), st.sampled_from(["softprompt.json", "adapter_config.json"]),
              JSON | st.just(DEEP) | st.binary(max_size=20)),
    st.tuples(st.just("meta"), st.sampled_from(META_KEYS), JSON),
    st.tuples(st.just("format"), st.sampled_from(FORMAT_KEYS), JSON | st.sampled_from(BOMBS)),
    st.tuples(st.just("bomb"), st.sampled_from(BOMBS), st.booleans()),
    st.tuples(st.just("folder"), st.sampled_from(["softprompt.json", "adapter_config.json",
                                                  "adapter_model.safetensors"]), st.none()),
    st.tuples(st.just("link"), st.sampled_from(["softprompt.json", "adapter_model.safetensors",
                                                "."]), st.none()),
    st.tuples(st.just("tensor"), st.sampled_from(sorted(TENSORS)), st.none()),
    st.tuples(st.just("weights"), st.binary(max_size=64), st.none()),
)  # fmt: skip


def _snapshot(root: Path) -> dict[str, str]:
    """Every path under ``root`` with a hash of its content (links: their target)."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = Path(dirpath, name)
            if path.is_symlink():
                out[str(path)] = "->" + os.readlink(path)
            elif path.is_file():
                out[str(path)] = hashlib.sha256(path.read_bytes()).hexdigest()
            else:
                out[str(path)] = "dir"
    return out


def _outside(root: Path) -> Path:
    outside = root / "outside"
    (outside / "docs").mkdir(parents=True)
    (outside / "secret.json").write_text('{"prompt_format": {"template": "secret"}}')
    (outside / "docs" / "thesis.tex").write_text("keep")
    (outside / "metrics.jsonl").write_text("{}\n")
    return outside


def _damage(folder: Path, damage: tuple, outside: Path) -> None:
    kind, what, value = damage
    if kind == "json":
        text = value.decode("latin-1") if isinstance(value, bytes) else (
            value if value == DEEP else json.dumps(value))  # fmt: skip
        (folder / what).write_text(text)
    elif kind in ("meta", "format", "bomb"):
        meta = json.loads((folder / "softprompt.json").read_text())
        if kind == "meta":
            meta[what] = value
        elif kind == "format":
            meta["prompt_format"] = {"chat": True, what: value}
        else:
            meta["prompt_format"] = {"chat": value, "chat_template": what}
        (folder / "softprompt.json").write_text(json.dumps(meta))
    elif kind == "folder":
        (folder / what).unlink()
        (folder / what).mkdir()
    elif kind == "link":
        target = outside / ("secret.json" if what != "." else "docs")
        path = folder / what if what != "." else folder
        if what == ".":
            for p in folder.iterdir():
                p.unlink()
            folder.rmdir()
        else:
            path.unlink()
        path.symlink_to(target)
    elif kind == "tensor":
        save_file({"prompt_embeddings": TENSORS[what]()}, str(folder / "adapter_model.safetensors"))
    else:
        (folder / "adapter_model.safetensors").write_bytes(what)


@pytest.fixture(scope="module")
def llama(model_dirs):
    return load_model(model=str(model_dirs["llama"]))


@BOUNDED
@given(damages=st.lists(DAMAGE, min_size=1, max_size=3))
def test_serve_starts_whatever_the_prompt_folders_hold(llama, tmp_path_factory, damages):
    root = tmp_path_factory.mktemp("fuzz")
    outside, prompts = _outside(root), root / "prompts"
    before = _snapshot(outside)
    for i, damage in enumerate(["good", *damages]):
        save_prompt(prompts / f"f{i}", random_prompt(i, 3), llama.model, llama.name)
        if damage != "good":
            _damage(prompts / f"f{i}", damage, outside)
    app = create_app(llama, ServeConfig(prompts=str(prompts), max_prompt_tokens=256))
    try:
        report = app.state.softprompt.store.rescan()
        skipped = app.state.softprompt.store.skipped()
    finally:
        app.state.softprompt.batcher.close()
    assert "f0" in report["added"]
    assert set(report["errors"]) == set(skipped)
    for name in report["errors"]:
        assert str(root) not in skipped[name]
    assert _snapshot(outside) == before


NAMES = st.sampled_from(["metrics.jsonl", "checkpoints", "results.json", "deploy.json",
                         "../outside", "/", "docs", "thesis.tex", ".", "..", "", "a/b",
                         "outside", MARKER, "sweep.md", "lora"])  # fmt: skip
MARKERS = st.fixed_dictionaries(
    {},
    optional={
        "format": st.sampled_from([FORMAT, "softprompt-output/1"]) | JSON,
        "kind": st.sampled_from(sorted(KINDS)) | JSON,
        "entries": st.lists(NAMES | st.text(max_size=6), max_size=5) | JSON,
    },
)


@BOUNDED
@given(marker=MARKERS | JSON, kind=st.sampled_from(sorted(KINDS)), resume=st.booleans(),
       user=st.lists(st.sampled_from(["thesis.tex", "docs", "metrics.jsonl", "checkpoints"]),
                     max_size=3, unique=True), link=st.booleans())  # fmt: skip
def test_no_marker_touches_a_file_outside_the_output(tmp_path_factory, marker, kind, resume,
                                                     user, link):  # fmt: skip
    root = tmp_path_factory.mktemp("marker")
    outside, out = _outside(root), root / "out"
    out.mkdir()
    for name in user:
        if link:
            (out / name).symlink_to(outside / "docs")
        elif name in ("docs", "checkpoints"):
            (out / name).mkdir()
            (out / name / "mine.txt").write_text("mine")
        else:
            (out / name).write_text("mine")
    (out / MARKER).write_text(json.dumps(marker))
    before = _snapshot(outside)
    try:
        claim_output(out, KINDS[kind][0], resume=resume, overwrite=True)
    except ConfigError:
        pass
    assert _snapshot(outside) == before
