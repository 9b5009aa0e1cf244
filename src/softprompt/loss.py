"""The training loss of a causal LM, and which shortcuts a model allows.

- ``lm_loss``: summed next-token cross-entropy over labelled positions (or, in
  classification mode, a softmax over the choices' first tokens at the answer position);
- ``Support``: which shortcuts reproduce the plain path on a given model (checked once).

The LM loss never materialises the full logits (``ChunkedCrossEntropy``): the head and
the cross-entropy run over labelled positions in chunks of ``CHUNK_ELEMENTS`` logits; the
same pass turns each chunk's softmax into its gradient, so the backward pass only scales
what was kept (nothing is recomputed) and memory does not grow with positions x vocabulary
(Gemma 3's head has 262k columns: 2 GB of fp32 logits for 8 rows of 256 tokens).

Two shortcuts, each used only where ``support(model)`` confirmed it changes nothing:
- the fast head: the LM head runs only where a label exists (for Gemma 3 270M the 262k-word
  head costs more than the whole body at every other position);
- the shared prefix (``prefix.py``): the virtual tokens run once per batch and every row
  reads their keys/values; the gradient flows back through that cache to the prompt.
"""

from __future__ import annotations

import math
import weakref
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from softprompt.errors import ConfigError
from softprompt.prefix import hidden_after_deep, hidden_after_prefix, with_head
from softprompt.prompt import (
    PromptSet,
    SoftPrompt,
    deep_layout,
    embed_tokens,
    is_deep,
    prepend,
    rows_prompts,
)
from softprompt.rows import IGNORE_INDEX


@dataclass(frozen=True)
class Support:
    """What a model supports, checked once against its own full forward."""

    fast_head: bool  # body + ``head_logits`` reproduce the model's logits
    shared_prefix: bool  # the prompt run once and shared reproduces a prompt per row


_SUPPORT: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def support(model: nn.Module) -> Support:
    """The model's ``Support`` in its current dtype, computed on first use and remembered
    while the model lives."""
    known = _SUPPORT.setdefault(model, {})
    dtype = model.get_input_embeddings().weight.dtype
    if dtype not in known:
        fast = _check_fast_head(model)
        known[dtype] = Support(fast, fast and _check_shared_prefix(model))
    return known[dtype]


def lm_loss(
    model: nn.Module,
    prompt: SoftPrompt | PromptSet | None,
    batch: dict[str, Tensor],
    fast_head: bool = True,
    shared_prefix: bool = True,
    choice_ids: Tensor | None = None,
    hits: list[int] | None = None,
) -> tuple[Tensor, int]:
    """Summed next-token cross-entropy over labelled positions, and their count.

    ``fast_head`` / ``shared_prefix`` allow the two shortcuts where the model supports them.
    With ``choice_ids`` (C,) (classification mode) only each row's first labelled position
    counts, and its softmax runs over the choices' first tokens alone. With a ``PromptSet``
    each row gets its own task's prompt (``batch["task"]``); rows of one task share its
    prefix. With ``choice_ids`` and a ``hits`` list, the number of rows whose highest-scoring
    choice is their label is appended to it (validation accuracy, from the same pass).
    """
    able = support(model)
    fast = fast_head and able.fast_head
    shared = fast and shared_prefix and able.shared_prefix
    return _loss(model, prompt, batch, fast, shared, choice_ids, hits)


def _loss(
    model: nn.Module,
    prompt: SoftPrompt | PromptSet | None,
    batch: dict[str, Tensor],
    fast: bool,
    shared: bool,
    choice_ids: Tensor | None,
    hits: list[int] | None = None,
) -> tuple[Tensor, int]:
    """``lm_loss`` with the shortcuts given, not checked (``support`` compares the paths)."""
    labels, at = batch["labels"], batch.get("prompt_at")
    soft = soft_targets(batch)  # distillation: labels index the teacher's distributions
    if is_deep(prompt):  # keys/values read from the cache; nothing predicts token 0
        if at is not None and bool(at.any()):
            raise ConfigError("a deep prompt (--method prefix) sits before everything: leave "
                              "{soft_prompt} out of the template, or put it first")  # fmt: skip
        virtual, which = rows_prompts(prompt, batch)
        hidden = hidden_after_deep(model, virtual, deep_layout(prompt), which, batch)
        keep = _positions(labels, choice_ids)
        keep[:, 0] = False
        loss = _head_loss(model, hidden[keep], labels[keep], choice_ids, soft, hits)
        return loss, int(keep.sum())
    if prompt is not None and shared and at is None:  # the prompt first in every row
        hidden = hidden_after_prefix(model, *rows_prompts(prompt, batch), batch)
        keep = _positions(labels, choice_ids)  # hidden[:, j] predicts labels[:, j]
        loss = _head_loss(model, hidden[keep], labels[keep], choice_ids, soft, hits)
        return loss, int(keep.sum())
    if prompt is not None and shared and len(lengths := at.unique()) <= MAX_HEAD_GROUPS:
        parts = [_behind_heads(model, prompt, batch, int(a), choice_ids, soft, hits)
                 for a in lengths]  # fmt: skip
        return sum(loss for loss, _ in parts), sum(n for _, n in parts)
    embeds = embed_tokens(model, batch["input_ids"])  # (B, T, H)
    mask = batch["attention_mask"]
    if prompt is not None:
        virtual, which = rows_prompts(prompt, batch)
        embeds, mask, labels = prepend(virtual[which], embeds, mask, labels, at)  # (B, N+T, ...)
    targets = labels[:, 1:]  # position t predicts token t+1
    keep = _positions(targets, choice_ids)  # (B, T'-1)
    if fast:
        hidden = model.base_model(inputs_embeds=embeds, attention_mask=mask).last_hidden_state
        hidden = hidden[:, :-1][keep]
        return _head_loss(model, hidden, targets[keep], choice_ids, soft, hits), int(keep.sum())
    logits = model(inputs_embeds=embeds, attention_mask=mask).logits[:, :-1][keep]
    if choice_ids is not None:
        logits = pick_choices(logits, choice_ids)  # (K, C) or (K, C+1)
    if soft is not None:
        return _soft_kl(logits, *soft_rows(soft, targets[keep])), int(keep.sum())
    return _score(logits, targets[keep], choice_ids, hits), int(keep.sum())


# Rows whose prompt sits behind heads of this many different lengths share prefixes per
# length; more lengths than this (e.g. a different system prompt in every row) take the
# plain path, where each row runs its own head and prompt.
MAX_HEAD_GROUPS = 2


def _behind_heads(
    model: nn.Module,
    prompt: SoftPrompt | PromptSet,
    batch: dict[str, Tensor],
    a: int,
    choice_ids: Tensor | None,
    soft: tuple[Tensor, Tensor] | None = None,
    hits: list[int] | None = None,
) -> tuple[Tensor, int]:
    """The loss of the rows whose prompt sits after a head of ``a`` tokens: each distinct
    (head, prompt) runs once as a prefix and its rows read it from the shared cache."""
    rows = (batch["prompt_at"] == a).nonzero().squeeze(1)
    sub = {k: batch[k][rows] for k in ("input_ids", "attention_mask", "labels", "task")}
    width = int(sub["attention_mask"].sum(dim=1).max())
    virtual, task = rows_prompts(prompt, sub)  # (K, N, H), (b,)
    heads = sub["input_ids"][:, :a]  # (b, a)
    combos, which = torch.unique(torch.cat([task[:, None], heads], 1), dim=0, return_inverse=True)
    prefix = torch.stack([with_head(model, virtual[c[0]], c[1:].tolist()) for c in combos])
    tail = {k: sub[k][:, a:width] for k in ("input_ids", "attention_mask")}
    labels = sub["labels"][:, a:width]  # the head carries no labels
    hidden = hidden_after_prefix(model, prefix, which, tail)
    keep = _positions(labels, choice_ids)
    return _head_loss(model, hidden[keep], labels[keep], choice_ids, soft, hits), int(keep.sum())


def _positions(targets: Tensor, choice_ids: Tensor | None) -> Tensor:
    """Where the loss is taken: every label, or (classification) each row's first one."""
    keep = targets != IGNORE_INDEX
    if choice_ids is not None:  # the answer's first token only: one position per row
        keep = keep & (keep.cumsum(dim=1) == 1)
    return keep


def _score(
    logits: Tensor, gold: Tensor, choice_ids: Tensor | None, hits: list[int] | None = None
) -> Tensor:
    """Summed cross-entropy in float32, over the vocabulary (K, V) or, with ``choice_ids``,
    over the choices only (logits (K, C), or (K, C+1) with REST last); with both
    ``choice_ids`` and ``hits``, appends how many rows rank their label first among the
    choices (REST, not a label, is left out of the ranking)."""
    if choice_ids is not None:
        gold = (gold.unsqueeze(1) == choice_ids.unsqueeze(0)).long().argmax(dim=1)
        if hits is not None:
            labels = len(choice_ids) - int(int(choice_ids[-1]) == REST)
            hits.append(int((logits[:, :labels].argmax(dim=1) == gold).sum()))
    return F.cross_entropy(logits.float(), gold, reduction="sum")


def _head_loss(
    model: nn.Module,
    hidden: Tensor,
    gold: Tensor,
    choice_ids: Tensor | None,
    soft: tuple[Tensor, Tensor] | None = None,
    hits: list[int] | None = None,
) -> Tensor:
    """Summed cross-entropy of hidden states (K, H) against ``gold`` (K,): over the choices'
    columns alone, or over the vocabulary in chunks (``ChunkedCrossEntropy``). With ``soft``
    (distillation) ``gold`` indexes the teacher's distributions and the loss is the summed
    KL divergence from them (``teacher_kl``)."""
    head = model.get_output_embeddings()
    if soft is not None:
        if choice_ids is not None:
            raise ConfigError("distillation matches the teacher's distributions: no --choices")
        ids, logp = soft_rows(soft, gold)
        if isinstance(head, nn.Linear):
            cap = getattr(model.config, "final_logit_softcapping", None) or None
            return teacher_kl(hidden, head.weight, head.bias, ids, logp, cap)
        return _soft_kl(head_logits(model, hidden), ids, logp)
    if choice_ids is None and isinstance(head, nn.Linear):
        cap = getattr(model.config, "final_logit_softcapping", None) or None
        return chunked_cross_entropy(hidden, head.weight, head.bias, gold, cap)
    return _score(choice_logits(model, hidden, choice_ids), gold, choice_ids, hits)


# --- distillation: the KL divergence from a teacher's top-k distribution ------------------


def soft_targets(batch: dict[str, Tensor]) -> tuple[Tensor, Tensor] | None:
    """A distillation batch's table of teacher distributions (``rows.collate``), or None."""
    if "soft_ids" not in batch:
        return None
    return batch["soft_ids"], batch["soft_logp"]


def soft_rows(soft: tuple[Tensor, Tensor], index: Tensor) -> tuple[Tensor, Tensor]:
    """The table rows ``index`` (K,) of the teacher's (ids (M, k), log-probs (M, k+1))."""
    return soft[0][index], soft[1][index]


def _bucket_terms(logits: Tensor, ids: Tensor, logp: Tensor, want_grad: bool):
    """For float32 logits (R, V) and a teacher's top-k ``ids`` (R, k) with log-probs ``logp``
    (R, k+1, the last the mass of every other token): the summed KL(teacher || student) over
    the k+1 buckets, and its gradient with respect to the logits (or None).

    The student's bucket probabilities are its softmax at the top-k ids and the mass of the
    rest. The gradient is softmax - q, where q is the teacher's probability at a top-k id and,
    elsewhere, the teacher's rest mass shared as the student shares its own rest."""
    lse = logits.logsumexp(dim=1)  # (R,)
    rest_lse = logits.scatter(1, ids, -math.inf).logsumexp(dim=1)  # (R,)
    student = torch.cat([logits.gather(1, ids), rest_lse[:, None]], dim=1) - lse[:, None]
    teacher = logp.exp()
    kl = torch.where(teacher > 0, teacher * (logp - student), 0.0).sum()
    if not want_grad:
        return kl, None
    g = (logits - lse[:, None]).exp_()  # the student's softmax
    g -= teacher[:, -1:] * (logits - rest_lse[:, None]).exp()
    g.scatter_(1, ids, student[:, :-1].exp() - teacher[:, :-1])
    return kl, g


def _soft_kl(logits: Tensor, ids: Tensor, logp: Tensor) -> Tensor:
    """``_bucket_terms``'s KL on full logits (K, V), through autograd (the reference path)."""
    return _bucket_terms(logits.float(), ids, logp, want_grad=False)[0]


def teacher_kl(hidden, weight, bias, ids, logp, cap=None) -> Tensor:
    """Summed KL(teacher || head(hidden)) over the teacher's top-k buckets (``_bucket_terms``)
    in chunks, as ``chunked_cross_entropy`` computes the cross-entropy: the (K, V) logits of
    the student never exist at once."""
    return ChunkedCrossEntropy.apply(hidden, weight, bias, ids, cap, torch.is_grad_enabled(), logp)


@torch.no_grad()
def teacher_topk(model: nn.Module, hidden: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """A teacher's distributions at hidden states (K, H), in chunks: its ``k`` most likely
    token ids (K, k) and their log-probabilities with the rest's mass last (K, k+1)."""
    vocab = model.get_output_embeddings().weight.shape[0]
    k = min(k, vocab - 1)  # the rest bucket is never empty
    ids = torch.empty(hidden.shape[0], k, dtype=torch.long, device=hidden.device)
    logp = torch.empty(hidden.shape[0], k + 1, dtype=torch.float32, device=hidden.device)
    rows = _chunk_rows(vocab)
    for s in range(0, hidden.shape[0], rows):
        chunk = head_logits(model, hidden[s : s + rows])
        ids[s : s + rows], logp[s : s + rows] = topk_buckets(chunk, k)
    return ids, logp


def topk_buckets(logits: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """Logits (K, V) as the teacher's buckets: the ``k`` most likely ids (K, k) and their
    log-probabilities with the rest's mass last (K, k+1), in float32."""
    logits = logits.float()
    k = min(k, logits.shape[1] - 1)  # the rest bucket is never empty
    lse = logits.logsumexp(dim=1, keepdim=True)
    top, idx = logits.topk(k, dim=1)
    rest = logits.scatter(1, idx, -math.inf).logsumexp(dim=1, keepdim=True)
    return idx, torch.cat([top, rest], dim=1) - lse


# Logits computed at once by the chunked loss: 32M floats (128 MB in fp32), i.e. 128 rows
# of Gemma 3's 262k-word head; the full logits of a batch never exist.
CHUNK_ELEMENTS = 1 << 25


def _chunk_rows(vocab: int) -> int:
    return max(1, CHUNK_ELEMENTS // max(vocab, 1))


def _capped_logits(hidden: Tensor, weight: Tensor, bias: Tensor | None, cap: float | None):
    """float32 logits of one chunk and, with soft-capping, tanh(raw / cap) for the
    backward pass."""
    logits = F.linear(hidden, weight, bias)
    if cap is None:
        return logits.float(), None
    t = torch.tanh(logits / cap)  # in the model's dtype, as head_logits does
    return (t * cap).float(), t.float()


class ChunkedCrossEntropy(torch.autograd.Function):
    """sum_k CE(head(hidden[k]), gold[k]) without the (K, V) logits: each chunk of rows
    gets its logits, log-sum-exp and gold logit, then is dropped. When a gradient will be
    wanted, the same pass turns softmax - one-hot into the gradient of the hidden states
    (and of the head, when it is trained), so the head runs twice per chunk (forward and
    gradient), as in the plain path, and the backward pass only scales what was kept
    (the fused linear cross-entropy of Liger Kernel, done in chunks with torch ops). The
    same numbers as ``F.cross_entropy`` over ``head_logits`` in float32
    (tests/test_loss.py).

    Chosen over the ``cut-cross-entropy`` package (its kernels are Triton, GPU only; its
    ``torch_compile`` fallback materialises the logits) and Liger Kernel itself (Triton,
    GPU only): this runs on every device torch does."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, gold, cap, grad_on=True, teacher=None):  # noqa: D102
        # ``grad_on``: whether grad mode was on at the call (forward itself runs without it);
        # ``teacher`` (K, k+1): distillation, ``gold`` (K, k) the teacher's top-k ids
        want_h, want_w, want_b = (grad_on and n for n in ctx.needs_input_grad[:3])
        grad_h = torch.empty_like(hidden) if want_h else None
        grad_w = torch.zeros_like(weight, dtype=torch.float32) if want_w else None
        grad_b = torch.zeros_like(bias, dtype=torch.float32) if want_b else None
        rows = _chunk_rows(weight.shape[0])
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        with torch.no_grad():
            for s in range(0, hidden.shape[0], rows):
                h, g_ids = hidden[s : s + rows], gold[s : s + rows]
                logits, t = _capped_logits(h, weight, bias, cap)
                want = want_h or want_w or want_b
                if teacher is None:
                    loss, g = _gold_terms(logits, g_ids, want)
                else:
                    loss, g = _bucket_terms(logits, g_ids, teacher[s : s + rows], want)
                total += loss
                if g is None:
                    continue
                if t is not None:  # d(cap * tanh(x / cap)) / dx
                    g *= 1 - t * t
                if want_h:
                    grad_h[s : s + rows] = (g.to(weight.dtype) @ weight).to(hidden.dtype)
                if want_w:
                    grad_w += g.T @ h.float()
                if want_b:
                    grad_b += g.sum(dim=0)
        ctx.save_for_backward(grad_h, grad_w, grad_b)
        ctx.dtypes = (weight.dtype, None if bias is None else bias.dtype)
        return total

    @staticmethod
    def backward(ctx, grad):  # noqa: D102
        grad_h, grad_w, grad_b = ctx.saved_tensors
        w_dtype, b_dtype = ctx.dtypes
        return (
            None if grad_h is None else grad_h * grad.to(grad_h.dtype),
            None if grad_w is None else (grad_w * grad).to(w_dtype),
            None if grad_b is None else (grad_b * grad).to(b_dtype),
            None,
            None,
            None,
            None,
        )


def _gold_terms(logits: Tensor, gold: Tensor, want_grad: bool):
    """Summed cross-entropy of float32 logits (R, V) against ``gold`` (R,), and its gradient
    with respect to the logits, softmax - one-hot (or None); the logits are overwritten."""
    lse = logits.logsumexp(dim=1)
    loss = (lse - logits.gather(1, gold[:, None]).squeeze(1)).sum()
    if not want_grad:
        return loss, None
    g = logits.sub_(lse[:, None]).exp_()  # softmax, in place of the logits
    g[torch.arange(len(g), device=g.device), gold] -= 1
    return loss, g


def chunked_cross_entropy(hidden, weight, bias, gold, cap=None) -> Tensor:
    """``ChunkedCrossEntropy``, computing gradients only when grad mode is on."""
    return ChunkedCrossEntropy.apply(hidden, weight, bias, gold, cap, torch.is_grad_enabled())


@torch.no_grad()
def token_logprobs(model: nn.Module, hidden: Tensor, gold: Tensor) -> Tensor:
    """log p(gold[k]) (K,) under the LM head at hidden states (K, H), in chunks: the full
    logits never exist."""
    return token_scores(model, hidden, gold)[0]


@torch.no_grad()
def token_scores(model: nn.Module, hidden: Tensor, gold: Tensor) -> tuple[Tensor, Tensor]:
    """``token_logprobs`` and whether each gold token is the argmax of its distribution."""
    logp = torch.empty(hidden.shape[0], dtype=torch.float32, device=hidden.device)
    top = torch.empty(hidden.shape[0], dtype=torch.bool, device=hidden.device)
    rows = _chunk_rows(model.get_output_embeddings().weight.shape[0])
    for s in range(0, hidden.shape[0], rows):
        logits = head_logits(model, hidden[s : s + rows]).float()
        picked = logits.gather(1, gold[s : s + rows, None]).squeeze(1)
        logp[s : s + rows] = picked - logits.logsumexp(dim=1)
        top[s : s + rows] = logits.argmax(dim=1) == gold[s : s + rows]
    return logp, top


# ``choice_ids`` may end with REST (--choice-loss restricted+rest): one more logit standing
# for every token that is not a choice, the logsumexp of their logits, so the softmax over
# (choices, rest) equals the full softmax with the other tokens pooled: the prompt learns to
# put probability on the labels, not only to rank them.
REST = -1


def with_rest(choice_ids: Tensor) -> Tensor:
    """``choice_ids`` (C,) with REST appended: (C+1,)."""
    return torch.cat([choice_ids, choice_ids.new_tensor([REST])])


def choice_logits(model: nn.Module, hidden: Tensor, choice_ids: Tensor | None) -> Tensor:
    """``head_logits`` for the loss: (K, V) without choices, (K, C) over the choices, or
    (K, C+1) when ``choice_ids`` ends with REST (the full head runs only then, at the one
    answer position of each row)."""
    if choice_ids is None or int(choice_ids[-1]) != REST:
        return head_logits(model, hidden, choice_ids)
    return pick_choices(head_logits(model, hidden), choice_ids)


def pick_choices(logits: Tensor, choice_ids: Tensor) -> Tensor:
    """The choices' columns of full logits (K, V), plus the REST logit when asked for."""
    if int(choice_ids[-1]) != REST:
        return logits[:, choice_ids]
    ids = choice_ids[:-1]
    rest = logits.float().index_fill(1, ids, -math.inf).logsumexp(dim=1, keepdim=True)
    return torch.cat([logits[:, ids].float(), rest], dim=1)  # (K, C+1)


def head_logits(model: nn.Module, hidden: Tensor, ids: Tensor | None = None) -> Tensor:
    """The LM head (and any logit soft-capping) applied to hidden states (..., H): logits
    (..., V), or only the columns ``ids`` (..., C), which costs C/V of the full head (the
    classification loss needs two of Gemma's 262k columns)."""
    head = model.get_output_embeddings()
    if ids is None:
        logits = head(hidden)
    elif isinstance(head, nn.Linear):
        bias = None if head.bias is None else head.bias[ids]
        logits = F.linear(hidden, head.weight[ids], bias)
    else:
        logits = head(hidden)[..., ids]
    cap = getattr(model.config, "final_logit_softcapping", None)
    if cap:  # Gemma 2 style soft-capping, as the model's own forward does it
        logits = torch.tanh(logits / cap) * cap
    return logits


@torch.no_grad()
def _check_fast_head(model: nn.Module) -> bool:
    """Whether body + head alone reproduce the model's logits. Architectures that rescale
    logits in ways ``head_logits`` does not know fall back to the full forward."""
    if model.get_output_embeddings() is None or not hasattr(model, "base_model"):
        return False
    device = model.get_input_embeddings().weight.device
    ids = torch.arange(1, 9, device=device).unsqueeze(0)
    try:  # base_model may not be the body the head reads (Llama 4 text: its prefix names a
        # module the causal model does not have, so base_model is the whole model)
        full = model(input_ids=ids).logits.float()
        hidden = model.base_model(input_ids=ids).last_hidden_state
        fast = head_logits(model, hidden).float()
    except (RuntimeError, TypeError, ValueError, AttributeError, IndexError):
        return False
    return fast.shape == full.shape and torch.allclose(fast, full, atol=1e-4, rtol=1e-3)


@torch.no_grad()
def _check_shared_prefix(model: nn.Module) -> bool:
    """Whether the shared prefix reproduces the plain path's loss (a random prompt, two rows
    of different length)."""
    device = model.get_input_embeddings().weight.device
    hidden = model.get_input_embeddings().weight.shape[1]
    gen = torch.Generator().manual_seed(0)
    prompt = SoftPrompt(torch.randn(3, hidden, generator=gen)).to(device)
    ids = torch.arange(1, 13, device=device).view(2, 6)
    mask = torch.ones_like(ids)
    mask[1, 4:] = 0
    labels = ids.masked_fill(mask == 0, IGNORE_INDEX)
    batch = {"input_ids": ids, "attention_mask": mask, "labels": labels}
    try:
        fast, _ = _loss(model, prompt, batch, True, True, None)
        plain, _ = _loss(model, prompt, batch, True, False, None)
    except (RuntimeError, TypeError, ValueError, AttributeError, IndexError):
        return False  # an architecture whose cache cannot be shared this way
    return bool(torch.allclose(fast, plain, rtol=1e-3, atol=1e-4))


# --- over many rows ----------------------------------------------------------------------
