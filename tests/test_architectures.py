"""The compatibility matrix (``tests/matrix.py``): every model type of transformers'
causal-LM, seq2seq-LM and sequence-classification mappings, built tiny from its config, is
either tuned end to end (kind detected, training lowers the loss, batch == alone, eval runs,
PEFT loads the artifact with our scores), refused in one line, or listed as not buildable.

The defect classes of issue 22 each have a focused test below. ``make test`` runs the FAST
types (the defect classes' examples and one of each kind); ``make matrix`` runs every type
(SOFTPROMPT_MATRIX=all), collects the records (SOFTPROMPT_MATRIX_JSON) and regenerates
docs/architectures.md with ``python tests/matrix.py --write-docs FILE``.
Deterministic: every model is built after torch.manual_seed(0), training is seeded, and
PEFT's scores must equal ours within matrix.TOL (1e-4, float32).
"""

from __future__ import annotations

import json
import os

import matrix
import pytest
import torch

from softprompt import load_model, load_prompt, save_prompt
from softprompt.errors import ConfigError

# the defect classes' examples and one of each kind: run on every `make test-fast` too
FAST = {"llama", "gpt2", "t5", "bart", "bert", "llama4_text", "blenderbot-small",
        "prophetnet", "switch_transformers", "pegasus", "marian", "mbart", "mamba",
        "jamba", "recurrent_gemma", "gemma3", "deberta-v2", "modernbert", "eurobert",
        "mpt"}  # fmt: skip
RECORDS: list[dict] = []


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    yield tmp_path_factory.mktemp("matrix")
    if RECORDS and (path := os.environ.get("SOFTPROMPT_MATRIX_JSON")):
        with open(path, "a") as f:
            f.writelines(json.dumps(r) + "\n" for r in RECORDS)


FULL = os.environ.get("SOFTPROMPT_MATRIX") == "all"  # `make matrix`: every type


def _param(t: str):
    known = matrix.KNOWN.get(t)
    marks = [] if t in FAST or FULL else [pytest.mark.skip(reason=(
        "the full matrix runs with `make matrix` (251 types, about 8 minutes on 2 cores: "
        "over make test's budget)"))]  # fmt: skip
    if known:
        marks.append(pytest.mark.xfail(reason=known, strict=True))
    return pytest.param(t, marks=marks, id=t)


@pytest.mark.parametrize("model_type", [_param(t) for t in matrix.TYPES])
def test_architecture(model_type, root):
    try:
        record = matrix.run_type(model_type, root)
    except BaseException as err:
        kind = matrix.kind_of(model_type)  # it was detected, or run_type had returned
        RECORDS.append({"type": model_type, "kind": kind, "status": "fails",
                        "reason": matrix.first_line(err)})  # fmt: skip
        raise
    RECORDS.append(record)
    assert record["status"] in ("works", "refused", "cannot be built")
    if record["status"] == "refused":
        assert "\n" not in record["reason"].strip()


def test_docs_list_every_type():
    text = matrix.DOCS.read_text()
    missing = [t for t in matrix.TYPES if f"| `{t}` |" not in text]
    assert not missing, f"docs/architectures.md lacks {missing}: regenerate it (tests/matrix.py)"


# --- the defect classes, one focused test each -----------------------------------------------


def build(model_type: str, tmp_path, **labels):
    kind = matrix.kind_of(model_type)
    matrix.save_type(model_type, kind, tmp_path / model_type)
    return load_model(model=str(tmp_path / model_type), **labels)


def test_a_body_that_base_model_does_not_name_takes_the_full_forward(tmp_path):
    loaded = build("llama4_text", tmp_path)  # base_model_prefix 'language_model': no such child
    assert loaded.model.base_model is loaded.model
    from softprompt.loss import support

    able = support(loaded.model)
    assert not able.fast_head and not able.shared_prefix


@pytest.mark.parametrize("model_type", ["mamba", "jamba", "recurrent_gemma"])
def test_recurrent_models_generate_on_the_plain_path(model_type, tmp_path):
    from conftest import random_prompt

    from softprompt import GenerateConfig, generate

    loaded = build(model_type, tmp_path)
    from softprompt.loss import support

    assert not support(loaded.model).shared_prefix
    prompt = random_prompt(0, 3) if loaded.hidden_size == 16 else None
    texts = ["the movie was great", "boring book"]
    cfg = GenerateConfig(max_new_tokens=3, batch_size=2)
    assert generate(loaded, texts, prompt, cfg) == [
        generate(loaded, [t], prompt, cfg)[0] for t in texts
    ]


def test_peft_loads_a_prompt_for_a_model_without_attention_heads(tmp_path):
    from conftest import random_prompt
    from peft import PeftModel

    loaded = build("mamba", tmp_path)
    save_prompt(tmp_path / "p", random_prompt(0, 3), loaded.model, loaded.name)
    adapter = json.loads((tmp_path / "p" / "adapter_config.json").read_text())
    assert isinstance(adapter["num_attention_heads"], int)
    PeftModel.from_pretrained(build("mamba", tmp_path / "b").model, str(tmp_path / "p"))


def test_seq2seq_without_prepare_decoder_inputs_trains_and_starts_where_it_trained(tmp_path):
    from softprompt.kinds.seq2seq import decoder_input_ids, decoder_start

    small = build("blenderbot-small", tmp_path)
    assert not hasattr(small.model, "prepare_decoder_input_ids_from_labels")
    labels = torch.tensor([[5, 6, 1], [7, 1, -100]])
    ids = decoder_input_ids(small.model, labels, 0)
    assert ids.tolist() == [[small.model.config.decoder_start_token_id, 5, 6],
                            [small.model.config.decoder_start_token_id, 7, 1]]  # fmt: skip
    mbart = build("mbart", tmp_path)  # no decoder_start_token_id: its shift wraps EOS round
    assert mbart.model.config.decoder_start_token_id is None
    first = decoder_input_ids(mbart.model, torch.tensor([[5, 6, 1]]), 0)[0, 0]
    assert decoder_start(mbart.model, 1, 0) == int(first) == 1


@pytest.mark.parametrize("model_type", ["prophetnet", "switch_transformers"])
def test_choices_pass_encoder_outputs_by_name(model_type, tmp_path):
    from conftest import random_prompt

    from softprompt.kinds.seq2seq import score_choices

    loaded = build(model_type, tmp_path)
    scores = score_choices(loaded.model, loaded.tokenizer, random_prompt(0, 3), ["boring book"],
                           ["positive", "negative"])  # fmt: skip
    assert len(scores[0]) == 2 and all(s < 0 for s in scores[0])


@pytest.mark.parametrize("model_type", ["pegasus", "marian"])
def test_text_is_embedded_as_the_encoder_embeds_ids(model_type, tmp_path):
    from softprompt.prompt import embed_tokens

    kind = matrix.kind_of(model_type)
    tok = matrix.tokenizer_for(kind)
    model = matrix.build_model(model_type, kind, len(tok))
    model.config.scale_embedding = True  # as pegasus-large and opus-mt checkpoints set it
    model.save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    loaded = load_model(model=str(tmp_path / "m"))
    encoder, ids = loaded.model.get_encoder(), torch.tensor([[5, 6, 7, 1]])
    assert encoder.embed_scale == 4.0  # sqrt(16)
    with torch.no_grad():
        want = encoder(input_ids=ids).last_hidden_state
        got = encoder(inputs_embeds=embed_tokens(loaded.model, ids)).last_hidden_state
    assert torch.allclose(got, want, atol=1e-5)


def test_a_multimodal_wrapper_is_refused_in_one_line(tmp_path):
    with pytest.raises(ConfigError, match=r"multimodal model \(vision tower\).*gemma3_text"):
        build("gemma3", tmp_path)


@pytest.mark.parametrize("model_type", ["deberta-v2", "modernbert"])
def test_classifier_layers_created_at_load_are_trained_and_saved(model_type, tmp_path):
    from conftest import random_prompt
    from peft import PeftModel

    from softprompt.prompt import embed_tokens

    labels = {"labels": matrix.LABELS}
    loaded = build(model_type, tmp_path, **labels)
    extra = {"deberta-v2": "pooler", "modernbert": "head"}[model_type]
    with torch.no_grad():  # as after training: not the freshly initialised layer
        for p in getattr(loaded.model, extra).parameters():
            p.add_(0.5)
    save_prompt(tmp_path / "p", random_prompt(0, 3), loaded.model, loaded.name)
    adapter = json.loads((tmp_path / "p" / "adapter_config.json").read_text())
    assert adapter["modules_to_save"] == ["classifier", "score", extra]
    again = build(model_type, tmp_path / "again", **labels)
    prompt, _ = load_prompt(tmp_path / "p", again.model)
    peft = PeftModel.from_pretrained(build(model_type, tmp_path / "b", **labels).model,
                                     str(tmp_path / "p")).eval()  # fmt: skip
    ids = torch.tensor([[2, 5, 6, 7, 1]])
    with torch.no_grad():
        theirs = peft(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
        for a, b in zip(getattr(again.model, extra).parameters(),
                        getattr(loaded.model, extra).parameters()):  # fmt: skip
            assert torch.equal(a, b)
        # ours: the prompt before the embedded text, the saved head and extra layers in place
        embeds = torch.cat([prompt.embedding[None], embed_tokens(again.model, ids)], dim=1)
        ours = again.model(inputs_embeds=embeds, attention_mask=torch.ones(1, 8)).logits
    assert torch.allclose(ours, theirs, atol=matrix.TOL)


@pytest.mark.parametrize("model_type, says", [
    ("eurobert", "takes no past_key_values .nor does its body., so PEFT could not load"),
    ("mpt", "index in the sequence .MPT's ALiBi., so the padding"),
])  # fmt: skip
def test_a_deep_prompt_is_refused_where_it_would_not_hold(model_type, says, tmp_path):
    """EuroBERT's forward and its body's take no past_key_values (PEFT's prefix tuning
    refuses it); MPT's ALiBi biases keys by index, so left padding after a deep prompt moved
    a batched row's scores (by 6e-3 against the row alone). `--method prefix` is refused in
    one line; the default then trains an input-layer prompt (test_architecture runs both)."""
    kind = matrix.kind_of(model_type)
    matrix.save_type(model_type, kind, tmp_path / model_type)
    labels = matrix.LABELS if kind == "classify" else None
    loaded = load_model(model=str(tmp_path / model_type), labels=labels)
    with pytest.raises(ConfigError, match=says) as err:
        loaded.kind.check_deep(loaded)
    assert "\n" not in str(err.value) and "use --method prompt" in err.value.cli_message


@pytest.mark.parametrize(
    "model_type, says",
    [
        ("ctrl", "cannot generate from inputs_embeds"),  # prepare_inputs_for_generation
        ("canine", "has no input embedding layer"),
        ("ibert", "returns a tuple"),  # a quantized embedding layer
        ("longformer", "cannot run from inputs_embeds alone"),  # reads input_ids anyway
        ("fnet", "takes no attention mask"),
        ("gemma4_text", "per-layer inputs from the token ids"),
    ],
)
def test_a_model_that_cannot_take_a_soft_prompt_is_refused_in_one_line(model_type, says,
                                                                       tmp_path):  # fmt: skip
    from softprompt.errors import ModelLoadError

    with pytest.raises(ModelLoadError, match=says) as err:
        build(model_type, tmp_path)
    assert "\n" not in str(err.value) and "use another model" in str(err.value)


@pytest.mark.parametrize(
    "model_type, says",
    [
        ("whisper", "encoder-decoder without a text-to-text"),  # its encoder reads audio
        ("granite_speech", r"multimodal model \(encoder_config beside its text model\)"),
    ],
)
def test_encoders_of_other_media_are_refused_from_the_config(model_type, says):
    from transformers import AutoConfig

    from softprompt.kinds import detect

    with pytest.raises(ConfigError, match=says):
        detect(AutoConfig.for_model(model_type))
