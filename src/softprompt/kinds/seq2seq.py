"""Encoder-decoder models (T5, BART): the soft prompt before the encoder's input.

As in PEFT's SEQ_2_SEQ_LM prompt tuning, the virtual tokens go before the encoder's input
embeddings (its attention mask extended with ones) and the decoder is untouched: it reads the
target shifted right, as the model itself does from ``labels``. A row holds the encoder's
input ids in ``input_ids`` and the decoder's target ids (with EOS) in ``labels``; they are not
aligned, so this kind has its own collate, loss, scoring and generation.

A deep prompt (--method prefix) sits where PEFT's SEQ_2_SEQ_LM prefix tuning puts it: keys
and values before the decoder's own in every decoder self-attention layer; the encoder and
the cross-attention are untouched. Held per decoder layer (layer i's keys/values in block
i, as a decoder LM's), it is stored in PEFT's order (``seq2seq_deep``).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import AutoModelForSeq2SeqLM
from transformers.models.auto.modeling_auto import MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES

from softprompt.console import batch_parts
from softprompt.data import Example
from softprompt.errors import ConfigError
from softprompt.generation import generation_config, prompt_batches
from softprompt.kinds.prompt_first import encode_whole, encode_whole_example, refuse_training
from softprompt.kinds.refuse import check_inputs
from softprompt.kinds.seq2seq_deep import (
    compiled_deep,
    decoder_prefix,
    deep_row,
    from_peft,
    packed_prefixes,
    peft_layers,
    to_peft,
)
from softprompt.prefix import Prefix, PromptLike, compile_prefix, embeds_only
from softprompt.prompt import (
    DeepPrompt,
    SoftPrompt,
    before_input,
    embed_tokens,
    input_scale,
    is_deep,
)
from softprompt.rows import IGNORE_INDEX, Encoded, Row, warn_cut
from softprompt.scoring import mean_row_loss
from softprompt.templates import PromptFormat


def tokenize_pairs(
    examples: list[Example], tokenizer, max_tokens: int, task_ids: dict[str, int] | None = None
) -> list[Row]:
    """One row per input/target pair: the encoder's ids (at most ``max_tokens``, the start
    cut) and the target's ids with the model's EOS (at most ``max_tokens``)."""
    rows, cut = [], 0
    for ex in examples:
        if ex.target is None or ex.messages is not None or ex.head is not None:
            raise ConfigError(
                f"{ex.where}: an encoder-decoder model learns input/target pairs; give records "
                "with an input and a target field (no conversations, plain text or "
                "{soft_prompt} in the template)"
            )
        src = tokenizer(ex.source)["input_ids"]
        tgt = target_ids(tokenizer, ex.target)
        cut += len(src) > max_tokens or len(tgt) > max_tokens
        tgt = tgt[:max_tokens]
        if len(src) > max_tokens:  # keep the end (and its EOS): the question matters most
            src = src[len(src) - max_tokens :]
        rows.append(Row(src, tgt, task=task_ids[ex.task] if task_ids else 0))
    warn_cut(cut, len(rows), max_tokens)
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


def rows_loss(model: nn.Module, prompt, rows: list[Row], pad_id: int, device) -> tuple:
    """(summed cross-entropy over target tokens, their count, positions run); a deep prompt:
    each row's keys/values in the decoder's cache, built once per batch."""
    batch = {k: v.to(device) for k, v in collate(rows, pad_id).items()}
    labels = batch["labels"]
    decoder_ids = decoder_input_ids(model, labels, pad_id)
    extra = {}
    if is_deep(prompt):
        extra = {"past_key_values": decoder_prefix(model, prompt, batch), "use_cache": True}
        prompt = None  # nothing goes before the encoder's input
    embeds, mask = before_input(model, prompt, batch)
    logits = model(inputs_embeds=embeds, attention_mask=mask, decoder_input_ids=decoder_ids,
                   **extra).logits  # fmt: skip
    keep = labels != IGNORE_INDEX
    loss = F.cross_entropy(logits[keep].float(), labels[keep], reduction="sum")
    return loss, int(keep.sum()), int(mask.numel() + labels.numel())


def encoder_embeds(
    model: nn.Module, ids: Sequence[list[int]], prompts: Sequence[PromptLike], pad_id: int
) -> tuple[Tensor, Tensor]:
    """The encoder's input (B, L, H) and mask (B, L) for rows of different prompts: each row's
    prompt (a SoftPrompt, a compiled Prefix's embeddings, or none) before its ids,
    right-padded."""
    weight = model.get_input_embeddings().weight
    rows = []
    for row, prompt in zip(ids, prompts):
        text = embed_tokens(model, torch.tensor([row], device=weight.device))[0]  # (T, H)
        if prompt is not None and not deep_row(prompt):  # a deep prompt is the decoder's
            virtual = prompt.embeds if isinstance(prompt, Prefix) else prompt.embedding
            text = torch.cat([virtual.detach().to(device=text.device, dtype=text.dtype), text])
        rows.append(text)
    width = max(len(x) for x in rows)
    embeds = weight.new_zeros(len(rows), width, weight.shape[1])
    mask = torch.zeros(len(rows), width, dtype=torch.long, device=weight.device)
    for i, x in enumerate(rows):
        embeds[i, : len(x)], mask[i, : len(x)] = x, 1
    return embeds, mask


def decoder_input_ids(model: nn.Module, labels: Tensor, pad_id: int) -> Tensor:
    """The decoder's input (B, T): ``labels`` shifted right behind the start token, as the
    model shifts them itself when given labels. A model without
    ``prepare_decoder_input_ids_from_labels`` (BlenderbotSmall), or whose config has no start
    token for it (T5 without decoder_start_token_id), is shifted here, behind the configured
    start token (else pad), with IGNORE_INDEX as padding."""
    prepare = getattr(model, "prepare_decoder_input_ids_from_labels", None)
    if prepare is not None:
        try:
            return prepare(labels=labels)
        except (AttributeError, TypeError, ValueError):
            pass  # no start token in the config: shift by hand
    shifted = labels.new_full(labels.shape, pad_id)
    shifted[:, 1:] = labels[:, :-1].masked_fill(labels[:, :-1] == IGNORE_INDEX, pad_id)
    shifted[:, 0] = _configured_start(model, pad_id)
    return shifted


def _configured_start(model: nn.Module, default: int) -> int:
    for source in (model.config, getattr(model, "generation_config", None)):
        start = getattr(source, "decoder_start_token_id", None)
        if isinstance(start, int):
            return start
    return default


def decoder_start(model: nn.Module, eos_id: int, pad_id: int) -> int:
    """The token generation starts the decoder from: the one ``decoder_input_ids`` puts
    first in training. mBART's config has none (its shift moves the target's last token, EOS,
    to the front), so it is read off the shift of a one-token target [EOS]."""
    device = model.get_input_embeddings().weight.device
    probe = torch.tensor([[eos_id]], device=device)
    return int(decoder_input_ids(model, probe, pad_id)[0, 0])


@torch.no_grad()
def generate_ids(
    model: nn.Module,
    ids: Sequence[list[int]],
    prompts: Sequence[PromptLike],
    gen_cfg,
    stopping=None,
    pad_id: int = 0,
    processors=None,
) -> Tensor:
    """The decoder's tokens (B, steps) for each row of encoder ids with its own prompt (a deep
    one in the decoder's cache); ``gen_cfg``: a transformers GenerationConfig (``stopping``:
    criteria that may stream)."""
    embeds, mask = encoder_embeds(model, ids, prompts, pad_id)
    extra = packed_prefixes(model, compiled_deep(model, prompts))
    # the decoder starts from the token training put first, whatever the tokenizer's BOS
    gen_cfg.bos_token_id = None
    eos = gen_cfg.eos_token_id
    eos = eos[0] if isinstance(eos, (list, tuple)) else eos
    gen_cfg.decoder_start_token_id = decoder_start(model, eos, pad_id)
    return model.generate(inputs_embeds=embeds, attention_mask=mask, generation_config=gen_cfg,
                          stopping_criteria=stopping, logits_processor=processors,
                          **extra)  # fmt: skip


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
    decoder_ids = decoder_input_ids(model, labels, tokenizer.pad_token_id)
    keep = labels != IGNORE_INDEX
    out = []
    encoder = model.get_encoder()
    c = len(choices)
    for source in sources:
        rows = [Row(tokenizer(source)["input_ids"], [IGNORE_INDEX])]
        batch = {k: v.to(device) for k, v in collate(rows, tokenizer.pad_token_id).items()}
        extra = {}
        if is_deep(prompt):  # every choice reads the prompt's keys/values in the decoder
            choice_batch = {"input_ids": labels, "task": labels.new_zeros(c)}
            extra = {"past_key_values": decoder_prefix(model, prompt, choice_batch),
                     "use_cache": True}  # fmt: skip
        embeds, mask = before_input(model, None if extra else prompt, batch)
        # the encoder's own output object, every choice reading its states: ProphetNet and
        # SwitchTransformers read it by field name (router_logits), not as a tuple
        encoded = encoder(inputs_embeds=embeds, attention_mask=mask)
        encoded["last_hidden_state"] = encoded.last_hidden_state.expand(c, -1, -1)  # (C,S,H)
        logits = model(
            encoder_outputs=encoded,
            attention_mask=mask.expand(c, -1),
            decoder_input_ids=decoder_ids,
            **extra,
        ).logits.float()  # (C, T, V)
        logp = F.log_softmax(logits, dim=-1).gather(2, labels.clamp(min=0).unsqueeze(2))
        out.append((logp.squeeze(2) * keep).sum(dim=1).tolist())
    return out


class Seq2Seq:
    """The encoder-decoder kind (see ``kinds.Kind``)."""

    name = "seq2seq"
    peft_task_type = "SEQ_2_SEQ_LM"
    model_types = MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES
    auto_class = AutoModelForSeq2SeqLM
    chat = False
    serves = True
    prompt_inside = False
    restricted_choices = False
    default_lr = 3e-2  # Lester et al. trained T5 prompts at 0.3 with Adafactor; not measured
    default_prefix_lr = 3e-2  # --method prefix: as classifiers' (not measured on T5 yet)
    default_epochs = (3, 3)  # not measured on a public set yet
    default_steps = 0
    default_method = "prompt"
    default_select = ("loss", "loss")  # --select not measured on an encoder-decoder yet
    deep_prompts = True  # --method prefix: keys/values in the decoder's self-attention

    def prepare(self, model: nn.Module, cfg, source: str) -> None:
        check_inputs(model, model.get_encoder())  # the prompt goes before the encoder's input
        input_scale(model)  # how the encoder scales embedded ids, decided once

    def load_kwargs(self, labels: list[str] | None) -> dict:
        return {}

    def labels(self, model: nn.Module) -> list[str] | None:
        return None

    def check_deep(self, loaded) -> None:
        pass  # the cache's layout is checked for every kind (prefix.kv_layout)

    def check_training(self, cfg, loaded, processes: int, examples: list[Example]) -> None:
        refuse_training(cfg, self.name, "learns the whole target: --choice-loss full")

    def tokenize(
        self, examples: list[Example], tokenizer, max_tokens: int, task_ids, fmt, delimiter,
        loss_on: str, labels: list[str] | None = None,
    ) -> list[Row]:  # fmt: skip
        return tokenize_pairs(examples, tokenizer, max_tokens, task_ids)

    def data_mode(self, mode: str) -> str:
        return mode

    def trainable(self, model: nn.Module) -> list[nn.Parameter]:
        return []

    def rows_loss(self, model, prompts, rows, pad_id, device, choice_ids=None):
        return rows_loss(model, prompts, rows, pad_id, device)

    def evaluate_loss(self, model, prompt, rows, batch_size, pad_id, choice_ids=None) -> dict:
        return mean_row_loss(rows_loss, model, prompt, rows, batch_size, pad_id)

    def encode(self, tokenizer, fmt: PromptFormat, text: str, fields=None) -> Encoded:
        return encode_whole(tokenizer, fmt, text, fields)

    def encode_example(self, tokenizer, fmt: PromptFormat, ex: Example) -> Encoded:
        return encode_whole_example(tokenizer, ex, "an encoder-decoder model")

    def answer(self, loaded, encoded, prompts, cfg, prefix_cache=True, stop_ids=None,
               labels=None):  # fmt: skip
        torch.manual_seed(cfg.seed)  # sampling, as for causal models
        tok, gen_cfg = loaded.tokenizer, generation_config(loaded.tokenizer, cfg)
        out = [""] * len(encoded)
        for part in batch_parts(prompt_batches(prompts, cfg.batch_size)):
            new = generate_ids(loaded.model, [encoded[i][1] for i in part],
                               [prompts[i] for i in part], gen_cfg, None,
                               tok.pad_token_id)  # fmt: skip
            for i, text in zip(part, tok.batch_decode(new, skip_special_tokens=True)):
                out[i] = text.strip()
        return out

    def score_choices(self, loaded, prompt, encoded, sources, choices, opts, rows=None):
        tok = loaded.tokenizer
        scores = score_choices(loaded.model, tok, prompt, sources, choices)
        if opts.get("length_norm"):
            lengths = [len(target_ids(tok, c)) for c in choices]
            scores = [[s / n for s, n in zip(row, lengths)] for row in scores]
        return scores, None

    def generate_ids(self, model, ids, prefixes, gen_cfg, stopping=None, processors=None):
        return generate_ids(model, ids, prefixes, gen_cfg, stopping, gen_cfg.pad_token_id or 0,
                            processors)  # fmt: skip

    def compile(self, model: nn.Module, prompt: SoftPrompt) -> Prefix:
        if isinstance(prompt, DeepPrompt):  # the decoder's keys/values, as they are
            return compile_prefix(model, prompt)
        return embeds_only(model, prompt)  # nothing runs ahead of an encoder's input

    def adapter_fields(self, model: nn.Module) -> dict:
        return {"num_transformer_submodules": 2, "modules_to_save": None}

    def saved_rows(self, rows: Tensor) -> Tensor:
        return torch.cat([rows, rows])  # PEFT's rows for the decoder: unused, a copy

    def loaded_rows(self, rows: Tensor, n: int | None) -> Tensor:
        # PEFT's (2N, H): prompt tuning puts the first N before the encoder
        return rows[:n] if n and rows.shape[0] == 2 * n else rows

    def saved_deep(self, flat: Tensor, layers: int) -> tuple[Tensor, int]:
        return to_peft(flat, layers), peft_layers(layers)

    def loaded_deep(self, rows: Tensor, saved: int, layers: int | None) -> tuple[Tensor, int]:
        layers = layers or saved
        return from_peft(rows, saved, layers), layers

    def extra_tensors(self, model: nn.Module) -> dict[str, Tensor]:
        return {}

    def saved_meta(self, model: nn.Module) -> dict:
        return {}

    def load_extra(self, model: nn.Module, tensors: dict[str, Tensor], meta: dict,
                   where: str) -> None:  # fmt: skip
        return None


SEQ2SEQ = Seq2Seq()
