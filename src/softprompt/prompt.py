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
        b, n = inputs_embeds.shape[0], self.num_virtual_tokens
        prompt = self.embedding.to(inputs_embeds.dtype).unsqueeze(0).expand(b, -1, -1)  # (B, N, H)
        embeds = torch.cat([prompt, inputs_embeds], dim=1)
        mask = torch.cat([attention_mask.new_ones(b, n), attention_mask], dim=1)
        if labels is not None:
            labels = torch.cat([labels.new_full((b, n), IGNORE_INDEX), labels], dim=1)
        return embeds, mask, labels


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
    prompt: SoftPrompt | None,
    batch: dict[str, Tensor],
    fast_head: bool = True,
    choice_ids: Tensor | None = None,
) -> tuple[Tensor, int]:
    """Summed next-token cross-entropy over labelled positions, and their count.

    With ``fast_head`` the LM head runs only where a label exists: for Gemma 3 270M
    the 262k-word head costs more than the whole body at every other position.
    With ``choice_ids`` (C,) (classification mode) only each row's first labelled position
    counts, and its softmax runs over the choices' first tokens alone.
    """
    embeds = embed_tokens(model, batch["input_ids"])  # (B, T, H)
    mask, labels = batch["attention_mask"], batch["labels"]
    if prompt is not None:
        embeds, mask, labels = prompt.prepend(embeds, mask, labels)  # (B, N+T, ...)
    targets = labels[:, 1:]  # position t predicts token t+1
    keep = targets != IGNORE_INDEX  # (B, T'-1)
    if choice_ids is not None:  # the answer's first token only: one position per row
        keep = keep & (keep.cumsum(dim=1) == 1)
    n_tokens = int(keep.sum())
    if fast_head and uses_fast_head(model):
        hidden = model.base_model(inputs_embeds=embeds, attention_mask=mask).last_hidden_state
        logits = _head(model, hidden[:, :-1][keep])  # (K, V): labelled positions only
    else:
        logits = model(inputs_embeds=embeds, attention_mask=mask).logits[:, :-1][keep]
    gold = targets[keep]
    if choice_ids is not None:
        logits = logits[:, choice_ids]  # (K, C)
        gold = (gold.unsqueeze(1) == choice_ids.unsqueeze(0)).long().argmax(dim=1)
    loss = F.cross_entropy(logits.float(), gold, reduction="sum")
    return loss, n_tokens


def _head(model: nn.Module, hidden: Tensor) -> Tensor:
    logits = model.get_output_embeddings()(hidden)
    cap = getattr(model.config, "final_logit_softcapping", None)
    if cap:  # Gemma 2 style soft-capping, as the model's own forward does it
        logits = torch.tanh(logits / cap) * cap
    return logits


@torch.no_grad()
def uses_fast_head(model: nn.Module) -> bool:
    """Whether body + head alone reproduce the model's logits (checked once per model).

    Architectures that rescale logits in ways not handled by ``_head`` fall back to the
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
        ok = torch.allclose(_head(model, hidden).float(), full, atol=1e-4, rtol=1e-3)
    model._softprompt_fast_head = ok
    return ok
