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
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import Tensor
from transformers import (
    DynamicCache,
    GenerationConfig,
    LogitsProcessor,
    LogitsProcessorList,
    StoppingCriteriaList,
)

from softprompt.config import GenerateConfig
from softprompt.console import batch_starts, warn
from softprompt.errors import SoftpromptError
from softprompt.loss import support
from softprompt.prefix import Prefix, PromptLike, cache_of, compile_all, with_head
from softprompt.prompt import DeepPrompt, SoftPrompt, embed_tokens, max_positions
from softprompt.rows import Encoded, encode_chat
from softprompt.templates import PromptFormat


class LoadedModel(Protocol):
    """What generation reads of ``loading.LoadedModel`` (named here, not imported: the
    model's kind, which loading decides, calls back into this engine)."""

    model: torch.nn.Module
    tokenizer: object
    kind: object


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
    if _gapped(model, rows):
        rows = [prefilled(model, row) for row in rows]
    width = max(len(r.ids) for r in rows)  # T
    n = [r.prefix.length if r.prefix else 0 for r in rows]
    # a deep prompt has no input vectors: all of it stays in the cache
    in_cache = [k if r.prefix is not None and r.prefix.deep else max(0, k + len(r.ids) - width)
                for k, r in zip(n, rows)]  # m_i  # fmt: skip
    c = max(in_cache)
    embeds = weight.new_zeros(len(rows), c + width, weight.shape[1])
    mask = torch.zeros(len(rows), c + width, dtype=torch.long, device=weight.device)
    for i, row in enumerate(rows):
        text = embed_tokens(model, torch.tensor([row.ids], device=weight.device))[0]  # (t, H)
        if row.prefix is not None and not row.prefix.deep:
            text = torch.cat([row.prefix.embeds[in_cache[i] :], text])  # the rest of the prompt
        embeds[i, c + width - text.shape[0] :] = text
        mask[i, c + width - text.shape[0] :] = 1
        mask[i, c - in_cache[i] : c] = 1
    return embeds, mask, _packed_cache(rows, in_cache, c)


def _gapped(model: torch.nn.Module, rows: Sequence[GenerationRow]) -> bool:
    """Whether packing would leave padding between a deep prompt and its row's text on a
    model whose sliding-window layers count cache slots, in rows long enough for the window
    to then see less of the row than it does alone. Such rows are ``prefilled`` first."""
    window = getattr(model.config, "sliding_window", None)
    deep = [r.prefix.length for r in rows if r.prefix is not None and r.prefix.deep]
    if not window or not deep or len({len(r.ids) for r in rows}) == 1:
        return False
    longest = max(r.prefix.length if r.prefix else 0 for r in rows) + max(len(r.ids) for r in rows)
    return longest > window  # else every slot of every row is inside the window anyway


@torch.no_grad()
def prefilled(model: torch.nn.Module, row: GenerationRow) -> GenerationRow:
    """The row with its prompt and all but its last token run alone into the cache: its last
    token then follows them in the next slot whatever the batch's padding (``_gapped``)."""
    if len(row.ids) < 2 and (row.prefix is None or row.prefix.deep):
        return row
    cache = DynamicCache() if row.prefix is None else cache_of(row.prefix.keys, row.prefix.values)
    weight = model.get_input_embeddings().weight
    text = embed_tokens(model, torch.tensor([row.ids[:-1]], device=weight.device))
    done = cache.get_seq_length()
    mask = torch.ones(1, done + text.shape[1], dtype=torch.long, device=weight.device)
    model.base_model(inputs_embeds=text, attention_mask=mask, past_key_values=cache,
                     use_cache=True)  # fmt: skip
    keys = [layer.keys for layer in cache.layers]
    values = [layer.values for layer in cache.layers]
    return GenerationRow(row.ids[-1:], Prefix(embeds=None, keys=keys, values=values))


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


def plain_rows(
    model: torch.nn.Module,
    texts: Sequence[list[int]],
    prompts: Sequence[PromptLike],
    heads: Sequence[Sequence[int] | None] | None = None,
):
    """The reference path: (B, L, H) embeds and (B, L) mask,
    [padding][head][virtual tokens][text], every token run on every call."""
    weight = model.get_input_embeddings().weight
    parts = []
    for ids, prompt, head in zip(texts, prompts, heads or [()] * len(texts)):
        emb = embed_tokens(model, torch.tensor([ids], device=weight.device))[0]  # (t, H)
        if isinstance(prompt, DeepPrompt) or isinstance(prompt, Prefix) and prompt.deep:
            raise SoftpromptError("a deep prompt runs from the model's cache only: generate "
                                  "with the prefix cache (the default)")  # fmt: skip
        if isinstance(prompt, SoftPrompt):
            emb = torch.cat([with_head(model, prompt.embedding, head or ()), emb])
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


def generation_config(
    tokenizer, cfg: GenerateConfig, stop_ids: list[int] | None = None
) -> GenerationConfig:
    """Hugging Face settings for ``cfg``: greedy at temperature 0, else seeded sampling;
    generation stops at ``stop_ids`` (default: the EOS)."""
    sample = cfg.temperature > 0
    return GenerationConfig(
        max_new_tokens=cfg.max_new_tokens,
        do_sample=sample,
        temperature=cfg.temperature if sample else None,
        top_p=cfg.top_p if sample else None,
        top_k=None,
        repetition_penalty=cfg.repetition_penalty,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=stop_ids or tokenizer.eos_token_id,
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
    heads: Sequence[Sequence[int] | None] | None = None,
    processors: LogitsProcessorList | None = None,
) -> Tensor:
    """New token ids (B, steps) for each row of ``ids`` with its own prompt (or None) placed
    after its ``heads`` tokens (default: first).

    With ``prefix_cache`` each prompt runs from its compiled prefix (a SoftPrompt is compiled
    here, with its head; pass ``Prefix`` objects to compile once for many calls). Rows that
    finish early are filled with the pad token.
    """
    extra = {}
    if prefix_cache:
        compiled = compile_all(model, prompts, heads)
        rows = [GenerationRow(list(i), p) for i, p in zip(ids, compiled)]
        embeds, mask, cache = pack_rows(model, rows)
        if cache is not None:
            extra["past_key_values"] = cache
    else:
        embeds, mask = plain_rows(model, ids, prompts, heads)
    return model.generate(
        inputs_embeds=embeds,
        attention_mask=mask,
        generation_config=gen_cfg,
        stopping_criteria=stopping,
        logits_processor=processors,
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
    fmt: PromptFormat | None = None,
    labels: Sequence[str] | None = None,
) -> list[str]:
    """Continue each text (in its template) with the base model, or with a prompt: a causal
    LM's continuation, an encoder-decoder's answer, or a classifier's label.

    ``prompt`` is one prompt for every text, or a list with one prompt (or None) per text.
    ``fields`` fill the template's other fields (``templates.render``): one mapping for every
    text or one per text. ``fmt`` (a saved prompt's ``PromptFormat``) replaces ``template``.
    ``prefix_cache=False`` runs the virtual tokens again on every call (the reference path,
    for comparisons). Answers come without leading whitespace, as the CLI shows them.
    ``labels`` (a prompt trained in classification mode: ``trained_choices(meta)``): the
    rows with a prompt answer with one of the labels and stop there (``LabelsOnly``).
    """
    fmt = fmt or PromptFormat(template=template)
    per_text = list(fields) if isinstance(fields, (list, tuple)) else [fields] * len(texts)
    kind = loaded.kind
    encoded = [kind.encode(loaded.tokenizer, fmt, t, f) for t, f in zip(texts, per_text)]
    prompts = per_row(prompt, len(encoded))
    if not labels:
        return kind.answer(loaded, encoded, prompts, cfg or GenerateConfig(), prefix_cache)
    sequences = label_sequences(loaded.tokenizer, labels, fmt)
    outs = kind.answer(loaded, encoded, prompts, cfg or GenerateConfig(), prefix_cache,
                       labels=sequences)  # fmt: skip
    return [o if p is None else cut_at_label(o, labels) for o, p in zip(outs, prompts)]


@torch.no_grad()
def generate_chat(
    loaded: LoadedModel,
    conversations: list[list[dict]],
    prompt: PromptLike | Sequence[PromptLike] = None,
    cfg: GenerateConfig | None = None,
    fmt: PromptFormat | None = None,
    prefix_cache: bool = True,
) -> list[str]:
    """The next assistant message of each conversation, rendered as ``fmt`` (a chat format:
    the prompt's own, or the tokenizer's chat template with the prompt first)."""
    fmt = fmt or PromptFormat(chat=True)
    if not loaded.kind.chat:
        raise SoftpromptError(f"conversations need a causal (chat) LM; this is a "
                              f"{loaded.kind.name} model: leave out --chat")  # fmt: skip
    tok = loaded.tokenizer
    encoded = [encode_chat(tok, fmt, c) for c in conversations]
    prompts = per_row(prompt, len(encoded))
    return loaded.kind.answer(
        loaded, encoded, prompts, cfg or GenerateConfig(), prefix_cache, fmt.stop_ids(tok)
    )


def per_row(prompt: PromptLike | Sequence[PromptLike], n: int) -> list[PromptLike]:
    """One prompt (or None) per row: ``prompt`` itself when it is a list, else repeated."""
    prompts = list(prompt) if isinstance(prompt, (list, tuple)) else [prompt] * n
    if len(prompts) != n:
        raise ValueError(f"{len(prompts)} prompts for {n} texts: give one per text")
    return prompts


def prompt_batches(prompts: Sequence[PromptLike], batch_size: int) -> list[list[int]]:
    """Row indices in batches of at most ``batch_size``, rows of one prompt together (for
    kinds that run one prompt per batch)."""
    groups: dict[int, list[int]] = {}
    for i, p in enumerate(prompts):
        groups.setdefault(id(p), []).append(i)
    return [idx[s : s + batch_size] for idx in groups.values()
            for s in range(0, len(idx), batch_size)]  # fmt: skip


def _fit_positions(
    model, encoded: list[Encoded], prompts: list[PromptLike], new_tokens: int
) -> list[Encoded]:
    """Inputs cut from their start (never their head) so that head + prompt + input + new
    tokens fit the model's positions; how many were cut is said once."""
    limit = max_positions(model)
    if limit is None:
        return encoded
    out, cut = [], 0
    for (head, ids), prompt in zip(encoded, prompts):
        n = prompt_length(prompt)
        room = limit - new_tokens - n - len(head or [])
        if room < 1:
            raise SoftpromptError(
                f"--max-new-tokens {new_tokens} leaves no room for the input in the model's "
                f"{limit} positions; lower it"
            )
        cut += len(ids) > room
        out.append((head, ids[len(ids) - room :] if len(ids) > room else ids))
    if cut:
        warn(f"{cut} inputs were too long for the model's {limit} positions and lost their start")
    return out


def prompt_length(prompt: PromptLike) -> int:
    """The positions a prompt takes before the input (a deep prompt's too: its keys and
    values hold positions)."""
    if prompt is None:
        return 0
    return prompt.length if isinstance(prompt, Prefix) else prompt.num_virtual_tokens


def generate_encoded(
    loaded: LoadedModel,
    encoded: list[Encoded],
    prompt: PromptLike | Sequence[PromptLike] = None,
    cfg: GenerateConfig | None = None,
    prefix_cache: bool = True,
    stop_ids: list[int] | None = None,
    labels: Sequence[list[int]] | None = None,
) -> list[str]:
    """Generate for encoded inputs, each with its prompt (or None: the head and text run
    as plain tokens); batches of ``cfg.batch_size``. With ``labels`` (token sequences,
    ``label_sequences``) the rows with a prompt answer with one of them (``LabelsOnly``)."""
    cfg = cfg or GenerateConfig()
    model, tok = loaded.model, loaded.tokenizer
    torch.manual_seed(cfg.seed)
    prompts = per_row(prompt, len(encoded))
    # a model whose cache cannot hold a compiled prefix (a recurrent or state-space layer)
    # runs the virtual tokens as plain inputs
    prefix_cache = prefix_cache and support(model).shared_prefix
    encoded = _fit_positions(model, encoded, prompts, cfg.max_new_tokens)
    heads = [h for h, _ in encoded]
    ids = [(h or []) + i if p is None else i for (h, i), p in zip(encoded, prompts)]
    if prefix_cache:
        prompts = compile_all(model, prompts, heads)  # once, not once per batch
    gen_cfg = generation_config(tok, cfg, stop_ids)
    out: list[str] = []
    for start in batch_starts(range(0, len(ids), cfg.batch_size)):
        window = slice(start, start + cfg.batch_size)
        only = None
        if labels:
            rows = [labels if p is not None else None for p in prompts[window]]
            only = LogitsProcessorList([LabelsOnly(rows, gen_cfg.eos_token_id)])
        new = generate_ids(model, ids[window], prompts[window], gen_cfg, None, prefix_cache,
                           heads[window], only)  # fmt: skip
        # The answer without the whitespace a model writes after the template's last word
        # (' positive' -> 'positive'), as the CLI shows it; the server returns raw text.
        out += [tok.decode(row, skip_special_tokens=True).lstrip() for row in new]
    return out


# --- `softprompt generate` ---------------------------------------------------------------


def cut_at_label(text: str, labels: Sequence[str]) -> str:
    """``text`` up to the end of the label it starts with (after leading whitespace), when
    one of ``labels`` is followed by anything but a letter or digit; otherwise ``text``. A
    prompt trained in classification mode answers with its label and stops there: what the
    base model would write after it is not part of the answer."""
    lead = len(text) - len(text.lstrip())
    body = text[lead:]
    for label in sorted(labels, key=len, reverse=True):
        if body.startswith(label) and not body[len(label) : len(label) + 1].isalnum():
            return text[: lead + len(label)]
    return text


def label_sequences(tokenizer, labels: Sequence[str], fmt: PromptFormat | None) -> list[list[int]]:
    """Each label's tokens as they follow an input in ``fmt`` (after its target delimiter;
    directly after a chat turn's header)."""
    fmt = fmt or PromptFormat()
    delimiter = "" if fmt.chat else fmt.target_delimiter
    out = [tokenizer(delimiter + label, add_special_tokens=False)["input_ids"] for label in labels]
    return [ids for ids in out if ids]


class LabelsOnly(LogitsProcessor):
    """Decoding that can only write a label: row i may continue only the token sequences of
    ``rows[i]`` that its answer so far begins (None: the row is free), and ends with EOS
    once one is complete. A prompt trained on labels learns which label comes first (the
    restricted loss ranks only the labels' first tokens), not to keep other tokens away:
    this is the answer its training defines, greedy or sampled among the labels."""

    def __init__(self, rows: Sequence[Sequence[list[int]] | None], eos: int | list[int] | None):
        self.rows = list(rows)
        eos = eos[0] if isinstance(eos, (list, tuple)) else eos
        self.eos, self.start = eos, None

    def __call__(self, input_ids: Tensor, scores: Tensor) -> Tensor:
        if self.start is None:  # what was there before the first new token
            self.start = input_ids.shape[1]
        answers = input_ids[:, self.start :].tolist()
        for i, (labels, answer) in enumerate(zip(self.rows, answers)):
            if not labels:
                continue
            n = len(answer)
            allowed = {s[n] for s in labels if len(s) > n and s[:n] == answer}
            if self.eos is not None and (not allowed or answer in labels):
                allowed.add(self.eos)  # a whole label (or a dead end): the answer ends
            keep = torch.full_like(scores[i], float("-inf"))
            keep[list(allowed)] = 0.0
            scores[i] = scores[i] + keep
        return scores
