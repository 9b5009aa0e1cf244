"""The Hub without the network: `push` stages the prompt's files and a model card for
upload_folder (a local fake stands in for the Hub), and `hf:owner/name` resolves through
huggingface_hub's snapshot_download from a populated local cache."""

from __future__ import annotations

import shutil

import pytest
import torch
from conftest import train_config

from softprompt import artifacts
from softprompt.artifacts import load_prompt
from softprompt.cli import main
from softprompt.commands.push import push
from softprompt.config import PushConfig
from softprompt.errors import ArtifactError, ConfigError
from softprompt.hub import model_card
from softprompt.training import train

SHA = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture(scope="module")
def run(model_dirs, tmp_path_factory):
    root = tmp_path_factory.mktemp("hub")
    from conftest import write_reviews

    data = write_reviews(root / "train.jsonl")
    out = root / "run"
    train(train_config(model_dirs["llama"], data, out, epochs=2, choices="negative,positive"),
          progress=False)  # fmt: skip
    return out


def test_model_card(run, model_dirs):
    card = model_card(run, "me/sentiment")
    meta = artifacts.read_meta(run)
    head = card.split("---")[1]
    assert f"base_model: {model_dirs['llama']}" in head and "library_name: peft" in head
    assert "- prompt-tuning" in head
    assert "# me/sentiment" in card and "A soft prompt of 4 virtual tokens" in card
    assert "- template: `review : {input} sentiment :`" in card
    assert "- input field: review" in card and "- target field: label" in card
    assert "- label words: negative,positive" in card
    assert "- placement of the virtual tokens: start" in card
    best = meta["metrics"]["best_val_loss"]
    assert f"| best_val_loss | {best:.4g} |" in card
    assert "softprompt generate --prompt hf:me/sentiment" in card
    assert 'PeftModel.from_pretrained(model, "me/sentiment")' in card
    assert f'AutoModelForCausalLM.from_pretrained("{model_dirs["llama"]}")' in card
    assert "![loss curve](loss.png)" in card


class FakeHub:
    """Stands in for huggingface_hub.HfApi: records calls, keeps what was uploaded."""

    calls: list = []
    remote = None

    def __init__(self, token=None):
        FakeHub.calls.append(("init", token))

    def create_repo(self, repo_id, private=False, exist_ok=False):
        FakeHub.calls.append(("create_repo", repo_id, private, exist_ok))

    def upload_folder(self, repo_id, folder_path, commit_message):
        FakeHub.calls.append(("upload_folder", repo_id, commit_message))
        shutil.copytree(folder_path, FakeHub.remote)


def test_push_uploads_the_prompt_and_its_card(run, tmp_path, monkeypatch, capsys):
    import huggingface_hub

    FakeHub.calls, FakeHub.remote = [], tmp_path / "remote"
    monkeypatch.setattr(huggingface_hub, "HfApi", FakeHub)
    assert main(["push", str(run), "me/sentiment", "--private", "--token", "t0k"]) == 0
    assert capsys.readouterr().out.strip() == "https://huggingface.co/me/sentiment"
    assert FakeHub.calls[:2] == [("init", "t0k"), ("create_repo", "me/sentiment", True, True)]
    assert FakeHub.calls[2] == ("upload_folder", "me/sentiment", "softprompt push run")
    names = sorted(p.name for p in FakeHub.remote.iterdir())
    assert names == [
        "README.md",
        "adapter_config.json",
        "adapter_model.safetensors",
        "initial_prompt.safetensors",
        "loss.png",
        "metrics.jsonl",
        "softprompt.json",
    ]  # fmt: skip  (no checkpoints, no marker)
    assert (FakeHub.remote / "README.md").read_text() == model_card(run, "me/sentiment")


def test_push_errors(run, tmp_path, capsys):
    with pytest.raises(ConfigError, match="owner/name"):
        PushConfig(str(run), "sentiment")
    with pytest.raises(ArtifactError, match="holds no saved prompt"):
        push(PushConfig(str(tmp_path), "me/x"))


def _populate_cache(cache, run, repo="me/sentiment"):
    """The Hugging Face cache layout snapshot_download reads: blobs behind a snapshot of a
    commit, and refs/main naming that commit."""
    root = cache / f"models--{repo.replace('/', '--')}"
    snap = root / "snapshots" / SHA
    snap.mkdir(parents=True)
    for name in artifacts.PROMPT_FILES:
        if (run / name).is_file():
            shutil.copy2(run / name, snap / name)
    (root / "refs").mkdir()
    (root / "refs" / "main").write_text(SHA)


@pytest.fixture
def hub_cache(tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    artifacts._download.cache_clear()
    yield tmp_path / "hf-cache"
    artifacts._download.cache_clear()


def test_hf_prompt_resolves_through_snapshot_download(run, hub_cache, capsys, monkeypatch):
    import huggingface_hub

    _populate_cache(hub_cache, run)
    seen = []
    real = huggingface_hub.snapshot_download
    monkeypatch.setattr(huggingface_hub, "snapshot_download",
                        lambda *a, **k: seen.append((a, k)) or real(*a, **k))  # fmt: skip
    prompt, meta = load_prompt("hf:me/sentiment")
    assert seen and seen[0][0] == ("me/sentiment",) and seen[0][1]["revision"] is None
    local, _ = load_prompt(run)
    assert torch.equal(prompt.embedding, local.embedding)
    assert meta["base_model"] == artifacts.read_meta(run)["base_model"]
    # the same answers from the Hub copy as from the folder, through the CLI
    assert main(["generate", "--prompt", "hf:me/sentiment", "the food was awful"]) == 0
    hub_out = capsys.readouterr().out
    assert main(["generate", "--prompt", str(run), "the food was awful"]) == 0
    assert capsys.readouterr().out == hub_out
    assert main(["inspect", "hf:me/sentiment"]) == 0
    assert "nearest vocabulary tokens" in capsys.readouterr().out


def test_hf_init_starts_training_from_the_hub_prompt(run, hub_cache, model_dirs, tmp_path):
    _populate_cache(hub_cache, run)
    from conftest import write_reviews

    data = write_reviews(tmp_path / "d.jsonl")
    cfg = train_config(model_dirs["llama"], data, tmp_path / "again", max_steps=1,
                       init="hf:me/sentiment")  # fmt: skip
    train(cfg, progress=False)
    from safetensors.torch import load_file

    start = load_file(str(tmp_path / "again" / "initial_prompt.safetensors"))["prompt_embeddings"]
    assert torch.equal(start, load_prompt(run)[0].embedding.detach())


def test_hf_prompt_missing_offline(hub_cache, capsys):
    assert main(["generate", "--prompt", "hf:me/absent", "good"]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "hf:me/absent is not in the local Hugging Face cache" in err
    with pytest.raises(ConfigError, match="hf:owner/name"):
        artifacts.resolve_prompt_dir("hf:justaname")


def test_a_classifiers_card_loads_its_head_or_says_peft_cannot(kind_dirs, tmp_path):
    """A classifier's card loads the sequence-classification class with one output per
    label; a head on the mean of the hidden states (which PEFT's model does not read) says
    so instead of a PEFT snippet that would score it differently."""
    from conftest import random_prompt
    from test_kinds import sentence_transformers_copy

    from softprompt.artifacts import save_prompt
    from softprompt.loading import load_model

    labels = {"labels": ["negative", "positive"]}
    mean = sentence_transformers_copy(kind_dirs["bert"], tmp_path / "st")
    for name, folder in (("cls", kind_dirs["bert"]), ("mean", mean)):
        loaded = load_model(model=str(folder), **labels)
        save_prompt(tmp_path / name, random_prompt(), loaded.model, loaded.name,
                    meta={"labels": labels["labels"]})  # fmt: skip
    card = model_card(tmp_path / "cls", "me/cls")
    assert f'AutoModelForSequenceClassification.from_pretrained("{kind_dirs["bert"]}", ' \
        "num_labels=2)" in card  # fmt: skip
    assert "Its labels, in the head's order: negative, positive." in card
    card = model_card(tmp_path / "mean", "me/mean")
    assert "PeftModel" not in card and "PEFT's model reads `[CLS]`" in card
