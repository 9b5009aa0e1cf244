"""Tiny random models built from configs (seconds per test, no network).

Each model folder holds a real tokenizer (a word-level vocabulary trained here on a small
corpus) and a randomly initialised causal LM, saved with save_pretrained so tests go
through the same `--model FOLDER` path as users.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # no test may touch the network
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

WORDS = (
    "the a movie film book phone battery screen food service hotel room staff price was is "
    "great good bad awful terrible excellent lovely boring slow fast broken works perfectly "
    "not very really love hate it this and but i we they review sentiment positive negative "
    "answer question : . , ! ? { } \n"
).split(" ")


def make_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<eos>", "<bos>", "<unk>"]
    vocab = {tok: i for i, tok in enumerate(specials)}
    for w in sorted({w.strip() for w in WORDS if w.strip()}):
        vocab.setdefault(w, len(vocab))
    vocab.setdefault("\n", len(vocab))
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()]
    )
    tok.post_processor = processors.TemplateProcessing(
        single="<bos> $A", special_tokens=[("<bos>", vocab["<bos>"])]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<bos>",
        eos_token="<eos>",
        pad_token="<pad>",
        unk_token="<unk>",
    )


def make_model(kind: str, vocab_size: int):
    from transformers import (
        AutoModelForCausalLM,
        Gemma3TextConfig,
        GPT2Config,
        LlamaConfig,
    )

    common = dict(vocab_size=vocab_size, bos_token_id=2, eos_token_id=1, pad_token_id=0)
    if kind == "llama":
        cfg = LlamaConfig(
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            num_key_value_heads=1,
            max_position_embeddings=512,
            **common,
        )
    elif kind == "gemma3":
        cfg = Gemma3TextConfig(
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=3,
            num_attention_heads=2,
            num_key_value_heads=1,
            head_dim=8,
            sliding_window=4,
            layer_types=["sliding_attention", "sliding_attention", "full_attention"],
            max_position_embeddings=512,
            **common,
        )
    elif kind == "gpt2":
        cfg = GPT2Config(n_embd=16, n_layer=2, n_head=2, n_positions=512, **common)
    else:
        raise ValueError(kind)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg)
    return model


@pytest.fixture(scope="session")
def model_dirs(tmp_path_factory) -> dict[str, Path]:
    """Folders with a saved tiny model + tokenizer, one per architecture."""
    root = tmp_path_factory.mktemp("models")
    tok = make_tokenizer()
    out = {}
    for kind in ("llama", "gemma3", "gpt2"):
        folder = root / kind
        make_model(kind, len(tok)).save_pretrained(folder)
        tok.save_pretrained(folder)
        out[kind] = folder
    return out


@pytest.fixture(scope="session")
def tiny_dir(model_dirs) -> Path:
    return model_dirs["llama"]


@pytest.fixture(autouse=True)
def _isolated_cache(request, tmp_path, monkeypatch):
    """Converted-model cache per test, so no test depends on another's leftovers. Slow tests
    share the user's cache: converting the embedded model once is what users do too."""
    if "SOFTPROMPT_CACHE" not in os.environ and not request.node.get_closest_marker("slow"):
        monkeypatch.setenv("SOFTPROMPT_CACHE", str(tmp_path / "cache"))


REVIEWS = [
    ("the movie was great", "positive"),
    ("the food was awful", "negative"),
    ("i love this phone", "positive"),
    ("the service was slow and the room was broken", "negative"),
    ("excellent hotel , lovely staff", "positive"),
    ("boring book", "negative"),
    ("the battery works perfectly", "positive"),
    ("i hate this screen", "negative"),
    ("really good price", "positive"),
    ("terrible film , not good", "negative"),
    ("the staff was very lovely", "positive"),
    ("the phone is broken", "negative"),
]


@pytest.fixture
def pairs_file(tmp_path) -> Path:
    path = tmp_path / "train.jsonl"
    path.write_text("".join(json.dumps({"review": r, "label": y}) + "\n" for r, y in REVIEWS))
    return path
