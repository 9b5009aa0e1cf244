"""Save and load a trained prompt as a self-describing folder.

- ``adapter_config.json`` + ``adapter_model.safetensors``: PEFT's PROMPT_TUNING format (one
  tensor, ``prompt_embeddings``, shape (N, H)), so ``PeftModel.from_pretrained`` loads it;
  for an encoder-decoder PEFT's SEQ_2_SEQ_LM layout ((2N, H): two rows per virtual token, of
  which prompt tuning uses the first N), for a classifier SEQ_CLS (the head's tensors beside
  the prompt, under PEFT's names ``base_model.classifier.*``);
- ``softprompt.json``: the base model's identity (with a fingerprint of its embedding
  matrix), data, hyperparameters, template and final metrics.

Only safetensors and JSON are ever read: never pickle. Every file is written to a
temporary name and renamed, so a reader never sees half a file.
"""

from __future__ import annotations

import functools
import hashlib
import json
import re
import time
from pathlib import Path

import torch
from pydantic import BaseModel, ConfigDict, ValidationError
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from softprompt import __version__, kinds
from softprompt.console import say
from softprompt.errors import ArtifactError, ConfigError, SoftpromptError, first_line
from softprompt.outputs import atomic_write, write_json
from softprompt.prefix import check_layout, kv_layout
from softprompt.prompt import DeepPrompt, SoftPrompt
from softprompt.quantize import quantization
from softprompt.templates import PromptFormat, template_fields

PROMPT_KEY = "prompt_embeddings"
# PEFT adapters softprompt loads: a prompt, P-tuning's saved prompt, a deep prefix
PROMPT_TYPES = ("PROMPT_TUNING", "P_TUNING", "PREFIX_TUNING")
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
META = "softprompt.json"
INITIAL = "initial_prompt.safetensors"  # the starting point, for drift and inspection
HUB_PREFIX = "hf:"  # hf:owner/name[@revision]: a prompt folder on the Hugging Face Hub
PROMPT_FILES = [ADAPTER_CONFIG, ADAPTER_WEIGHTS, META, INITIAL, "metrics.jsonl", "loss.png",
                "README.md"]  # fmt: skip
ENSEMBLE_INDEX = "ensemble.json"  # an ensemble run's members (train --ensemble K)
# The embedded model is a quantized copy of this hub model; PEFT users load it by this id.
EMBEDDED_HUB_IDS = {"embedded": "google/gemma-3-270m",
                    "embedded-chat": "HuggingFaceTB/SmolLM2-135M-Instruct",
                    "embedded-encoder": "sentence-transformers/all-MiniLM-L6-v2"}  # fmt: skip


def fingerprint(model: nn.Module) -> str:
    """A short hash of 16 fixed rows of the input embedding matrix, rounded to bfloat16 so the
    same weights give the same fingerprint whether loaded in float32 or bfloat16."""
    weight = model.get_input_embeddings().weight.detach()
    rows = torch.linspace(0, weight.shape[0] - 1, 16).long()
    sample = weight[rows.to(weight.device)].to(torch.bfloat16).view(torch.int16).cpu()
    return hashlib.sha256(sample.numpy().tobytes()).hexdigest()[:16]


def base_identity(model: nn.Module, name: str) -> dict:
    """What a prompt needs to know about the model it was trained on."""
    config = model.config
    return {
        "name": name,
        "architecture": (config.architectures or [type(model).__name__])[0],
        "model_type": config.model_type,
        "hidden_size": model.get_input_embeddings().weight.shape[1],
        "vocab_size": model.get_input_embeddings().weight.shape[0],
        "fingerprint": fingerprint(model),
        "quantization": quantization(model),  # --quantize: the layers it ran through
    }


def save_prompt(
    folder: str | Path,
    prompt: SoftPrompt,
    model: nn.Module,
    name: str,
    meta: dict | None = None,
    initial: torch.Tensor | None = None,
) -> Path:
    """Write the PEFT files and softprompt.json for ``prompt`` trained on ``model``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    config = model.config
    hub_name = EMBEDDED_HUB_IDS.get(name, name)
    kind = kinds.of_model(model)
    adapter = {
        "task_type": kind.peft_task_type,
        "peft_type": "PROMPT_TUNING",
        "auto_mapping": None,
        "base_model_name_or_path": hub_name,
        "revision": None,
        "inference_mode": True,
        "num_virtual_tokens": prompt.num_virtual_tokens,
        "token_dim": prompt.hidden_size,
        "num_attention_heads": _config_int(config, "num_attention_heads", "n_head", "num_heads"),
        "num_layers": _config_int(config, "num_hidden_layers", "n_layer", "num_layers"),
        "prompt_tuning_init": "RANDOM",
        "prompt_tuning_init_text": None,
        "tokenizer_name_or_path": hub_name,
        "tokenizer_kwargs": None,
        **kind.adapter_fields(model),  # num_transformer_submodules, modules_to_save
    }
    if isinstance(prompt, DeepPrompt):  # PEFT's PREFIX_TUNING: keys/values per layer
        layers, heads, dim = prompt.layout
        for gone in ("prompt_tuning_init", "prompt_tuning_init_text", "tokenizer_name_or_path",
                     "tokenizer_kwargs"):  # fmt: skip
            adapter.pop(gone)
        rows, saved = kind.saved_deep(prompt.embedding.detach().float().cpu(), layers)
        adapter.update(peft_type="PREFIX_TUNING", token_dim=heads * dim, num_attention_heads=heads,
                       num_layers=saved, encoder_hidden_size=heads * dim,
                       prefix_projection=False)  # fmt: skip
        meta = {**(meta or {}), "deep_layers": layers}  # PEFT's num_layers may differ (seq2seq)
    else:
        rows = kind.saved_rows(prompt.embedding.detach().float().cpu())
    weights = {PROMPT_KEY: rows.contiguous(), **kind.extra_tensors(model)}
    full_meta = {
        "format": "softprompt/1",
        "softprompt_version": __version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "base_model": base_identity(model, name),
        "num_virtual_tokens": prompt.num_virtual_tokens,
        **kind.saved_meta(model),  # a classifier's pooling
        **(meta or {}),
    }
    atomic_write(folder / ADAPTER_WEIGHTS, lambda p: save_file(weights, str(p)))
    write_json(folder / ADAPTER_CONFIG, adapter)
    write_json(folder / META, full_meta)
    if initial is not None:
        start = {PROMPT_KEY: initial.detach().float().cpu().contiguous()}
        atomic_write(folder / INITIAL, lambda p: save_file(start, str(p)))
    return folder


def _config_int(config, *names: str) -> int:
    """The first of ``names`` the config (or its text config) sets, else 1. PEFT reads these
    for prompt tuning only to fill its config, and refuses to load one where they are null
    (a state-space model such as Mamba has no attention heads)."""
    for source in (config, getattr(config, "text_config", None)):
        for name in names:
            value = getattr(source, name, None)
            if isinstance(value, int) and not isinstance(value, bool):
                return value
    return 1


class _Loose(BaseModel):
    model_config = ConfigDict(extra="allow")  # newer versions may add keys


class _BaseModelInfo(_Loose):
    name: str | None = None
    architecture: str | None = None
    model_type: str | None = None
    hidden_size: int | None = None
    vocab_size: int | None = None
    fingerprint: str | None = None
    quantization: str | None = None


class _ChoicesInfo(_Loose):
    requested: str | None = None
    used: list[str] | None = None


class MetaFile(_Loose):
    """The shape of softprompt.json (what is read from it)."""

    base_model: _BaseModelInfo | None = None
    num_virtual_tokens: int | None = None
    template: str | None = None
    target_delimiter: str | None = None
    prompt_format: dict | None = None
    data: dict | None = None
    prompt: dict | None = None
    training: dict | None = None
    metrics: dict | None = None
    task: str | None = None
    choices: _ChoicesInfo | None = None
    pooling: str | None = None  # a classifier's head (kinds.classify checks the value)


class AdapterFile(_Loose):
    """The shape of PEFT's adapter_config.json (what is read from it)."""

    peft_type: str = "PROMPT_TUNING"
    task_type: str | None = None
    num_virtual_tokens: int | None = None
    token_dim: int | None = None
    num_transformer_submodules: int | None = None
    base_model_name_or_path: str | None = None


def _read_checked(path: Path, schema: type[BaseModel]) -> dict:
    """A JSON file that must have ``schema``'s shape; else one ArtifactError saying where."""
    data = _read_json(path)
    if not isinstance(data, dict):
        raise ArtifactError(f"{path} holds a JSON {type(data).__name__}, not an object; "
                            "retrain or re-copy the prompt")  # fmt: skip
    try:
        schema.model_validate(data)
    except ValidationError as err:
        first = err.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise ArtifactError(
            f"{path}: {where}: {first['msg']}; retrain or re-copy the prompt"
        ) from None
    return data


def resolve_prompt_dir(ref: str | Path) -> Path:
    """A prompt folder: a local path as it is, or ``hf:owner/name[@revision]`` downloaded
    from the Hugging Face Hub (only the prompt's files; from the local cache when offline)."""
    text = str(ref)
    if not text.startswith(HUB_PREFIX):
        return Path(ref)
    repo, _, revision = text[len(HUB_PREFIX) :].partition("@")
    check_hub_name(repo, revision, text)
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    try:
        return _download(repo, revision or None)
    except LocalEntryNotFoundError:
        raise ArtifactError(
            f"{text} is not in the local Hugging Face cache and the Hub cannot be reached "
            "(offline, or HF_HUB_OFFLINE=1); connect once to download it"
        ) from None
    except (HfHubHTTPError, OSError, ValueError) as err:
        first = first_line(err)
        raise ArtifactError(f"cannot download {text} from the Hugging Face Hub: {first}") from None


HUB_PART = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,95}")  # an owner, a name, a branch part


def check_hub_name(repo: str, revision: str = "", shown: str = "") -> None:
    """Refuse a Hub id or revision that could name anything but one repo's revision (the
    cache joins them into paths: ``@../../x`` would leave it)."""
    parts, rev = repo.split("/"), revision.split("/") if revision else []
    if len(parts) != 2 or not all(HUB_PART.fullmatch(p) and ".." not in p for p in parts):
        raise ConfigError(f"{shown or repo}: write hf:owner/name (optionally @revision), with "
                          "letters, digits, '.', '_' and '-' only")  # fmt: skip
    if len(revision) > 200 or not all(HUB_PART.fullmatch(p) and ".." not in p for p in rev):
        raise ConfigError(f"{shown or repo}: the revision {revision!r} must be a branch, tag or "
                          "commit (letters, digits, '.', '_', '-', '/'; no '..')")  # fmt: skip


@functools.lru_cache(maxsize=32)  # one command reads a prompt's folder several times
def _download(repo: str, revision: str | None) -> Path:
    from huggingface_hub import snapshot_download

    return Path(snapshot_download(repo, revision=revision, allow_patterns=PROMPT_FILES))


def read_meta(folder: str | Path) -> dict:
    """softprompt.json of a saved prompt (checked: its shape, template and format), or {} for
    a plain PEFT adapter."""
    path = resolve_prompt_dir(folder) / META
    if not path.exists():
        return {}
    meta = _read_checked(path, MetaFile)
    try:
        if meta.get("template") is not None:
            template_fields(meta["template"], flag=f"{path}: the saved template")
        PromptFormat.from_meta(meta).check()
    except ConfigError as err:
        raise ArtifactError(err.cli_message) from None
    return meta


def trained_choices(meta: dict) -> list[str] | None:
    """The labels a prompt was trained to choose between (classification mode), or None."""
    used = (meta.get("choices") or {}).get("used") or []
    return [str(c) for c in used if str(c).strip()] or None


def load_prompt(
    folder: str | Path, model: nn.Module | None = None, allow_mismatch: bool = False
) -> tuple[SoftPrompt, dict]:
    """Load a prompt (ours or PEFT's; a folder or ``hf:owner/name``) and check it fits
    ``model``; returns (prompt, meta)."""
    folder = resolve_prompt_dir(folder)
    if not (folder / ADAPTER_WEIGHTS).is_file():
        raise ArtifactError(
            f"{folder} holds no saved prompt ({ADAPTER_WEIGHTS} missing); give the --output "
            "folder of a `softprompt train` run or a PEFT prompt-tuning adapter"
        )
    adapter = (
        _read_checked(folder / ADAPTER_CONFIG, AdapterFile)
        if (folder / ADAPTER_CONFIG).exists()
        else {}
    )
    peft_type = adapter.get("peft_type", "PROMPT_TUNING")
    if peft_type not in PROMPT_TYPES:
        raise ArtifactError(f"{folder} is a PEFT {peft_type} adapter, not prompt tuning, "
                            "P-tuning or prefix tuning")  # fmt: skip
    try:
        tensors = load_file(str(folder / ADAPTER_WEIGHTS))
    except (SafetensorError, OSError, ValueError) as err:
        raise ArtifactError(
            f"{folder / ADAPTER_WEIGHTS} is corrupt ({err}); retrain or re-copy it"
        ) from None
    if PROMPT_KEY not in tensors or tensors[PROMPT_KEY].ndim != 2:
        raise ArtifactError(f"{folder / ADAPTER_WEIGHTS} has no 2-D tensor {PROMPT_KEY!r}")
    meta = read_meta(folder)
    meta.setdefault("base_model", {"name": adapter.get("base_model_name_or_path")})
    rows = tensors[PROMPT_KEY]
    _check_rows(rows, folder / ADAPTER_WEIGHTS)
    n = adapter.get("num_virtual_tokens") or meta.get("num_virtual_tokens")
    saved_kind = kinds.for_task_type(adapter.get("task_type"))
    if peft_type == "PREFIX_TUNING":
        prompt = _deep_prompt(rows, adapter, folder, saved_kind, _deep_layers(meta, adapter, model))
    else:  # PROMPT_TUNING, or P_TUNING: PEFT saves its encoder's output, a plain prompt
        if saved_kind is not None:
            rows = saved_kind.loaded_rows(rows, n)
        prompt = SoftPrompt(rows)
    if model is not None:
        kind = kinds.of_model(model)
        if saved_kind not in (None, kind):
            raise ArtifactError(
                f"{folder} is a {adapter['task_type']} prompt, but the model is loaded as "
                f"{kind.name}: load the model it was trained for (or give --task)"
            )
        check_fits(prompt, meta, model, folder, allow_mismatch)
        kind.load_extra(model, tensors, meta, str(folder / ADAPTER_WEIGHTS))  # a classifier's head
    return prompt, meta


def _deep_prompt(rows: torch.Tensor, adapter: dict, folder: Path, kind,
                 layers: int | None) -> DeepPrompt:  # fmt: skip
    """A PREFIX_TUNING tensor as a ``DeepPrompt``, its layout from adapter_config.json (PEFT
    saves a projected prefix as the projection's output: the same tensor), read per layer
    as the kind stores it (``Kind.loaded_deep``) for a model of ``layers`` layers."""
    heads, width = adapter.get("num_attention_heads"), adapter.get("token_dim")
    saved = adapter.get("num_layers")
    if not all(isinstance(v, int) and v > 0 for v in (heads, width, saved)) or width % heads:
        raise ArtifactError(f"{folder / ADAPTER_CONFIG}: a prefix-tuning adapter needs "
                            "num_layers, num_attention_heads and token_dim")  # fmt: skip
    try:
        if kind is not None and rows.ndim == 2 and rows.shape[1] == saved * 2 * width:
            rows, saved = kind.loaded_deep(rows, saved, layers)
        return DeepPrompt(rows, saved, heads, width // heads)
    except SoftpromptError as err:
        raise ArtifactError(f"{folder / ADAPTER_WEIGHTS}: {err}") from None


def _deep_layers(meta: dict, adapter: dict, model: nn.Module | None) -> int | None:
    """The layer count a deep prompt was made for: softprompt.json's, else (a PEFT-saved
    seq2seq prefix, whose num_layers may be one more) the model's, where it fits."""
    layers = meta.get("deep_layers")
    if isinstance(layers, int) and layers > 0:
        return layers
    saved = adapter.get("num_layers")
    if model is None:
        return None
    try:
        layers = kv_layout(model)[0]
    except ConfigError:
        return None
    return layers if isinstance(saved, int) and layers in (saved, saved - 1) else None


def _check_rows(rows: torch.Tensor, path: Path) -> None:
    """A prompt every request could use: at least one row, every value a finite number."""
    if rows.shape[0] == 0 or rows.shape[1] == 0:
        raise ArtifactError(f"{path} holds an empty prompt (shape {tuple(rows.shape)})")
    if not rows.is_floating_point() or not torch.isfinite(rows).all():
        raise ArtifactError(
            f"{path} holds values that are not finite numbers (NaN or inf); retrain the prompt"
        )


def check_fits(
    prompt: SoftPrompt, meta: dict, model: nn.Module, folder: Path, allow_mismatch: bool = False
) -> None:
    """Refuse a prompt trained for another base model, with a message that says which."""
    trained_on = meta.get("base_model", {})
    hidden = model.get_input_embeddings().weight.shape[1]
    was = trained_on.get("name") or "an unknown model"
    if isinstance(prompt, DeepPrompt):
        try:
            check_layout(model, prompt)
        except ConfigError as err:
            raise ArtifactError(f"prompt {folder}: {err.cli_message}; it was trained for "
                                f"{was}: load that model with --model") from None  # fmt: skip
    elif prompt.hidden_size != hidden:
        raise ArtifactError(
            f"prompt {folder} has width {prompt.hidden_size} but this model's embeddings have "
            f"{hidden}: it was trained for {was}; load that model with --model"
        )
    expected = trained_on.get("fingerprint")
    if expected and not allow_mismatch and expected != fingerprint(model):
        raise ArtifactError(
            f"prompt {folder} was trained for {was} (embedding fingerprint {expected}), not this "
            "model; load that model with --model, or pass --allow-mismatch to use it anyway"
        )
    trained_q, now_q = trained_on.get("quantization"), quantization(model)
    if trained_q != now_q:  # the same weights, stored otherwise: allowed, in one line
        was_q, is_q = (f"{q}-quantized" if q else "unquantized" for q in (trained_q, now_q))
        say(f"note: prompt {folder.name} was trained on the {was_q} base; this one is {is_q} "
            "(outputs may differ slightly)")  # fmt: skip


def trained_base_model(folder: str | Path) -> str | None:
    """The base model a saved prompt names (softprompt.json, else PEFT's adapter_config.json)."""
    folder = resolve_prompt_dir(folder)
    name = read_meta(folder).get("base_model", {}).get("name")
    if name is None and (folder / ADAPTER_CONFIG).exists():
        name = _read_checked(folder / ADAPTER_CONFIG, AdapterFile).get("base_model_name_or_path")
    return name


def _read_json(path: Path) -> dict:
    if path.is_dir():
        raise ArtifactError(f"{path} is a folder, not a JSON file; retrain or re-copy the prompt")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ArtifactError(f"{path} is corrupt ({err}); retrain or re-copy the prompt") from None
    except RecursionError:
        raise ArtifactError(
            f"{path}:1: the JSON is nested too deeply to read; retrain or re-copy the prompt"
        ) from None
    except OSError as err:
        raise ArtifactError(f"cannot read {path}: {err.strerror}") from None


def ensemble_members(folder: str | Path) -> list[Path] | None:
    """The member folders of an ensemble run's ``folder`` (None: not an ensemble)."""
    folder = Path(folder)
    index = folder / ENSEMBLE_INDEX
    if not index.is_file():
        return None
    try:
        members = json.loads(index.read_text(encoding="utf-8"))["members"]
    except (ValueError, KeyError, TypeError):
        raise ArtifactError(f"{index} is corrupt; retrain the ensemble") from None
    paths = [folder / str(m) for m in members]
    missing = [str(p) for p in paths if not (p / ADAPTER_WEIGHTS).is_file()]
    if missing or not paths:
        raise ArtifactError(f"{index} names members without a saved prompt: {', '.join(missing)}")
    return paths
