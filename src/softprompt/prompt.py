"""The soft prompt: N learnable vectors put in front of the token embeddings.

The prompt lives in the space of what the model's input-embedding layer
*returns* (Gemma multiplies token vectors by sqrt(hidden) inside that layer),
so it can be concatenated with the embedded text as is. It is kept in float32
and cast to the model's dtype only where the two meet, in ``prepend``.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from softprompt.config import PromptConfig
from softprompt.errors import ConfigError

IGNORE_INDEX = -100  # the one label value that carries no loss
VOCAB_INIT_POOL = 5000  # Lester et al. sample from the 5,000 most common tokens


class SoftPrompt(nn.Module):
    """``num_virtual_tokens`` learnable embeddings, float32, shape (N, H)."""

    def __init__(self, embeddings: Tensor):
        super().__init__()
        self.embedding = nn.Parameter(embeddings.detach().float().clone())  # (N, H)

    @property
    def num_virtual_tokens(self) -> int:
        return self.embedding.shape[0]

    @property
    def hidden_size(self) -> int:
        return self.embedding.shape[1]

    def prepend(
        self, inputs_embeds: Tensor, attention_mask: Tensor, labels: Tensor | None = None
    ) -> tuple[Tensor, Tensor, Tensor | None]:
        """Put the prompt before each row: embeds (B, N+T, H), mask (B, N+T), labels (B, N+T)."""
        b = inputs_embeds.shape[0]
        return prepend(
            self.embedding.unsqueeze(0).expand(b, -1, -1), inputs_embeds, attention_mask, labels
        )


class PromptSet(nn.Module):
    """One soft prompt per task, trained side by side on one frozen model.

    A batch may mix tasks: ``batch["task"]`` (B,) holds each row's index into ``names``.
    Each task's prompt is its own parameter, so a task absent from a step gets no gradient
    (and no optimizer update).
    """

    def __init__(self, names: list[str], prompts: list[SoftPrompt]):
        super().__init__()
        if len({p.embedding.shape for p in prompts}) != 1:
            raise ConfigError("every task's prompt needs the same number of virtual tokens")
        self.names = list(names)
        self.prompts = nn.ModuleList(prompts)

    @property
    def num_virtual_tokens(self) -> int:
        return self.prompts[0].num_virtual_tokens

    def stacked(self) -> Tensor:
        """All prompts, (K, N, H), detached."""
        return torch.stack([p.embedding.detach() for p in self.prompts])

    def load_stacked(self, values: Tensor) -> None:
        for p, v in zip(self.prompts, values):
            p.embedding.data.copy_(v)


def prepend(
    virtual: Tensor, inputs_embeds: Tensor, attention_mask: Tensor, labels: Tensor | None = None
) -> tuple[Tensor, Tensor, Tensor | None]:
    """Put each row's virtual tokens ``virtual`` (B, N, H) before its text (B, T, H)."""
    b, n = inputs_embeds.shape[0], virtual.shape[1]
    embeds = torch.cat([virtual.to(inputs_embeds.dtype), inputs_embeds], dim=1)
    mask = torch.cat([attention_mask.new_ones(b, n), attention_mask], dim=1)
    if labels is not None:
        labels = torch.cat([labels.new_full((b, n), IGNORE_INDEX), labels], dim=1)
    return embeds, mask, labels


def rows_prompts(prompt: SoftPrompt | PromptSet, batch: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
    """The distinct prompts a batch uses, (K, N, H), and each row's index into them, (B,)."""
    ids = batch["input_ids"]
    if isinstance(prompt, PromptSet):
        present, which = torch.unique(batch["task"], return_inverse=True)
        virtual = torch.stack([prompt.prompts[i].embedding for i in present.tolist()])
        return virtual, which.to(ids.device)
    return prompt.embedding.unsqueeze(0), ids.new_zeros(ids.shape[0])


def embed_tokens(model: nn.Module, input_ids: Tensor) -> Tensor:
    """Token ids -> what the model's embedding layer returns (scaled for Gemma)."""
    return model.get_input_embeddings()(input_ids)


def init_prompt(model: nn.Module, tokenizer, cfg: PromptConfig, seed: int = 0) -> SoftPrompt:
    """Build the starting prompt that ``cfg.init`` asks for."""
    n = cfg.num_virtual_tokens
    gen = torch.Generator().manual_seed(seed)
    if cfg.init == "random":
        ref = _embedding_sample(model, gen)
        return SoftPrompt(torch.randn(n, ref.shape[1], generator=gen) * ref.std())
    if cfg.init == "text":
        ids = tokenizer(cfg.init_text, add_special_tokens=False)["input_ids"]
        if not ids:
            raise ConfigError("--init-text gives no tokens; give a phrase describing the task")
        ids = (ids * (n // len(ids) + 1))[:n]  # repeat, then cut to N
        return SoftPrompt(_embed_ids(model, ids))
    if cfg.init == "vocab":
        pool = _common_token_ids(tokenizer, model)
        pick = pool[torch.randint(len(pool), (n,), generator=gen)]
        return SoftPrompt(_embed_ids(model, pick.tolist()))
    from softprompt.artifacts import load_prompt  # a folder holding a saved prompt

    saved, _ = load_prompt(Path(cfg.init), model=model)
    return saved


@torch.no_grad()
def _embed_ids(model: nn.Module, ids: list[int]) -> Tensor:
    weight = model.get_input_embeddings().weight
    return embed_tokens(model, torch.tensor(ids, device=weight.device)).float().cpu()


def _embedding_sample(model: nn.Module, gen: torch.Generator) -> Tensor:
    vocab = model.get_input_embeddings().weight.shape[0]
    return _embed_ids(model, torch.randint(vocab, (1024,), generator=gen).tolist())


def _common_token_ids(tokenizer, model: nn.Module) -> Tensor:
    """The first ids that are not special tokens (BPE and SentencePiece vocabularies
    list frequent pieces first)."""
    vocab = model.get_input_embeddings().weight.shape[0]
    special = set(tokenizer.all_special_ids)
    # Gemma reserves hundreds of unused/control ids near the start: skip what decodes to markup.
    ids = []
    for i in range(vocab):
        if i in special:
            continue
        piece = tokenizer.convert_ids_to_tokens(i)
        if piece is None or (piece.startswith("<") and piece.endswith(">")):
            continue
        ids.append(i)
        if len(ids) == VOCAB_INIT_POOL:
            break
    return torch.tensor(ids)


# --- the loss, computed only where it is needed ------------------------------------------


def lm_loss(
    model: nn.Module,
    prompt: SoftPrompt | PromptSet | None,
    batch: dict[str, Tensor],
    fast_head: bool = True,
    shared_prefix: bool = True,
    choice_ids: Tensor | None = None,
) -> tuple[Tensor, int]:
    """Summed next-token cross-entropy over labelled positions, and their count.

    Two shortcuts, each checked once per model against the plain path (and skipped where
    they would change the result):
    - ``fast_head``: the LM head runs only where a label exists (for Gemma 3 270M the
      262k-word head costs more than the whole body at every other position);
    - ``shared_prefix``: the virtual tokens come first and attend only to each other, so
      they are run once (batch 1) and their keys/values are shared by every row; the
      gradient flows back through that cache to the prompt.
    With ``choice_ids`` (C,) (classification mode) only each row's first labelled position
    counts, and its softmax runs over the choices' first tokens alone. With a ``PromptSet``
    each row gets its own task's prompt (``batch["task"]``); rows of one task share its
    prefix.
    """
    labels = batch["labels"]
    if prompt is not None and fast_head and shared_prefix and uses_shared_prefix(model):
        hidden = _hidden_with_shared_prefix(model, *rows_prompts(prompt, batch), batch)
        keep = _positions(labels, choice_ids)  # hidden[:, j] predicts labels[:, j]
        logits = head_logits(model, hidden[keep], choice_ids)  # (K, V), or (K, C) with choices
        return _score(logits, labels[keep], choice_ids), int(keep.sum())
    embeds = embed_tokens(model, batch["input_ids"])  # (B, T, H)
    mask = batch["attention_mask"]
    if prompt is not None:
        virtual, which = rows_prompts(prompt, batch)
        embeds, mask, labels = prepend(virtual[which], embeds, mask, labels)  # (B, N+T, ...)
    targets = labels[:, 1:]  # position t predicts token t+1
    keep = _positions(targets, choice_ids)  # (B, T'-1)
    if fast_head and uses_fast_head(model):
        hidden = model.base_model(inputs_embeds=embeds, attention_mask=mask).last_hidden_state
        logits = head_logits(model, hidden[:, :-1][keep], choice_ids)  # labelled positions only
    else:
        logits = model(inputs_embeds=embeds, attention_mask=mask).logits[:, :-1][keep]
        if choice_ids is not None:
            logits = logits[:, choice_ids]  # (K, C)
    return _score(logits, targets[keep], choice_ids), int(keep.sum())


def _positions(targets: Tensor, choice_ids: Tensor | None) -> Tensor:
    """Where the loss is taken: every label, or (classification) each row's first one."""
    keep = targets != IGNORE_INDEX
    if choice_ids is not None:  # the answer's first token only: one position per row
        keep = keep & (keep.cumsum(dim=1) == 1)
    return keep


def _score(logits: Tensor, gold: Tensor, choice_ids: Tensor | None) -> Tensor:
    """Summed cross-entropy in float32, over the vocabulary (K, V) or, with ``choice_ids``,
    over the choices only (logits (K, C))."""
    if choice_ids is not None:
        gold = (gold.unsqueeze(1) == choice_ids.unsqueeze(0)).long().argmax(dim=1)
    return F.cross_entropy(logits.float(), gold, reduction="sum")


def _hidden_with_shared_prefix(
    model: nn.Module, virtual: Tensor, which: Tensor, batch: dict[str, Tensor]
) -> Tensor:
    """Final hidden states that predict each text token: (B, 1+T, H), where column 0 is the
    last virtual token's state (it predicts the first text token).

    ``virtual`` (K, N, H) runs once (batch K, usually 1); row i then reads prompt
    ``which[i]``'s keys and values from the shared cache.
    """
    body = model.base_model
    ids, mask = batch["input_ids"], batch["attention_mask"]
    b, n = ids.shape[0], virtual.shape[1]
    weight = model.get_input_embeddings().weight
    head = body(inputs_embeds=virtual.to(weight.dtype), use_cache=True)  # the prompts, once
    cache = head.past_key_values
    cache.batch_select_indices(which)  # (K, kv, N, d) -> (B, kv, N, d), differentiable
    full_mask = torch.cat([mask.new_ones(b, n), mask], dim=1)  # (B, N+T)
    text = body(
        inputs_embeds=embed_tokens(model, ids),
        attention_mask=full_mask,
        past_key_values=cache,
        use_cache=True,
    ).last_hidden_state  # (B, T, H)
    last_virtual = head.last_hidden_state[which, -1:]  # (B, 1, H)
    return torch.cat([last_virtual, text[:, :-1]], dim=1)[:, : ids.shape[1]]


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
def uses_fast_head(model: nn.Module) -> bool:
    """Whether body + head alone reproduce the model's logits (checked once per model).

    Architectures that rescale logits in ways not handled by ``head_logits`` fall back to the
    full forward, so the speed-up never changes results.
    """
    cached = getattr(model, "_softprompt_fast_head", None)
    if cached is not None:
        return cached
    ok = False
    if model.get_output_embeddings() is not None and hasattr(model, "base_model"):
        device = model.get_input_embeddings().weight.device
        ids = torch.arange(1, 9, device=device).unsqueeze(0)
        full = model(input_ids=ids).logits.float()
        hidden = model.base_model(input_ids=ids).last_hidden_state
        ok = torch.allclose(head_logits(model, hidden).float(), full, atol=1e-4, rtol=1e-3)
    model._softprompt_fast_head = ok
    return ok


def uses_shared_prefix(model: nn.Module) -> bool:
    """Whether the shared-prefix path reproduces the plain path's loss for this model
    (checked once, on a random prompt and two rows of different length)."""
    cached = getattr(model, "_softprompt_shared_prefix", None)
    if cached is not None:
        return cached
    ok = False
    if uses_fast_head(model):
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
            with torch.no_grad():
                model._softprompt_shared_prefix = True
                fast, _ = lm_loss(model, prompt, batch)
                model._softprompt_shared_prefix = False
                plain, _ = lm_loss(model, prompt, batch)
            ok = bool(torch.allclose(fast, plain, rtol=1e-3, atol=1e-4))
        except (RuntimeError, TypeError, ValueError, AttributeError, IndexError):
            ok = False  # an architecture whose cache cannot be shared this way
    model._softprompt_shared_prefix = ok
    return ok
