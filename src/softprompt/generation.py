"""Inference with or without a soft prompt, several inputs at once.

Rows are left-padded (padding, then the virtual tokens, then the text) and the
position of each real token is counted from the attention mask, so a batched row
gets the same tokens it would get alone.
"""

from __future__ import annotations

import torch
from torch import Tensor
from transformers import GenerationConfig

from softprompt.config import GenerateConfig, template_fields
from softprompt.loading import LoadedModel
from softprompt.prompt import SoftPrompt, embed_tokens


def apply_template(text: str, template: str | None) -> str:
    """Put a raw input into the prompt's template: every ``{field}`` receives the input."""
    if not template:
        return text
    return template.format_map({n: text for n in template_fields(template)})


@torch.no_grad()
def generate(
    loaded: LoadedModel,
    texts: list[str],
    prompt: SoftPrompt | None = None,
    cfg: GenerateConfig | None = None,
    template: str | None = None,
) -> list[str]:
    """Continue each text (after ``template``) with the base model, or with ``prompt``."""
    cfg = cfg or GenerateConfig()
    model, tok = loaded.model, loaded.tokenizer
    torch.manual_seed(cfg.seed)
    gen_cfg = GenerationConfig(
        max_new_tokens=cfg.max_new_tokens,
        do_sample=cfg.temperature > 0,
        temperature=cfg.temperature if cfg.temperature > 0 else None,
        top_p=cfg.top_p if cfg.temperature > 0 else None,
        top_k=None,
        repetition_penalty=cfg.repetition_penalty,
        pad_token_id=tok.pad_token_id,
        eos_token_id=tok.eos_token_id,
        bos_token_id=tok.bos_token_id,
    )
    out: list[str] = []
    for start in range(0, len(texts), cfg.batch_size):
        chunk = [apply_template(t, template) for t in texts[start : start + cfg.batch_size]]
        embeds, mask = _left_padded(model, tok, chunk, prompt)
        new = model.generate(inputs_embeds=embeds, attention_mask=mask, generation_config=gen_cfg)
        out += [tok.decode(row, skip_special_tokens=True) for row in new]
    return out


def _left_padded(model, tok, texts: list[str], prompt: SoftPrompt | None) -> tuple[Tensor, Tensor]:
    """(B, L, H) embeddings and (B, L) mask: [padding][virtual tokens][text] per row."""
    device = model.get_input_embeddings().weight.device
    rows = []
    for text in texts:
        ids = torch.tensor([tok(text, add_special_tokens=True)["input_ids"]], device=device)
        emb = embed_tokens(model, ids)  # (1, T, H)
        mask = torch.ones(ids.shape, dtype=torch.long, device=device)
        if prompt is not None:
            emb, mask, _ = prompt.prepend(emb, mask)
        rows.append((emb[0], mask[0]))
    width = max(e.shape[0] for e, _ in rows)
    hidden = rows[0][0].shape[1]
    embeds = rows[0][0].new_zeros(len(rows), width, hidden)
    masks = torch.zeros(len(rows), width, dtype=torch.long, device=device)
    for i, (e, m) in enumerate(rows):
        embeds[i, width - e.shape[0] :] = e
        masks[i, width - e.shape[0] :] = m
    return embeds, masks
