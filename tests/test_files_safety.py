"""Issue 23, cases 9-12: files and flags are checked, never trusted: deep JSON, damaged
metrics, non-finite numbers, huge sparse files, prompts that do not fit an export's dtype,
Hub revisions that climb out of the cache, --init text longer than the prompt, data changed
under a --resume, and advice to --resume only where it works."""

from __future__ import annotations

import errno
import json

import pytest
import torch
from conftest import interrupted_at, random_prompt, train_config
from safetensors.torch import save_file

from softprompt.artifacts import resolve_prompt_dir, save_prompt
from softprompt.cli import main
from softprompt.config import DataConfig, GenerateConfig
from softprompt.data import load_examples
from softprompt.errors import ConfigError, DataError
from softprompt.loading import load_model
from softprompt.outputs import claim_output, disk_error
from softprompt.training import train

DEEP = "[" * 100_000 + "]" * 100_000


def _error_line(capsys) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = [x for x in err.splitlines() if x.startswith("softprompt: error:")]
    assert len(lines) == 1, err
    return lines[0]


@pytest.fixture
def saved(tiny_dir, tmp_path):
    loaded = load_model(model=str(tiny_dir))
    folder = tmp_path / "prompt"
    save_prompt(folder, random_prompt(0, 3), loaded.model, loaded.name)
    return folder


# --- 9. deep JSON, damaged metrics, nan flags, huge sparse files -------------------------------


def test_deep_json_in_the_data_is_one_line_with_file_and_line(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"input": "a", "target": "b"}\n' + DEEP + "\n")
    with pytest.raises(DataError, match=r"d.jsonl:2: the JSON is nested too deeply"):
        load_examples(str(path), DataConfig(data="x"))


def test_deep_json_in_a_prompt_folder_read_by_export(saved, tmp_path, capsys):
    (saved / "softprompt.json").write_text(DEEP)
    assert main(["export", str(saved), "--to", "numpy", "--output", str(tmp_path / "e")]) == 2
    assert "softprompt.json:1: the JSON is nested too deeply" in _error_line(capsys)


def test_resume_after_a_metrics_line_without_a_kind(tiny_dir, pairs_file, tmp_path, capsys):
    out = tmp_path / "r"
    with interrupted_at(5):
        train(train_config(tiny_dir, pairs_file, out, epochs=3, save_every=2), progress=False)
    with (out / "metrics.jsonl").open("a") as fh:
        fh.write('{"step": 99999}\n')
    cfg = train_config(tiny_dir, pairs_file, out, epochs=3, save_every=2, resume=True)
    train(cfg, progress=False)
    assert "left out" in capsys.readouterr().err
    assert all("kind" in json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines())


@pytest.mark.parametrize("flag", ["--repetition-penalty", "--temperature", "--top-p"])
@pytest.mark.parametrize("value", ["nan", "inf"])
def test_generate_refuses_non_finite_numbers(tiny_dir, capsys, flag, value):
    assert main(["generate", "--model", str(tiny_dir), flag, value, "hello"]) == 2
    assert "finite" in _error_line(capsys)
    with pytest.raises(ConfigError, match="temperature"):
        GenerateConfig(temperature=1e-300)


def test_a_huge_sparse_jsonl_is_streamed_to_its_first_error(tmp_path):
    path = tmp_path / "sparse.jsonl"
    with path.open("wb") as fh:
        fh.truncate(2 * 2**30)  # 2 GB of NUL bytes on no disk, with no line break
    with pytest.raises(DataError, match=r"sparse.jsonl:1: the line is longer than"):
        load_examples(str(path), DataConfig(data="x"))


# --- 10. exports that JSON or float16 cannot hold ------------------------------------------


def test_export_of_a_nan_prompt_is_refused(saved, tmp_path, capsys):
    rows = torch.randn(3, 16)
    rows[0, 0] = float("nan")
    save_file({"prompt_embeddings": rows}, str(saved / "adapter_model.safetensors"))
    out = tmp_path / "e"
    assert main(["export", str(saved), "--to", "sglang", "--output", str(out)]) == 2
    assert "not finite" in _error_line(capsys)
    assert not (out / "input_embeds.json").exists()


def test_export_to_float16_of_values_it_cannot_hold_is_refused(saved, tmp_path, capsys):
    rows = torch.randn(3, 16)
    rows[1, 1] = 1e6
    save_file({"prompt_embeddings": rows}, str(saved / "adapter_model.safetensors"))
    args = ["export", str(saved), "--to", "numpy", "--dtype", "float16"]
    assert main([*args, "--output", str(tmp_path / "e")]) == 2
    assert "do not fit float16" in _error_line(capsys)


# --- 11. Hub revisions ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "ref", ["hf:owner/name@../../../../x", "hf:owner/name@a/../../b", "hf:../name", "hf:o/n/x",
            "hf:owner/name@/abs", "hf:owner/na me", "hf:owner/name@a\\b"],
)  # fmt: skip
def test_hub_names_and_revisions_are_validated(ref):
    with pytest.raises(ConfigError, match="hf:owner/name|revision"):
        resolve_prompt_dir(ref)


# --- 12. --init text, data changed under --resume, advice to --resume ----------------------------


def test_init_text_longer_than_the_prompt_says_so(tiny_dir, pairs_file, tmp_path, capsys):
    cfg = train_config(tiny_dir, pairs_file, tmp_path / "r", max_steps=1)
    cfg.prompt.init, cfg.prompt.init_text = "text", "good bad great awful fine poor"
    train(cfg, progress=False)
    assert "longer than the prompt's 4 virtual tokens" in capsys.readouterr().err
    meta = json.loads((tmp_path / "r" / "softprompt.json").read_text())
    assert meta["init"]["text"] == "good bad great awful"  # the words used (the flag as given
    assert meta["prompt"]["init_text"] == cfg.prompt.init_text  # stays in the settings)


def test_resume_after_the_data_changed_in_place_is_refused(tiny_dir, pairs_file, tmp_path):
    out = tmp_path / "r"
    with interrupted_at(5):
        train(train_config(tiny_dir, pairs_file, out, epochs=3, save_every=2), progress=False)
    lines = pairs_file.read_text().splitlines()
    pairs_file.write_text("\n".join(reversed(lines)) + "\n")
    cfg = train_config(tiny_dir, pairs_file, out, epochs=3, save_every=2, resume=True)
    with pytest.raises(ConfigError, match="changed since the checkpoint"):
        train(cfg, progress=False)


def test_a_full_disk_advises_resume_only_where_it_works(tmp_path):
    full = OSError(errno.ENOSPC, "No space left on device")
    for what, name in (("results", "results.json"), ("an export", "deploy.json"),
                       ("a run", "softprompt.json")):  # fmt: skip
        out = claim_output(tmp_path / name, what)
        assert "--resume" not in str(disk_error(full, out / name))
    run = tmp_path / "softprompt.json"
    (run / "checkpoints" / "step-00000002").mkdir(parents=True)
    assert "with --resume" in str(disk_error(full, run / "softprompt.json"))


@pytest.mark.parametrize(
    "args",
    [
        ["train", "--lr", "nan"], ["train", "--weight-decay", "inf"],
        ["train", "--warmup-ratio", "nan"], ["train", "--max-grad-norm", "-1"],
        ["train", "--val-fraction", "nan"], ["compare", "--test", "t.jsonl", "--prompt-lr", "nan"],
        ["compare", "--test", "t.jsonl", "--full-lr", "-1"], ["sweep", "--lrs", "nan,0.1"],
        ["serve", "--prompts", ".", "--batch-wait-ms", "inf"],
        ["serve", "--prompts", ".", "--batch-wait-ms", "1e300"],
    ],
)  # fmt: skip
def test_numeric_flags_must_be_finite_and_in_range(tmp_path, capsys, args):
    data = ["--data", "d.jsonl", "--output", str(tmp_path / "o")] if args[0] != "serve" else []
    assert main([*args, *data]) == 2
    line = _error_line(capsys)
    assert args[-2] in line or args[-2].replace("lrs", "lr") in line, line
