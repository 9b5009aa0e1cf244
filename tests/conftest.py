"""Tiny random models built from configs (seconds per test, no network).

Each model folder holds a real tokenizer (a word-level vocabulary trained here on a small
corpus) and a randomly initialised causal LM, saved with save_pretrained so tests go
through the same `--model FOLDER` path as users.
"""

from __future__ import annotations

import importlib
import json
import os
from contextlib import contextmanager
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


CHATML = (
    "{% for m in messages %}{% if loop.first and m['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nyou are a good answer bot<|im_end|>\\n' }}{% endif %}"
    "{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)  # SmolLM2's template, shortened: a default system message, ChatML turns


def make_chat_tokenizer():
    """The tiny tokenizer plus ChatML's two special tokens and a chat template."""
    tok = make_tokenizer()
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tok.add_tokens(["system", "user", "assistant", "you", "bot"])
    tok.eos_token = "<|im_end|>"
    tok.chat_template = CHATML
    return tok


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


@pytest.fixture(scope="session")
def chat_dir(tmp_path_factory) -> Path:
    """A tiny Llama whose tokenizer has a ChatML chat template (an instruct model's shape)."""
    folder = tmp_path_factory.mktemp("models") / "chat"
    tok = make_chat_tokenizer()
    make_model("llama", len(tok)).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session", autouse=True)
def _float32_by_default():
    """`--dtype auto` (the default) as on a host without native bf16: float32, so the tests'
    equalities (batched == alone, PEFT's logits, resume bit for bit) hold on every machine
    CI may run on. A test of bfloat16 names it, or patches `_cpu_has_bf16` itself; tests
    that start processes of their own pass `--dtype float32` where they compare numbers."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr("softprompt.loading._cpu_has_bf16", lambda: False)
        yield


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


def write_reviews(path: Path) -> Path:
    """Write REVIEWS to ``path`` as JSONL records with fields ``review`` and ``label``."""
    path.write_text("".join(json.dumps({"review": r, "label": y}) + "\n" for r, y in REVIEWS))
    return path


@pytest.fixture
def pairs_file(tmp_path) -> Path:
    return write_reviews(tmp_path / "train.jsonl")


@pytest.fixture(scope="module")
def loaded_all(model_dirs):
    """Every tiny model loaded (frozen), once per test module."""
    from softprompt.loading import load_model

    return {k: load_model(model=str(v)) for k, v in model_dirs.items()}


@pytest.fixture(scope="module")
def gemma():
    """The embedded Gemma 3 270M, loaded once per (slow) test module."""
    from softprompt.loading import load_model

    return load_model()


def random_prompt(seed: int = 0, n: int = 3):
    """A seeded random SoftPrompt of ``n`` virtual tokens for the 16-wide tiny models."""
    from softprompt.prompt import SoftPrompt

    return SoftPrompt(torch.randn(n, 16, generator=torch.Generator().manual_seed(seed)) * 2)


def train_config(model_dir, data, out, **kw):
    """A TrainConfig for a few quick steps of a 4-token prompt on REVIEWS-style data.

    Keywords naming DataConfig fields go to the data config, the rest to TrainConfig."""
    from softprompt.config import DataConfig, ModelConfig, PromptConfig, TrainConfig

    data_kw = {k: kw.pop(k) for k in list(kw) if k in DataConfig.__dataclass_fields__}
    data_kw.setdefault("val_fraction", 0.25)
    data_kw.setdefault("template", "review : {input} sentiment :")
    # The tests written before --choices auto / --init auto pin the behaviour they test.
    kw.setdefault("choices", None)
    kw.setdefault("epochs", 3)  # every kind's passes and method as before the kinds' defaults
    kw.setdefault("method", "prompt")
    kw.setdefault("select", "loss")  # ... and the prompt kept before decoders kept the last
    return TrainConfig(
        model=ModelConfig(model=str(model_dir)),
        data=DataConfig(data=str(data), input_field="review", target_field="label", **data_kw),
        prompt=PromptConfig(num_virtual_tokens=4, init=kw.pop("init", "vocab")),
        output=str(out),
        batch_size=kw.pop("batch_size", 3),
        lr=kw.pop("lr", 0.3),
        **kw,
    )


@contextmanager
def interrupted_at(call: int):
    """Run the body expecting a KeyboardInterrupt raised by the training step's ``call``-th
    loss computation (a user pressing Ctrl-C mid-run); the real loss comes back after. The
    step asks the model's kind object for the loss, so every kind's ``rows_loss`` counts."""
    kinds = importlib.import_module("softprompt.kinds")
    classes = [type(k) for k in kinds.KINDS.values()]
    real = {cls: cls.rows_loss for cls in classes}
    calls = {"n": 0}

    def flaky(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == call:
            raise KeyboardInterrupt
        return real[type(self)](self, *args, **kwargs)

    for cls in classes:
        cls.rows_loss = flaky
    try:
        with pytest.raises(KeyboardInterrupt):
            yield
    finally:
        for cls in classes:
            cls.rows_loss = real[cls]


interrupted_kind_loss = interrupted_at  # the same for every kind


# --- beyond decoders: tiny random T5, BART (seq2seq) and BERT (classify) ------------------
# No real T5 or BART is available offline: random models from configs, with the tests'
# word-level tokenizer (T5-style: text + EOS; BART/BERT-style: BOS + text + EOS).


def kind_tokenizer(template: str):
    from tokenizers import processors

    tok = make_tokenizer()
    ids = {t: tok.convert_tokens_to_ids(t) for t in ("<bos>", "<eos>")}
    tok._tokenizer.post_processor = processors.TemplateProcessing(
        single=template, special_tokens=[(t, i) for t, i in ids.items() if t in template]
    )
    return tok


def make_kind_model(kind: str, vocab: int):
    from transformers import (
        BartConfig,
        BartForConditionalGeneration,
        BertConfig,
        BertModel,
        T5Config,
        T5ForConditionalGeneration,
    )

    torch.manual_seed(0)
    if kind == "t5":
        cfg = T5Config(vocab_size=vocab, d_model=16, d_kv=8, d_ff=32, num_layers=2, num_heads=2,
                       pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)  # fmt: skip
        return T5ForConditionalGeneration(cfg)
    if kind == "bart":
        cfg = BartConfig(vocab_size=vocab, d_model=16, encoder_layers=1, decoder_layers=1,
                         encoder_attention_heads=2, decoder_attention_heads=2,
                         encoder_ffn_dim=32, decoder_ffn_dim=32, max_position_embeddings=512,
                         pad_token_id=0, eos_token_id=1, bos_token_id=2,
                         decoder_start_token_id=1, forced_eos_token_id=None)  # fmt: skip
        return BartForConditionalGeneration(cfg)
    cfg = BertConfig(vocab_size=vocab, hidden_size=16, num_hidden_layers=2,
                     num_attention_heads=2, intermediate_size=32, max_position_embeddings=512,
                     pad_token_id=0)  # fmt: skip
    return BertModel(cfg)  # a base encoder, as MiniLM ships: the head is new


TEMPLATES = {"t5": "$A <eos>", "bart": "<bos> $A <eos>", "bert": "<bos> $A <eos>"}


@pytest.fixture(scope="session")
def kind_dirs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("kinds")
    out = {}
    for kind, template in TEMPLATES.items():
        tok = kind_tokenizer(template)
        folder = root / kind
        make_kind_model(kind, len(tok)).save_pretrained(folder)
        tok.save_pretrained(folder)
        out[kind] = folder
    return out


@contextmanager
def served_side_by_side(loaded, prompts: dict, folder: Path, texts: list[str], max_tokens: int):
    """Serve ``prompts`` (name -> prompt, saved in ``folder``) beside the base model; every
    (prompt or base, text) completion sent at once from threads must equal the one sent
    alone, with rows sharing batches. Yields (the app's state, the server's URL) while it
    serves; stops it after."""
    import threading

    import openai

    from softprompt.artifacts import save_prompt
    from softprompt.config import ServeConfig
    from softprompt.serving.api import create_app
    from softprompt.serving.server import BackgroundServer

    for name, prompt in prompts.items():
        save_prompt(folder / name, prompt, loaded.model, loaded.name)
    app = create_app(loaded, ServeConfig(prompts=str(folder), max_batch_size=8, batch_wait_ms=50))
    state = app.state.softprompt
    assert state.store.rescan()["added"] == sorted(prompts)
    background = BackgroundServer(app)
    client = openai.OpenAI(base_url=f"{background.url}/v1", api_key="x", max_retries=0, timeout=30)

    def complete(model, text):
        out = client.completions.create(model=model, prompt=text, max_tokens=max_tokens,
                                        temperature=0)  # fmt: skip
        return out.choices[0].text

    try:
        jobs = [(m, t) for m in (*prompts, "base") for t in texts]
        alone = {job: complete(*job) for job in jobs}
        results = {}
        before = state.batcher.metrics.batches
        threads = [threading.Thread(target=lambda i=i: results.__setitem__(i, complete(*jobs[i])))
                   for i in range(len(jobs))]  # fmt: skip
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=60)
        assert [results[i] for i in range(len(jobs))] == [alone[j] for j in jobs]
        assert state.batcher.metrics.batches - before < len(jobs)  # rows shared batches
        yield state, background.url
    finally:
        background.stop()
        state.batcher.close()


def pytest_collection_modifyitems(config, items):
    """Under pytest-xdist (`make test` runs two workers with --dist loadgroup): the tests of
    the bundled models share the user's converted-model cache, so they run in one worker,
    one after another (a first conversion is never raced); the tests that start processes
    of their own (torchrun) run one after another too."""
    for item in items:
        if item.get_closest_marker("slow"):
            item.add_marker(pytest.mark.xdist_group("bundled-models"))
        elif item.path.name == "test_distributed.py":
            item.add_marker(pytest.mark.xdist_group("processes"))
