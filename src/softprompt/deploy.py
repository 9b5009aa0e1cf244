"""Payloads for engines that take embeddings instead of prompt adapters: vLLM and SGLang.

A soft prompt is N vectors in the space of what the model's embedding layer *returns*
(scaled for Gemma). Engines that accept embeddings take them in three shapes:

- vLLM Chat Completions (``vllm serve MODEL --enable-prompt-embeds``): a message content
  part ``{"type": "prompt_embeds", "data": B64}`` holding only the prompt's rows, spliced
  where the part sits in the rendered conversation;
- vLLM Completions: ``"prompt_embeds": B64`` holding the *whole* sequence's embeddings
  (head, virtual tokens and input, as softprompt builds them), so any placement is exact;
- SGLang's native ``/generate``: ``"input_embeds"``, the whole sequence as JSON floats.

``B64`` is base64 of ``torch.save(tensor)`` (fp32, bf16 or fp16, shape (seq, hidden)),
which vLLM reads back with ``torch.load(..., weights_only=True)``. ``Deployment`` builds
these bodies from a saved prompt; ``export`` writes the prompt's rows for each engine.
"""

from __future__ import annotations

import base64
import io
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from softprompt.artifacts import check_fits, load_prompt, trained_base_model
from softprompt.config import ModelConfig
from softprompt.errors import ConfigError
from softprompt.generation import plain_rows
from softprompt.loading import LoadedModel, load_model
from softprompt.prompt import DeepPrompt, SoftPrompt
from softprompt.rows import encode_chat, encode_raw
from softprompt.templates import PromptFormat

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# vLLM multiplies even `prompt_embeds` by sqrt(hidden) in these architectures' forward
# (Gemma 3 scales only token ids, in `embed_input_ids`, as transformers does).
VLLM_RESCALES = ("gemma", "gemma2")


def encode_tensor(tensor: Tensor) -> str:
    """base64 of ``torch.save(tensor)``: the ``data`` / ``prompt_embeds`` string vLLM takes."""
    buf = io.BytesIO()
    torch.save(tensor.detach().cpu().contiguous(), buf)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def decode_tensor(data: str) -> Tensor:
    """A payload read back as vLLM reads it: base64, then ``torch.load`` with
    ``weights_only=True`` onto the CPU (never pickle)."""
    raw = base64.b64decode(data, validate=True)
    return torch.load(io.BytesIO(raw), weights_only=True, map_location="cpu")


def _dtype(name: str) -> torch.dtype:
    if name not in DTYPES:
        raise ConfigError(f"--dtype must be one of {', '.join(DTYPES)}, not {name!r}")
    return DTYPES[name]


@dataclass
class Deployment:
    """A saved prompt made ready for an engine: its rows, its format, and (for the
    whole-sequence payloads) the base model whose embedding layer embeds the rest."""

    prompt: SoftPrompt
    fmt: PromptFormat
    meta: dict
    loaded: LoadedModel | None = None
    model_name: str | None = None  # loaded on first need: the model the prompt names
    folder: str = ""
    allow_mismatch: bool = False

    @classmethod
    def load(
        cls,
        folder: str | Path,
        loaded: LoadedModel | None = None,
        model: str | None = None,
        allow_mismatch: bool = False,
    ) -> Deployment:
        """Read a prompt folder. ``loaded`` (or ``model``, default: the model it was trained
        on) is only loaded when a whole-sequence payload is asked for."""
        prompt, meta = load_prompt(folder, loaded.model if loaded else None, allow_mismatch)
        if isinstance(prompt, DeepPrompt):
            raise ConfigError(
                f"{folder} is a deep prompt (prefix tuning: keys and values in every layer); "
                "vLLM and SGLang take input embeddings only and cannot carry it: serve it with "
                "`softprompt serve`, or train --method prompt for these engines"
            )
        name = model or trained_base_model(folder)
        return cls(prompt, PromptFormat.from_meta(meta), meta, loaded, name, str(folder),
                   allow_mismatch)  # fmt: skip

    # --- the prompt's rows --------------------------------------------------------------

    def rows(self, dtype: str = "float32") -> Tensor:
        """The virtual tokens, (N, H), in ``dtype`` (the saved prompt is float32); values the
        dtype cannot hold (float16 tops out at 65504) are refused, never turned into inf."""
        rows = self.prompt.embedding.detach().cpu()
        cast = rows.to(_dtype(dtype))
        if not torch.isfinite(cast).all():
            top = rows.abs().max().item()
            raise ConfigError(
                f"the prompt's values (up to {top:g} in size) do not fit {dtype}: they would "
                "become inf; export with --dtype float32 (or bfloat16)"
            )
        return cast

    def chat_part(self, dtype: str = "float32") -> dict:
        """vLLM's Chat Completions content part carrying the prompt's rows."""
        return {"type": "prompt_embeds", "data": encode_tensor(self.rows(dtype))}

    def chat_messages(self, messages: Sequence[Mapping], dtype: str = "float32") -> list[dict]:
        """``messages`` with the prompt's content part where softprompt placed it in
        training: at the end of the system message (``after-system``; the format's system
        message is added when the conversation has none).

        vLLM joins a message's parts with a newline in templates that take string content
        (most do), so the prompt follows the system text after one "\\n". Other placements
        sit between a template's own tokens, where no content part can go: use
        ``completions_body``, which carries the whole sequence and is exact for any
        placement."""
        if not self.fmt.chat or self.fmt.position != "after-system":
            where = self.fmt.position_name if self.fmt.chat else "raw text"
            raise ConfigError(
                f"this prompt is placed at '{where}', which a Chat Completions content part "
                "cannot express; send the whole sequence with Deployment.completions_body "
                "(vLLM Completions) or sglang_body"
            )
        msgs = [dict(m) for m in messages]
        if self.fmt.system is not None and not any(m["role"] == "system" for m in msgs):
            msgs.insert(0, {"role": "system", "content": self.fmt.system})
        system = next((m for m in msgs if m["role"] == "system"), None)
        if system is None:
            raise ConfigError(
                "this prompt sits after the system message: add a system message to the "
                "conversation"
            )
        system["content"] = [{"type": "text", "text": system["content"]}, self.chat_part(dtype)]
        return msgs

    def chat_body(
        self, messages: Sequence[Mapping], model: str, dtype: str = "float32", **params
    ) -> dict:
        """A vLLM ``/v1/chat/completions`` body (``params``: max_tokens, temperature, ...)."""
        return {"model": model, "messages": self.chat_messages(messages, dtype), **params}

    # --- the whole sequence ---------------------------------------------------------------

    def _model(self) -> LoadedModel:
        if self.loaded is None:
            loaded = load_model(ModelConfig(model=self.model_name))
            check_fits(self.prompt, self.meta, loaded.model, self.folder, self.allow_mismatch)
            self.loaded = loaded
        return self.loaded

    def encode(self, text: str | Sequence[Mapping], fields: Mapping | None = None):
        """(head ids or None, ids after the prompt) of an input as softprompt renders it:
        a conversation (list of messages) through the chat format, a string through the
        template."""
        tok = self._model().tokenizer
        if isinstance(text, str):
            if self.fmt.chat:
                return encode_chat(tok, self.fmt, [{"role": "user", "content": text}])
            return encode_raw(tok, self.fmt, text, fields)
        return encode_chat(tok, self.fmt, [dict(m) for m in text])

    @torch.no_grad()
    def sequence_embeds(
        self, text: str | Sequence[Mapping], fields: Mapping | None = None, dtype: str = "float32"
    ) -> Tensor:
        """The whole input as the model sees it with the prompt, (L, H): [head][virtual
        tokens][input], the text embedded by the model's own embedding layer (Gemma's scale
        included), exactly what softprompt's plain generation path feeds the model."""
        loaded = self._model()
        head, ids = self.encode(text, fields)
        prompt = self.prompt.to(loaded.model.device)
        embeds, _ = plain_rows(loaded.model, [ids], [prompt], [head])
        return embeds[0].to(_dtype(dtype)).cpu()

    def stop_token_ids(self) -> list[int]:
        """Tokens that end an answer (the EOS, and a chat template's end of turn)."""
        return self.fmt.stop_ids(self._model().tokenizer)

    def completions_body(
        self,
        text: str | Sequence[Mapping],
        model: str,
        fields: Mapping | None = None,
        dtype: str = "float32",
        **params,
    ) -> dict:
        """A vLLM ``/v1/completions`` body whose ``prompt_embeds`` is the whole sequence."""
        embeds = self.sequence_embeds(text, fields, dtype)
        body = {"model": model, "prompt_embeds": encode_tensor(embeds), **params}
        body.setdefault("stop_token_ids", self.stop_token_ids())
        return body

    def sglang_body(
        self, text: str | Sequence[Mapping], fields: Mapping | None = None, **sampling
    ) -> dict:
        """An SGLang ``/generate`` body: ``input_embeds`` as JSON floats (SGLang builds a
        float32 tensor from them) and ``sampling_params``."""
        embeds = self.sequence_embeds(text, fields, "float32")
        sampling.setdefault("stop_token_ids", self.stop_token_ids())
        return {"input_embeds": embeds.tolist(), "sampling_params": sampling}


# --- `softprompt export` -------------------------------------------------------------
