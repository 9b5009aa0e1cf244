"""Settings of the commands that use a trained prompt: generate, inspect, serve, export, push."""

from __future__ import annotations

import os
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from softprompt.config.base import (
    MAX_BATCH_WAIT_MS,
    MIN_TEMPERATURE,
    ModelConfig,
    check_choice,
    check_finite,
    nested,
    opt,
    prompt_model,
)
from softprompt.errors import ConfigError
from softprompt.templates import template_fields

ExportTarget = Literal["vllm", "sglang", "numpy"]
ExportDtype = Literal["float32", "bfloat16", "float16"]


@dataclass
class GenerateConfig:
    """Sampling settings of `softprompt generate` (and of ``softprompt.generate``)."""

    max_new_tokens: int = opt(32, "Most tokens to generate per input.")
    temperature: float = opt(0.0, "Sampling temperature; 0 means greedy decoding.")
    top_p: float = opt(1.0, "Nucleus sampling: keep the smallest set of tokens with this mass.")
    repetition_penalty: float = opt(1.0, "Above 1 discourages repeating tokens (1 = off).")
    seed: int = opt(0, "Seed for sampling.")
    batch_size: int = opt(8, "Inputs generated together.")

    def __post_init__(self) -> None:
        check_finite(self)
        if self.max_new_tokens < 1:
            raise ConfigError("--max-new-tokens must be at least 1")
        if self.temperature < 0 or 0 < self.temperature < MIN_TEMPERATURE:
            raise ConfigError(
                f"--temperature must be 0 (greedy) or at least {MIN_TEMPERATURE} (a smaller one "
                "divides the scores into inf)"
            )
        if not 0.0 < self.top_p <= 1.0:
            raise ConfigError("--top-p must be in (0, 1]")
        if self.repetition_penalty <= 0:
            raise ConfigError("--repetition-penalty must be positive")
        if self.batch_size < 1:
            raise ConfigError("--batch-size must be at least 1")


@dataclass
class GenerateRunConfig:
    """Everything `softprompt generate` needs: inputs, an optional prompt, sampling."""

    texts: list[str] = opt([], "inputs to continue", positional=True, metavar="TEXT")
    prompt: str | None = opt(
        None, "folder of a trained prompt (ours or a PEFT adapter), or hf:owner/name on the Hub"
    )
    compare: bool = opt(False, "print the base model's output beside the tuned one's")
    file: str | None = opt(None, "also read inputs from a data file (its input field)")
    input_field: str | None = opt(
        None, "field of --file holding the inputs (default: the prompt's, or 'input')"
    )
    limit: int | None = opt(None, "use only the first N rows of --file")
    template: str | None = opt(
        None,
        "template for the inputs (default: the one the prompt was trained with)",
        escapes=True,
    )
    no_template: bool = opt(False, "use the inputs as they are")
    field: list[str] = opt(
        [],
        "NAME=VALUE for a field of the template other than the input (repeat for several); "
        "with --file the records' own fields are used too",
        metavar="NAME=VALUE",
    )
    chat: bool = opt(
        False,
        "treat each TEXT as a user message and render it with the chat template (automatic for "
        'a prompt trained on conversations); --file may hold {"messages": [...]} records',
    )
    system: str | None = opt(
        None,
        "with --chat: the system message (default: the prompt's, else the template's own)",
        escapes=True,
    )
    allow_mismatch: bool = opt(False, "load a prompt even if it was trained for another base model")
    free_text: bool = opt(
        False,
        "a prompt trained on labels (classification mode) answers with its label and stops "
        "there; keep generating after the label instead",
    )
    model: ModelConfig = nested(
        prompt_model,
        only=("dtype", "quantize", "trust_remote_code", "model", "task", "pooling"),
        help={
            "model": ModelConfig.__dataclass_fields__["model"].metadata["help"]
            + " Default: the model --prompt was trained on, else 'embedded'."
        },
    )
    sampling: GenerateConfig = nested(GenerateConfig)

    def __post_init__(self) -> None:
        check_finite(self)
        if self.compare and not self.prompt:
            raise ConfigError("--compare needs --prompt DIR (the tuned prompt to compare)")
        if self.limit is not None and self.limit < 1:
            raise ConfigError("--limit must be at least 1")
        if self.template is not None:
            template_fields(self.template)


@dataclass
class InspectConfig:
    """Everything `softprompt inspect` needs."""

    prompt_dir: str = opt(
        "", "folder of a trained prompt, or hf:owner/name", positional=True, metavar="DIR"
    )
    top_k: int = opt(5, "nearest tokens shown")
    similar: str | None = opt(
        None,
        "instead: rank the saved prompts under this folder by the cosine similarity of their "
        "mean embedding with DIR's (a prompt library, see `train --init library:DIR`)",
        metavar="LIBRARY",
    )
    model: ModelConfig = nested(
        prompt_model, only=("model",), help={"model": "base model (default: the prompt's own)"}
    )

    def __post_init__(self) -> None:
        check_finite(self)
        if self.top_k < 1:
            raise ConfigError("--top-k must be at least 1")
        if self.similar is not None and not Path(self.similar).is_dir():
            raise ConfigError(f"--similar {self.similar}: no such folder")


@dataclass
class ServeConfig:
    """Settings of `softprompt serve`."""

    prompts: str = opt(
        "",
        "Folder of saved prompts, one sub-folder each; the sub-folder's name is the prompt's "
        "model name in the API.",
        required=True,
    )
    model: ModelConfig = nested(
        prompt_model,
        only=("model", "dtype", "quantize"),
        help={
            "model": "Base model (a hub id, folder, .gguf or 'embedded'). Default: the model "
            "the prompts were trained on, else 'embedded'.",
            "dtype": "Precision of the base model's weights.",
        },
    )
    host: str = opt("127.0.0.1", "Address to listen on (0.0.0.0 accepts other machines).")
    port: int = opt(8000, "Port to listen on.")
    max_batch_size: int = opt(16, "Most rows generated together; also most prompts per request.")
    batch_wait_ms: float = opt(5.0, "How long a batch waits for more requests, in milliseconds.")
    max_prompt_tokens: int = opt(2048, "Longest input accepted (virtual tokens included).")
    max_tokens: int = opt(512, "Largest max_tokens a request may ask for.")
    temperature: float = opt(
        0.0,
        "Temperature of a request that names none: 0 (greedy) answers as `softprompt generate` "
        "does; OpenAI's API samples at 1 by default (--temperature 1 for that). A request's "
        "own temperature always wins.",
    )
    max_queue: int = opt(256, "Most rows waiting; requests beyond it get 429.")
    allow_mismatch: bool = opt(False, "Load prompts trained for another base model.")
    api_key: str | None = opt(
        None,
        "Require `Authorization: Bearer KEY` (what the openai client sends) on every route but "
        "/health. Default: $SOFTPROMPT_API_KEY when set. Needed to listen beyond this machine.",
    )
    no_admin: bool = opt(False, "Turn off the admin routes (/v1/prompts/NAME, /v1/rescan).")
    insecure: bool = opt(
        False, "Allow a --host other than this machine without --api-key (a trusted network only)."
    )
    max_request_bytes: int = opt(
        1 << 20, "Largest request body accepted; a larger one gets 413 before it is read."
    )

    def __post_init__(self) -> None:
        check_finite(self)
        for flag in ("port", "max_batch_size", "max_prompt_tokens", "max_tokens", "max_queue",
                     "max_request_bytes"):  # fmt: skip
            if getattr(self, flag) < (0 if flag == "port" else 1):
                raise ConfigError(f"--{flag.replace('_', '-')} must be positive")
        if not 0 <= self.batch_wait_ms <= MAX_BATCH_WAIT_MS:
            raise ConfigError(
                f"--batch-wait-ms must be 0 to {MAX_BATCH_WAIT_MS:g} (ms), not {self.batch_wait_ms}"
            )
        if self.port > 65535:
            raise ConfigError(f"--port must be 0 to 65535, not {self.port}")
        if not (self.temperature == 0 or MIN_TEMPERATURE <= self.temperature <= 2):
            raise ConfigError(f"--temperature must be 0 (greedy) or {MIN_TEMPERATURE} to 2, "
                              f"not {self.temperature}")  # fmt: skip
        if self.api_key is None:
            self.api_key = os.environ.get("SOFTPROMPT_API_KEY") or None
        loopback = self.host in ("127.0.0.1", "localhost", "::1") or self.host.startswith("127.")
        if not loopback and not self.api_key and not self.insecure:
            raise ConfigError(
                f"--host {self.host} lets other machines in: give --api-key KEY (or set "
                "SOFTPROMPT_API_KEY), or pass --insecure if this network is trusted"
            )


@dataclass
class ExportConfig:
    """Everything `softprompt export` needs."""

    prompt_dir: str = opt(
        "", "folder of a trained prompt, or hf:owner/name", positional=True, metavar="DIR"
    )
    to: ExportTarget = opt(
        "vllm",
        "engine: vllm (prompt_embeds.pt and its base64 text for a prompt_embeds content part), "
        "sglang (input_embeds.json: JSON floats) or numpy (prompt_embeds.npy)",
    )
    output: str = opt("", "folder to write (new or empty)", required=True)
    dtype: ExportDtype = opt(
        "float32", "precision of the exported rows (numpy has no bfloat16: float32 or float16)"
    )
    overwrite: bool = opt(False, "replace an earlier export in --output (only its own files)")

    def __post_init__(self) -> None:
        check_finite(self)
        check_choice(self.to, typing.get_args(ExportTarget), "--to")
        check_choice(self.dtype, typing.get_args(ExportDtype), "--dtype")
        if not self.output:
            raise ConfigError("--output is required: the folder to write the export to")
        if self.to == "numpy" and self.dtype == "bfloat16":
            raise ConfigError("--to numpy cannot hold bfloat16; use --dtype float32 or float16")


@dataclass
class PushConfig:
    """Everything `softprompt push` needs."""

    prompt_dir: str = opt("", "folder of a trained prompt", positional=True, metavar="DIR")
    repo_id: str = opt(
        "", "Hugging Face Hub repository, owner/name (created if needed)", positional=True,
        metavar="REPO_ID",
    )  # fmt: skip
    private: bool = opt(False, "create the repository as private")
    token: str | None = opt(
        None, "Hub token (default: the one `hf auth login` saved, or $HF_TOKEN)"
    )
    message: str | None = opt(None, "commit message (default: 'softprompt push DIR')")

    def __post_init__(self) -> None:
        check_finite(self)
        parts = self.repo_id.split("/")
        if len(parts) != 2 or not all(parts) or self.repo_id.startswith("hf:"):
            raise ConfigError(f"REPO_ID {self.repo_id!r}: write owner/name, e.g. me/sentiment")
