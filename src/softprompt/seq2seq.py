"""Encoder-decoder models (T5, BART): the soft prompt before the encoder's input.

As in PEFT's SEQ_2_SEQ_LM prompt tuning, the virtual tokens go before the encoder's input
embeddings (its attention mask extended with ones) and the decoder is untouched: it reads the
target shifted right, as the model itself does from ``labels``. A row holds the encoder's
input ids in ``input_ids`` and the decoder's target ids (with EOS) in ``labels``; they are not
aligned, so this kind has its own collate, loss, scoring and generation.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from softprompt.data import IGNORE_INDEX, Example, Row
from softprompt.errors import ConfigError
from softprompt.prompt import embed_tokens, rows_prompts


def tokenize_pairs(
    examples: list[Example], tokenizer, max_tokens: int, task_ids: dict[str, int] | None = None
) -> list[Row]:
    """One row per input/target pair: the encoder's ids (at most ``max_tokens``, the start
    cut) and the target's ids with the model's EOS (at most ``max_tokens``)."""
    rows = []
    for ex in examples:
        if ex.target is None or ex.messages is not None or ex.head is not None:
            raise ConfigError(
                f"{ex.where}: an encoder-decoder model learns input/target pairs; give records "
                "with an input and a target field (no conversations, plain text or "
                "{soft_prompt} in the template)"
            )
        src = tokenizer(ex.source)["input_ids"]
        tgt = target_ids(tokenizer, ex.target)[:max_tokens]
        if len(src) > max_tokens:  # keep the end (and its EOS): the question matters most
            src = src[len(src) - max_tokens :]
        rows.append(Row(src, tgt, task=task_ids[ex.task] if task_ids else 0))
    return rows


def target_ids(tokenizer, text: str) -> list[int]:
    """The decoder's target as the tokenizer writes it (T5: text + EOS; BART: BOS + text +
    EOS), with an EOS added where it has none, so the model learns to stop."""
    ids = tokenizer(text_target=text)["input_ids"]
    return ids if ids and ids[-1] == tokenizer.eos_token_id else [*ids, tokenizer.eos_token_id]


def collate(rows: list[Row], pad_id: int) -> dict[str, Tensor]:
    """Encoder ids and mask (B, S), right-padded; labels (B, T) padded with IGNORE_INDEX."""
    width = max(len(r.input_ids) for r in rows)
    target_width = max(len(r.labels) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    labels = torch.full((len(rows), target_width), IGNORE_INDEX, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r.input_ids)] = torch.tensor(r.input_ids)
        mask[i, : len(r.input_ids)] = 1
        labels[i, : len(r.labels)] = torch.tensor(r.labels)
    task = torch.tensor([r.task for r in rows], dtype=torch.long)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels, "task": task}


def encoder_inputs(model: nn.Module, prompt, batch: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
    """The encoder's input embeddings (B, N+S, H) with the prompt first, and its mask."""
    embeds, mask = embed_tokens(model, batch["input_ids"]), batch["attention_mask"]
    if prompt is None:
        return embeds, mask
    virtual, which = rows_prompts(prompt, batch)
    virtual = virtual[which].to(embeds.dtype)  # (B, N, H)
    ones = torch.ones(virtual.shape[:2], dtype=mask.dtype, device=mask.device)
    return torch.cat([virtual, embeds], dim=1), torch.cat([ones, mask], dim=1)


def rows_loss(model: nn.Module, prompt, rows: list[Row], pad_id: int, device) -> tuple:
    """(summed cross-entropy over target tokens, their count, positions run)."""
    batch = {k: v.to(device) for k, v in collate(rows, pad_id).items()}
    embeds, mask = encoder_inputs(model, prompt, batch)
    labels = batch["labels"]
    # decoder input: the labels shifted right behind the start token, as the model does it
    decoder_ids = model.prepare_decoder_input_ids_from_labels(labels=labels)
    logits = model(inputs_embeds=embeds, attention_mask=mask, decoder_input_ids=decoder_ids).logits
    keep = labels != IGNORE_INDEX
    loss = F.cross_entropy(logits[keep].float(), labels[keep], reduction="sum")
    return loss, int(keep.sum()), int(mask.numel() + labels.numel())


@torch.no_grad()
def generate(model: nn.Module, tokenizer, prompt, sources: list[str], gen_cfg) -> list[str]:
    """The decoder's answers to ``sources`` (one batch), the prompt before each input;
    ``gen_cfg``: a transformers GenerationConfig."""
    device = model.get_input_embeddings().weight.device
    rows = [Row(tokenizer(s)["input_ids"], [IGNORE_INDEX]) for s in sources]
    batch = {k: v.to(device) for k, v in collate(rows, tokenizer.pad_token_id).items()}
    embeds, mask = encoder_inputs(model, prompt, batch)
    # the decoder starts from the model's own start token, whatever the tokenizer's BOS
    gen_cfg.bos_token_id = None
    gen_cfg.decoder_start_token_id = model.config.decoder_start_token_id
    out = model.generate(inputs_embeds=embeds, attention_mask=mask, generation_config=gen_cfg)
    return tokenizer.batch_decode(out, skip_special_tokens=True)


@torch.no_grad()
def score_choices(
    model: nn.Module, tokenizer, prompt, sources: list[str], choices: list[str]
) -> list[list[float]]:
    """Log-likelihood of each choice as the decoder's output for each source (summed over
    its tokens and EOS). The encoder runs once per source; every choice reads its output."""
    device = model.get_input_embeddings().weight.device
    targets = [target_ids(tokenizer, c) for c in choices]
    choice_rows = [Row([0], t) for t in targets]
    labels = collate(choice_rows, 0)["labels"].to(device)  # (C, T)
    decoder_ids = model.prepare_decoder_input_ids_from_labels(labels=labels)
    keep = labels != IGNORE_INDEX
    out = []
    encoder = model.get_encoder()
    for source in sources:
        rows = [Row(tokenizer(source)["input_ids"], [IGNORE_INDEX])]
        batch = {k: v.to(device) for k, v in collate(rows, tokenizer.pad_token_id).items()}
        embeds, mask = encoder_inputs(model, prompt, batch)
        hidden = encoder(inputs_embeds=embeds, attention_mask=mask).last_hidden_state  # (1,S,H)
        c = len(choices)
        logits = model(
            encoder_outputs=(hidden.expand(c, -1, -1),),
            attention_mask=mask.expand(c, -1),
            decoder_input_ids=decoder_ids,
        ).logits.float()  # (C, T, V)
        logp = F.log_softmax(logits, dim=-1).gather(2, labels.clamp(min=0).unsqueeze(2))
        out.append((logp.squeeze(2) * keep).sum(dim=1).tolist())
    return out
