"""Inference with or without soft prompts, several inputs at once.

Two paths give the same tokens:

- the plain path puts each row's prompt embeddings before its text and runs them all
  through the model on every call;
- the prefix path runs a prompt through the model once (``compile_prefix``) and starts
  each generation from a copy of its per-layer keys and values, so a tuned request costs
  what a base request costs.

Each row of a batch may carry its own prompt (of any length) or none. Rows are
right-aligned: [padding][virtual tokens][text], the real tokens contiguous, and each
token's position is counted from the attention mask, so a row gets the tokens it would
get alone. Contiguity matters for sliding-window layers (Gemma 3), whose window counts
cache slots, not positions.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor
from transformers import DynamicCache, GenerationConfig, StoppingCriteriaList

from softprompt.config import GenerateConfig, template_fields
from softprompt.loading import LoadedModel
from softprompt.prompt import SoftPrompt, embed_tokens


@dataclass(eq=False)  # holds tensors: compare by identity
class PromptPrefix:
    """A soft prompt compiled for one model: its embeddings and per-layer keys/values."""

    embeds: Tensor  # (N, H), the model's dtype
    keys: list[Tensor]  # per layer, (1, KV heads, N, head dim)
    values: list[Tensor]

    @property
    def length(self) -> int:
        return self.embeds.shape[0]


@dataclass
class Row:
    """One input of a batch: its token ids and the prompt it runs with (None: the base)."""

    ids: list[int]
    prefix: PromptPrefix | None = None


PromptLike = SoftPrompt | PromptPrefix | None


def apply_template(text: str, template: str | None) -> str:
    """Put a raw input into the prompt's template: every ``{field}`` receives the input."""
    if not template:
        return text
    return template.format_map({n: text for n in template_fields(template)})


@torch.no_grad()
def compile_prefix(model: torch.nn.Module, prompt: SoftPrompt) -> PromptPrefix:
    """Run the prompt alone through the model (batch 1) and keep every layer's keys/values.

    The virtual tokens come first and see only each other, so these keys and values are
    the same in every request that uses the prompt. Every layer keeps all N entries
    (a sliding-window layer too): rows of a mixed batch take a different number of them.
    """
    weight = model.get_input_embeddings().weight
    embeds = prompt.embedding.detach().to(device=weight.device, dtype=weight.dtype)  # (N, H)
    cache = DynamicCache()  # no config: plain full layers, nothing dropped
    mask = torch.ones(1, embeds.shape[0], dtype=torch.long, device=weight.device)
    model.base_model(
        inputs_embeds=embeds[None], attention_mask=mask, past_key_values=cache, use_cache=True
    )
    keys = [layer.keys for layer in cache.layers]
    values = [layer.values for layer in cache.layers]
    return PromptPrefix(embeds=embeds, keys=keys, values=values)


def pack_rows(
    model: torch.nn.Module, rows: Sequence[Row]
) -> tuple[Tensor, Tensor, DynamicCache | None]:
    """Batch inputs for ``model.generate``: embeds (B, C+T, H), mask (B, C+T), cache (C slots).

    T is the longest text; C the virtual tokens that cannot fit in the padding before a
    row's text. Row i keeps its first m_i virtual tokens in the cache (right-aligned) and
    runs the rest in the input where its padding would be, so the batch costs what a base
    batch of the same texts costs. The first C columns of the embeds are never read.
    The cache is None when every prompt fits in its row's padding.
    """
    weight = model.get_input_embeddings().weight
    width = max(len(r.ids) for r in rows)  # T
    n = [r.prefix.length if r.prefix else 0 for r in rows]
    in_cache = [max(0, k + len(r.ids) - width) for k, r in zip(n, rows)]  # m_i
    c = max(in_cache)
    embeds = weight.new_zeros(len(rows), c + width, weight.shape[1])
    mask = torch.zeros(len(rows), c + width, dtype=torch.long, device=weight.device)
    for i, row in enumerate(rows):
        text = embed_tokens(model, torch.tensor([row.ids], device=weight.device))[0]  # (t, H)
        if row.prefix is not None:
            text = torch.cat([row.prefix.embeds[in_cache[i] :], text])  # the rest of the prompt
        embeds[i, c + width - text.shape[0] :] = text
        mask[i, c + width - text.shape[0] :] = 1
        mask[i, c - in_cache[i] : c] = 1
    return embeds, mask, _packed_cache(rows, in_cache, c)


def _packed_cache(rows: Sequence[Row], in_cache: list[int], c: int) -> DynamicCache | None:
    """Each row's first m_i prompt keys/values right-aligned in C slots; zeros are masked."""
    if c == 0:
        return None
    template = next(r.prefix for r, m in zip(rows, in_cache) if m)
    layers = []
    for layer, (k0, v0) in enumerate(zip(template.keys, template.values)):
        keys = k0.new_zeros(len(rows), k0.shape[1], c, k0.shape[3])  # (B, KV, C, D)
        values = v0.new_zeros(len(rows), v0.shape[1], c, v0.shape[3])
        for i, (row, m) in enumerate(zip(rows, in_cache)):
            if m:
                keys[i, :, c - m :] = row.prefix.keys[layer][0, :, :m]
                values[i, :, c - m :] = row.prefix.values[layer][0, :, :m]
        layers.append((keys, values))
    return DynamicCache(ddp_cache_data=layers)  # full layers: the masks apply any window


def plain_rows(model: torch.nn.Module, texts: Sequence[list[int]], prompts: Sequence[PromptLike]):
    """The reference path: (B, L, H) embeds and (B, L) mask, [padding][virtual tokens][text]."""
    weight = model.get_input_embeddings().weight
    parts = []
    for ids, prompt in zip(texts, prompts):
        emb = embed_tokens(model, torch.tensor([ids], device=weight.device))[0]  # (t, H)
        if isinstance(prompt, SoftPrompt):
            emb = torch.cat([prompt.embedding.to(emb), emb])  # emb's dtype and device
        elif isinstance(prompt, PromptPrefix):
            emb = torch.cat([prompt.embeds, emb])
        parts.append(emb)
    width = max(p.shape[0] for p in parts)
    embeds = weight.new_zeros(len(parts), width, weight.shape[1])
    mask = torch.zeros(len(parts), width, dtype=torch.long, device=weight.device)
    for i, p in enumerate(parts):
        embeds[i, width - p.shape[0] :] = p
        mask[i, width - p.shape[0] :] = 1
    return embeds, mask


def generation_config(tokenizer, cfg: GenerateConfig) -> GenerationConfig:
    """Hugging Face settings for ``cfg``: greedy at temperature 0, else seeded sampling."""
    sample = cfg.temperature > 0
    return GenerationConfig(
        max_new_tokens=cfg.max_new_tokens,
        do_sample=sample,
        temperature=cfg.temperature if sample else None,
        top_p=cfg.top_p if sample else None,
        top_k=None,
        repetition_penalty=cfg.repetition_penalty,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.bos_token_id,
    )


def compile_all(model: torch.nn.Module, prompts: Sequence[PromptLike]) -> list[PromptPrefix | None]:
    """Compile each distinct SoftPrompt once; prefixes and None pass through."""
    done: dict[int, PromptPrefix] = {}
    out = []
    for p in prompts:
        if isinstance(p, SoftPrompt):
            if id(p) not in done:
                done[id(p)] = compile_prefix(model, p)
            p = done[id(p)]
        out.append(p)
    return out


@torch.no_grad()
def generate_ids(
    model: torch.nn.Module,
    ids: Sequence[list[int]],
    prompts: Sequence[PromptLike],
    gen_cfg: GenerationConfig,
    stopping: StoppingCriteriaList | None = None,
    prefix_cache: bool = True,
) -> Tensor:
    """New token ids (B, steps) for each row of ``ids`` with its own prompt (or None).

    With ``prefix_cache`` every prompt must already be a PromptPrefix (``compile_all``).
    Rows that finish early are filled with the pad token.
    """
    extra = {}
    if prefix_cache:
        rows = [Row(list(i), p) for i, p in zip(ids, prompts)]
        embeds, mask, cache = pack_rows(model, rows)
        if cache is not None:
            extra["past_key_values"] = cache
    else:
        embeds, mask = plain_rows(model, ids, prompts)
    return model.generate(
        inputs_embeds=embeds,
        attention_mask=mask,
        generation_config=gen_cfg,
        stopping_criteria=stopping,
        **extra,
    )


@torch.no_grad()
def generate(
    loaded: LoadedModel,
    texts: list[str],
    prompt: PromptLike | Sequence[PromptLike] = None,
    cfg: GenerateConfig | None = None,
    template: str | None = None,
    prefix_cache: bool = True,
) -> list[str]:
    """Continue each text (after ``template``) with the base model, or with a prompt.

    ``prompt`` is one prompt for every text, or a list with one prompt (or None) per
    text. ``prefix_cache=False`` runs the virtual tokens again on every call (the
    reference path, for comparisons).
    """
    cfg = cfg or GenerateConfig()
    model, tok = loaded.model, loaded.tokenizer
    torch.manual_seed(cfg.seed)
    prompts = list(prompt) if isinstance(prompt, (list, tuple)) else [prompt] * len(texts)
    if len(prompts) != len(texts):
        raise ValueError(f"{len(prompts)} prompts for {len(texts)} texts: give one per text")
    if prefix_cache:
        prompts = compile_all(model, prompts)
    gen_cfg = generation_config(tok, cfg)
    out: list[str] = []
    for start in range(0, len(texts), cfg.batch_size):
        chunk = texts[start : start + cfg.batch_size]
        ids = [
            tok(apply_template(t, template), add_special_tokens=True)["input_ids"] for t in chunk
        ]
        rows = prompts[start : start + cfg.batch_size]
        new = generate_ids(model, ids, rows, gen_cfg, prefix_cache=prefix_cache)
        out += [tok.decode(row, skip_special_tokens=True) for row in new]
    return out


@torch.no_grad()
def score_continuations(
    loaded: LoadedModel,
    contexts: Sequence[str],
    continuations: Sequence[str],
    prompts: Sequence[SoftPrompt | None],
    batch_size: int = 8,
) -> list[tuple[float, int]]:
    """Log-likelihood of each continuation after its context, each row with its own prompt.

    Returns (summed log-probability, token count) per row. Rows are right-padded,
    [virtual tokens][context][continuation][padding], so positions need no correction.
    """
    model, tok = loaded.model, loaded.tokenizer
    out: list[tuple[float, int]] = []
    for start in range(0, len(contexts), batch_size):
        stop = start + batch_size
        batch = zip(contexts[start:stop], continuations[start:stop], prompts[start:stop])
        out += _score_batch(model, tok, list(batch))
    return out


def _score_batch(model, tok, batch: list[tuple[str, str, SoftPrompt | None]]):
    weight = model.get_input_embeddings().weight
    parts, targets = [], []
    for context, continuation, prompt in batch:
        ctx = tok(context, add_special_tokens=True)["input_ids"]
        cont = tok(continuation, add_special_tokens=False)["input_ids"]
        emb = embed_tokens(model, torch.tensor([ctx + cont], device=weight.device))[0]
        n = prompt.num_virtual_tokens if prompt is not None else 0
        if prompt is not None:
            emb = torch.cat([prompt.embedding.to(emb), emb])  # emb's dtype and device
        parts.append(emb)
        targets.append((n + len(ctx), cont))  # where the continuation starts, its ids
    width = max(p.shape[0] for p in parts)
    embeds = weight.new_zeros(len(parts), width, weight.shape[1])
    mask = torch.zeros(len(parts), width, dtype=torch.long, device=weight.device)
    for i, p in enumerate(parts):
        embeds[i, : p.shape[0]], mask[i, : p.shape[0]] = p, 1
    logp = F.log_softmax(model(inputs_embeds=embeds, attention_mask=mask).logits.float(), -1)
    out = []
    for i, (at, cont) in enumerate(targets):
        ids = torch.tensor(cont, device=logp.device)
        picked = logp[i, at - 1 : at - 1 + len(cont)].gather(-1, ids[:, None])  # (K, 1)
        out.append((float(picked.sum()), len(cont)))
    return out
