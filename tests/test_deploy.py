"""Deploying a prompt on engines that take embeddings (vLLM, SGLang): the payloads decode, as
the engines' own code decodes them, to exactly what softprompt feeds the model."""

from __future__ import annotations

import base64
import io
import json

import numpy as np
import pytest
import torch
from conftest import random_prompt

from softprompt.artifacts import save_prompt
from softprompt.cli import main
from softprompt.commands.export import run_export
from softprompt.config import ExportConfig
from softprompt.deploy import Deployment, decode_tensor, encode_tensor
from softprompt.errors import ConfigError
from softprompt.generation import generate, generate_chat, plain_rows
from softprompt.loading import load_model
from softprompt.rows import encode_chat, encode_raw
from softprompt.templates import PromptFormat

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
SYSTEM = "answer : positive , negative"
TEMPLATES = [None, "review : {input} sentiment :", "review : {soft_prompt} {input} sentiment :"]


def vllm_load(data: str) -> torch.Tensor:
    """What vLLM does with a `prompt_embeds` string (Completions) or a `prompt_embeds` content
    part's `data` (Chat Completions): vllm's `safe_load_prompt_embeds` (vllm/renderers/
    embed_utils.py) runs `torch.load(BytesIO(pybase64.b64decode(embed, validate=True)),
    weights_only=True, map_location=cpu)`, accepts float32/bfloat16/float16, calls
    `.to_dense()` and squeezes a leading batch dimension. pybase64.b64decode is
    base64.b64decode's drop-in."""
    raw = base64.b64decode(data, validate=True)
    tensor = torch.load(io.BytesIO(raw), weights_only=True, map_location=torch.device("cpu"))
    assert isinstance(tensor, torch.Tensor) and tensor.dtype in DTYPES.values()
    tensor = tensor.to_dense()
    if tensor.dim() > 2:
        tensor = tensor.squeeze(0)
    assert tensor.dim() == 2
    return tensor


def sglang_load(body: dict) -> torch.Tensor:
    """What SGLang does with `input_embeds` (GenerateReqInput.input_embeds:
    List[List[float]]): the JSON is parsed, and `ScheduleBatch.prepare_for_extend` (sglang/
    srt/managers/schedule_batch.py) builds `torch.tensor(input_embeds)` (float32)."""
    sent = json.loads(json.dumps(body))  # over the wire as JSON
    return torch.tensor(sent["input_embeds"])


def _saved(tmp_path, loaded, fmt: PromptFormat | None = None, name: str = "p", seed: int = 0):
    prompt = random_prompt(seed, n=3)
    meta = {"prompt_format": fmt.to_meta()} if fmt is not None else None
    return save_prompt(tmp_path / name, prompt, loaded.model, loaded.name, meta), prompt


@pytest.fixture(scope="module")
def chat(chat_dir):
    return load_model(model=str(chat_dir))


# --- the prompt's rows ------------------------------------------------------------------


@pytest.mark.parametrize("dtype", list(DTYPES))
def test_chat_part_decodes_bit_exact(tmp_path, loaded_all, dtype):
    """The content part's data, read as vLLM reads it, is the prompt in that dtype, bit for
    bit, shape (virtual tokens, hidden)."""
    folder, prompt = _saved(tmp_path, loaded_all["llama"])
    part = Deployment.load(folder).chat_part(dtype)
    assert part["type"] == "prompt_embeds"
    got = vllm_load(part["data"])
    assert got.dtype == DTYPES[dtype] and got.shape == (3, 16)
    assert torch.equal(got, prompt.embedding.detach().to(DTYPES[dtype]))
    if dtype == "float32":  # the saved float32 prompt itself, not a rounding of it
        assert torch.equal(got, prompt.embedding.detach())


def test_decode_refuses_what_vllm_refuses():
    """The helper's decoder is as strict as vLLM's: base64 validated, no pickled objects."""
    with pytest.raises(ValueError):
        decode_tensor("not base64 !")
    buf = io.BytesIO()
    torch.save({"x": object()}, buf)
    with pytest.raises(Exception, match="(?i)weights.only|unsupported|global"):
        decode_tensor(base64.b64encode(buf.getvalue()).decode())
    t = torch.randn(2, 4)
    assert torch.equal(decode_tensor(encode_tensor(t)), t)


# --- the whole sequence -----------------------------------------------------------------


@pytest.mark.parametrize("arch", ["llama", "gemma3", "gpt2"])
@pytest.mark.parametrize("template", TEMPLATES)
def test_sequence_equals_what_softprompt_feeds(tmp_path, loaded_all, arch, template):
    """Whole-sequence embeds == softprompt's plain path for the same input ([head][virtual
    tokens][text]), the text through the model's own embedding layer; the prompt's rows sit
    right after the head."""
    loaded = loaded_all[arch]
    fmt = PromptFormat(template=template)
    folder, prompt = _saved(tmp_path, loaded, fmt)
    dep = Deployment.load(folder, loaded)
    text = "the movie was great"
    seq = dep.sequence_embeds(text)
    head, ids = encode_raw(loaded.tokenizer, fmt, text)
    want, mask = plain_rows(loaded.model, [ids], [prompt], [head])
    assert mask.all() and torch.equal(seq, want[0])
    at = len(head or [])
    assert torch.equal(seq[at : at + 3], prompt.embedding.detach())
    if arch == "gemma3":  # Gemma's sqrt(hidden) scale is in the text rows
        raw = loaded.model.get_input_embeddings().weight[torch.tensor(ids)]
        assert torch.allclose(seq[at + 3 :], raw * 16**0.5)
        assert not torch.allclose(seq[at + 3 :], raw)


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
@pytest.mark.parametrize("template", TEMPLATES[1:])
def test_sequence_through_inputs_embeds_generates_what_softprompt_generates(
    tmp_path, loaded_all, arch, template
):
    """Feeding the payload (decoded as vLLM does) via inputs_embeds gives the logits and the
    greedy answer of softprompt's own generate path (compiled prefix)."""
    from softprompt.config import GenerateConfig
    from softprompt.generation import generate_ids, generation_config

    loaded = loaded_all[arch]
    fmt = PromptFormat(template=template)
    folder, prompt = _saved(tmp_path, loaded, fmt, seed=3)
    dep = Deployment.load(folder, loaded)
    text = "i love this phone"
    body = dep.completions_body(text, model="m", max_tokens=8, temperature=0)
    seq = vllm_load(body["prompt_embeds"])
    model, tok = loaded.model, loaded.tokenizer
    with torch.no_grad():
        logits = model(inputs_embeds=seq[None]).logits[0, -1]
    cfg = GenerateConfig(max_new_tokens=8)
    head, ids = encode_raw(tok, fmt, text)
    gen = generation_config(tok, cfg)
    gen.output_logits, gen.return_dict_in_generate = True, True
    ours = generate_ids(model, [ids], [prompt], gen, heads=[head])  # compiled prefix
    assert torch.allclose(logits, ours.logits[0][0], atol=1e-5)
    with torch.no_grad():
        mask = torch.ones(1, len(seq), dtype=torch.long)
        new = model.generate(
            inputs_embeds=seq[None],
            attention_mask=mask,
            generation_config=generation_config(tok, cfg),
        )
    answer = tok.decode(new[0], skip_special_tokens=True).lstrip()
    assert answer == generate(loaded, [text], prompt, cfg, fmt=fmt)[0]


@pytest.mark.parametrize("dtype", list(DTYPES))
def test_completions_body_decodes_bit_exact(tmp_path, loaded_all, dtype):
    loaded = loaded_all["gemma3"]
    folder, _ = _saved(tmp_path, loaded, PromptFormat(template=TEMPLATES[2]))
    dep = Deployment.load(folder, loaded)
    body = dep.completions_body("boring book", model="google/gemma-3-270m", dtype=dtype,
                                max_tokens=4)  # fmt: skip
    assert body["model"] == "google/gemma-3-270m" and body["max_tokens"] == 4
    assert body["stop_token_ids"] == [loaded.tokenizer.eos_token_id]
    got = vllm_load(body["prompt_embeds"])
    assert got.dtype == DTYPES[dtype]
    assert torch.equal(got, dep.sequence_embeds("boring book").to(DTYPES[dtype]))


def test_sglang_body_decodes_bit_exact(tmp_path, loaded_all):
    loaded = loaded_all["gemma3"]
    folder, prompt = _saved(tmp_path, loaded, PromptFormat(template=TEMPLATES[2]))
    dep = Deployment.load(folder, loaded)
    body = dep.sglang_body("boring book", max_new_tokens=4, temperature=0)
    assert body["sampling_params"]["max_new_tokens"] == 4
    got = sglang_load(body)
    assert got.dtype == torch.float32
    assert torch.equal(got, dep.sequence_embeds("boring book"))
    head, _ = encode_raw(loaded.tokenizer, dep.fmt, "boring book")
    assert torch.equal(got[len(head) : len(head) + 3], prompt.embedding.detach())


def test_model_loaded_on_first_need(tmp_path, loaded_all):
    """Without a loaded model the helper loads the one the prompt names, and checks it."""
    folder, _ = _saved(tmp_path, loaded_all["llama"], PromptFormat(template=TEMPLATES[1]))
    dep = Deployment.load(folder)
    assert dep.loaded is None
    seq = dep.sequence_embeds("good")
    assert dep.loaded is not None and seq.shape[1] == 16
    assert torch.equal(seq, Deployment.load(folder, loaded_all["llama"]).sequence_embeds("good"))


# --- placement on chat models -------------------------------------------------------------


def test_after_system_chat_prompt(tmp_path, chat):
    """A chat prompt placed after the system message: the whole sequence puts its rows right
    after the system text (as training did) and generates what softprompt generates; the
    Chat Completions body carries the rows as a content part closing the system message."""
    fmt = PromptFormat(chat=True, position="after-system", system=SYSTEM)
    folder, prompt = _saved(tmp_path, chat, fmt)
    dep = Deployment.load(folder, chat)
    messages = [{"role": "user", "content": "the food was awful"}]
    head, ids = encode_chat(chat.tokenizer, fmt, messages)
    assert chat.tokenizer.decode(head).endswith(SYSTEM)
    seq = vllm_load(dep.completions_body(messages, model="m")["prompt_embeds"])
    want, _ = plain_rows(chat.model, [ids], [prompt], [head])
    assert torch.equal(seq, want[0])
    assert torch.equal(seq[len(head) : len(head) + 3], prompt.embedding.detach())
    assert dep.stop_token_ids() == fmt.stop_ids(chat.tokenizer)
    # a plain string is one user message
    assert torch.equal(dep.sequence_embeds("the food was awful"), seq)
    with torch.no_grad():
        new = chat.model.generate(inputs_embeds=seq[None], max_new_tokens=6, do_sample=False,
                                  eos_token_id=fmt.stop_ids(chat.tokenizer),
                                  pad_token_id=chat.tokenizer.pad_token_id)  # fmt: skip
    answer = chat.tokenizer.decode(new[0], skip_special_tokens=True).lstrip()
    from softprompt.config import GenerateConfig

    assert answer == generate_chat(chat, [messages], prompt, GenerateConfig(max_new_tokens=6),
                                   fmt)[0]  # fmt: skip

    body = dep.chat_body(messages, model="m", max_tokens=6)
    system, user = body["messages"]
    assert user == messages[0] and system["role"] == "system"
    text, part = system["content"]
    assert text == {"type": "text", "text": SYSTEM} and part["type"] == "prompt_embeds"
    assert torch.equal(vllm_load(part["data"]), prompt.embedding.detach())
    # vLLM renders string-content templates with the message's parts joined by "\n" and the
    # part as a placeholder token (vllm's _parse_chat_message_content_parts): the rows land
    # after the system text and that one newline.
    joined = [{**system, "content": SYSTEM + "\n" + "\x02"}, user]
    rendered = chat.tokenizer.apply_chat_template(joined, tokenize=False,
                                                  add_generation_prompt=True)  # fmt: skip
    before = rendered[: rendered.index("\x02")]
    assert before == fmt.chat_text(chat.tokenizer, messages, generate=True).head + "\n"


@pytest.mark.parametrize(
    "fmt",
    [
        PromptFormat(template="review : {input}"),
        PromptFormat(chat=True, position="before-user"),
        PromptFormat(chat=True),
    ],  # fmt: skip
)
def test_chat_body_refuses_placements_a_part_cannot_express(tmp_path, chat, fmt):
    folder, _ = _saved(tmp_path, chat, fmt)
    with pytest.raises(ConfigError, match="completions_body"):
        Deployment.load(folder, chat).chat_body([{"role": "user", "content": "good"}], "m")


# --- `softprompt export` --------------------------------------------------------------


def test_export_vllm_sglang_numpy(tmp_path, loaded_all, capsys):
    folder, prompt = _saved(tmp_path, loaded_all["llama"], PromptFormat(template=TEMPLATES[2]))
    rows = prompt.embedding.detach()
    assert main(["export", str(folder), "--to", "vllm", "--output", str(tmp_path / "v"),
                 "--dtype", "bfloat16"]) == 0  # fmt: skip
    info = json.loads(capsys.readouterr().out)
    assert info["engine"] == "vllm" and info["shape"] == [3, 16] and info["dtype"] == "bfloat16"
    assert info["placement"] == "marker" and info["base_model"]["hidden_size"] == 16
    pt = torch.load(tmp_path / "v" / "prompt_embeds.pt", weights_only=True)
    assert torch.equal(pt, rows.to(torch.bfloat16))
    b64 = (tmp_path / "v" / "prompt_embeds.b64").read_text().strip()
    assert torch.equal(vllm_load(b64), rows.to(torch.bfloat16))

    run_export(ExportConfig(str(folder), to="sglang", output=str(tmp_path / "s")))
    floats = json.loads((tmp_path / "s" / "input_embeds.json").read_text())
    assert torch.equal(torch.tensor(floats), rows)
    assert json.loads((tmp_path / "s" / "deploy.json").read_text())["engine"] == "sglang"

    run_export(ExportConfig(str(folder), to="numpy", output=str(tmp_path / "n"), dtype="float16"))
    arr = np.load(tmp_path / "n" / "prompt_embeds.npy")
    assert arr.dtype == np.float16 and np.array_equal(arr, rows.half().numpy())


def test_export_errors(tmp_path, loaded_all, capsys):
    folder, _ = _saved(tmp_path, loaded_all["llama"])
    with pytest.raises(ConfigError, match="numpy cannot hold bfloat16"):
        ExportConfig(str(folder), to="numpy", output="x", dtype="bfloat16")
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep")
    assert main(["export", str(folder), "--output", str(tmp_path / "mine")]) == 2
    assert "did not write" in capsys.readouterr().err
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep"
    assert main(["export", str(tmp_path / "nothing"), "--output", str(tmp_path / "o")]) == 2
    assert "holds no saved prompt" in capsys.readouterr().err
    run_export(ExportConfig(str(folder), output=str(tmp_path / "o")))
    with pytest.raises(ConfigError):  # an export is there: --overwrite replaces it
        run_export(ExportConfig(str(folder), output=str(tmp_path / "o")))
    run_export(ExportConfig(str(folder), output=str(tmp_path / "o"), overwrite=True))


def test_export_help(capsys):
    with pytest.raises(SystemExit):
        main(["export", "--help"])
    out = capsys.readouterr().out
    assert "{vllm,sglang,numpy}" in out and "--dtype {float32,bfloat16,float16}" in out
    assert "softprompt export runs/sentiment --to vllm" in out
