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

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace

import torch
from torch import Tensor
from transformers import DynamicCache, GenerationConfig, StoppingCriteriaList

from softprompt.artifacts import load_prompt, read_meta, trained_base_model
from softprompt.config import GenerateConfig, GenerateRunConfig
from softprompt.data import read_records
from softprompt.errors import SoftpromptError
from softprompt.loading import LoadedModel, load_model
from softprompt.prefix import Prefix, PromptLike, compile_all
from softprompt.prompt import SoftPrompt, embed_tokens
from softprompt.templates import render

Fields = Mapping[str, object]


@dataclass
class GenerationRow:
    """One input of a batch: its token ids and the compiled prompt it runs with (None: the
    base model)."""

    ids: list[int]
    prefix: Prefix | None = None


def pack_rows(
    model: torch.nn.Module, rows: Sequence[GenerationRow]
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


def _packed_cache(
    rows: Sequence[GenerationRow], in_cache: list[int], c: int
) -> DynamicCache | None:
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
        elif isinstance(prompt, Prefix):
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

    With ``prefix_cache`` each prompt runs from its compiled prefix (a SoftPrompt is compiled
    here; pass ``Prefix`` objects to compile once for many calls). Rows that finish early are
    filled with the pad token.
    """
    extra = {}
    if prefix_cache:
        rows = [GenerationRow(list(i), p) for i, p in zip(ids, compile_all(model, prompts))]
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
    fields: Fields | Sequence[Fields | None] | None = None,
) -> list[str]:
    """Continue each text (after ``template``) with the base model, or with a prompt.

    ``prompt`` is one prompt for every text, or a list with one prompt (or None) per
    text. ``fields`` fill the template's other fields (``templates.render``): one mapping
    for every text or one per text. ``prefix_cache=False`` runs the virtual tokens again on
    every call (the reference path, for comparisons).
    """
    cfg = cfg or GenerateConfig()
    model, tok = loaded.model, loaded.tokenizer
    torch.manual_seed(cfg.seed)
    prompts = list(prompt) if isinstance(prompt, (list, tuple)) else [prompt] * len(texts)
    if len(prompts) != len(texts):
        raise ValueError(f"{len(prompts)} prompts for {len(texts)} texts: give one per text")
    if prefix_cache:
        prompts = compile_all(model, prompts)  # once, not once per batch
    per_text = list(fields) if isinstance(fields, (list, tuple)) else [fields] * len(texts)
    gen_cfg = generation_config(tok, cfg)
    out: list[str] = []
    for start in range(0, len(texts), cfg.batch_size):
        chunk = zip(texts[start : start + cfg.batch_size], per_text[start : start + cfg.batch_size])
        ids = [tok(render(template, t, f), add_special_tokens=True)["input_ids"] for t, f in chunk]
        rows = prompts[start : start + cfg.batch_size]
        new = generate_ids(model, ids, rows, gen_cfg, prefix_cache=prefix_cache)
        out += [tok.decode(row, skip_special_tokens=True) for row in new]
    return out


# --- `softprompt generate` ---------------------------------------------------------------


@dataclass
class Generation:
    """One input of `softprompt generate` and what came of it."""

    text: str
    tuned: str | None = None  # with the prompt
    base: str | None = None  # without it
    expected: str | None = None  # the file's target, when it has one


def run_generate(cfg: GenerateRunConfig, loaded: LoadedModel | None = None) -> list[Generation]:
    """Generate for ``cfg.texts`` and the rows of ``cfg.file``: with the prompt, and without
    it for ``--compare`` or when no prompt is given."""
    meta = read_meta(cfg.prompt) if cfg.prompt else {}
    data = meta.get("data", {})
    items = [Generation(t) for t in cfg.texts]
    fields: list[Fields | None] = [None] * len(items)
    if cfg.file:
        name = cfg.input_field or data.get("input_field") or "input"
        target = data.get("target_field") or "target"
        for i, (record, where) in enumerate(read_records(cfg.file)):
            if cfg.limit is not None and i >= cfg.limit:
                break
            if name not in record:
                raise SoftpromptError(f"{where}: no field {name!r}; set --input-field")
            items.append(Generation(str(record[name]), expected=record.get(target)))
            fields.append(record)  # the template's other fields come from the record
    if not items:
        raise SoftpromptError("nothing to generate: give TEXT arguments or --file")
    if loaded is None:
        model = cfg.model.model or (trained_base_model(cfg.prompt) if cfg.prompt else None)
        loaded = load_model(replace(cfg.model, model=model))
    template = None if cfg.no_template else (cfg.template or meta.get("template"))
    texts = [item.text for item in items]
    if cfg.prompt:
        prompt, _ = load_prompt(cfg.prompt, loaded.model, allow_mismatch=cfg.allow_mismatch)
        prompt.to(loaded.model.device)
        tuned = generate(loaded, texts, prompt, cfg.sampling, template, fields=fields)
        for item, out in zip(items, tuned):
            item.tuned = out
    if cfg.compare or not cfg.prompt:
        base = generate(loaded, texts, None, cfg.sampling, template, fields=fields)
        for item, out in zip(items, base):
            item.base = out
    return items


def format_generations(items: list[Generation]) -> str:
    """Each input, then the base and tuned answers (stripped) and the expected one."""
    lines = []
    for i, item in enumerate(items, 1):
        lines.append(f"[{i}] {item.text}")
        if item.base is not None:
            lines.append(f"  base    : {item.base.strip()!r}")
        if item.tuned is not None:
            lines.append(f"  tuned   : {item.tuned.strip()!r}")
        if item.expected is not None:
            lines.append(f"  expected: {item.expected!r}")
    return "\n".join(lines)
