"""The soft prompt placed inside the text (after a head of constant tokens): the shared and
compiled prefixes give what each row's whole sequence, with the prompt spliced in, gives."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import random_prompt
from transformers import GenerationConfig

from softprompt.generation import GenerationRow, pack_rows, plain_rows
from softprompt.loss import lm_loss, support
from softprompt.prefix import compile_prefix
from softprompt.prompt import PromptSet, SoftPrompt, embed_tokens
from softprompt.rows import IGNORE_INDEX, Row, collate

ARCHS = ["llama", "gemma3", "gpt2"]
TEXTS = [
    "review : the movie was great sentiment : positive",
    "review : i hate this screen and the battery was slow sentiment : negative",
    "review : good sentiment : positive",
    "review : boring book sentiment : negative",
]


def _rows(tok, at: list[int], tasks: list[int] | None = None) -> list[Row]:
    """Rows labelled on their last two tokens, the prompt before token ``at[i]``."""
    rows = []
    for i, text in enumerate(TEXTS):
        ids = tok(text)["input_ids"]
        labels = [IGNORE_INDEX] * (len(ids) - 2) + ids[-2:]
        rows.append(Row(ids, labels, task=(tasks or [0] * 4)[i], prompt_at=at[i]))
    return rows


def _reference(model, virtual: list[torch.Tensor], rows: list[Row]) -> torch.Tensor:
    """Summed loss of each row run alone with its prompt spliced in, by the model's own
    forward (full logits)."""
    total = 0.0
    for row, v in zip(rows, virtual):
        ids = torch.tensor([row.input_ids])
        emb = embed_tokens(model, ids)[0]
        a = row.prompt_at
        seq = torch.cat([emb[:a], v.to(emb.dtype), emb[a:]])[None]
        labels = [IGNORE_INDEX] * a + [IGNORE_INDEX] * v.shape[0] + row.labels[a:]
        logits = model(inputs_embeds=seq).logits[0, :-1]
        total = total + F.cross_entropy(
            logits.float(), torch.tensor(labels[1:]), ignore_index=IGNORE_INDEX, reduction="sum"
        )
    return total


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("at", [[3, 3, 3, 3], [3, 1, 3, 1], [0, 2, 2, 4]])
def test_prompt_inside_equals_each_row_alone(loaded_all, arch, at):
    """Loss and prompt gradient: shared prefix (heads of one or two lengths; three lengths take
    the plain path) == plain path == each row alone with the prompt spliced in."""
    loaded = loaded_all[arch]
    model, tok = loaded.model, loaded.tokenizer
    rows = _rows(tok, at)
    batch = collate(rows, tok.pad_token_id)
    results = []
    for shared in (True, False, None):
        prompt = random_prompt(7, 5)
        if shared is None:
            loss, n = _reference(model, [prompt.embedding] * 4, rows), 8
        else:
            loss, n = lm_loss(model, prompt, batch, shared_prefix=shared)
        (loss / n).backward()
        results.append((loss.detach(), n, prompt.embedding.grad.clone()))
    assert support(model).shared_prefix
    first = random_prompt(7, 5)
    lm_loss(model, first, collate(_rows(tok, [0] * 4), tok.pad_token_id))[0].backward()
    assert not torch.allclose(first.embedding.grad, results[0][2] * 8, rtol=1e-3)  # can fail
    for loss, n, grad in results[1:]:
        assert n == results[0][1] == 8
        torch.testing.assert_close(loss, results[0][0], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(grad, results[0][2], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("arch", ARCHS)
def test_mixed_prompts_and_placements_in_one_batch(loaded_all, arch):
    """Two tasks' prompts, placed at different heads in one batch: each prompt gets the loss
    and gradient of its rows alone."""
    loaded = loaded_all[arch]
    model, tok = loaded.model, loaded.tokenizer
    rows = _rows(tok, at=[0, 3, 3, 2], tasks=[0, 1, 0, 1])
    results = []
    for shared in (True, False, None):
        prompts = PromptSet(["a", "b"], [random_prompt(1, 4), random_prompt(2, 4)])
        if shared is None:
            virtual = [prompts.prompts[r.task].embedding for r in rows]
            loss, n = _reference(model, virtual, rows), 8
        else:
            batch = collate(rows, tok.pad_token_id)
            loss, n = lm_loss(model, prompts, batch, shared_prefix=shared)
        (loss / n).backward()
        grads = [p.embedding.grad.clone() for p in prompts.prompts]
        results.append((loss.detach(), grads))
    for loss, grads in results[1:]:
        torch.testing.assert_close(loss, results[0][0], rtol=1e-5, atol=1e-5)
        for g, ref in zip(grads, results[0][1]):
            torch.testing.assert_close(g, ref, rtol=1e-4, atol=1e-6)


def _greedy(model, rows_ids, prompts, heads, cached: bool):
    cfg = GenerationConfig(
        max_new_tokens=5, do_sample=False, pad_token_id=0, eos_token_id=1, output_logits=True
    )
    cfg.return_dict_in_generate = True
    if cached:
        prefixes = [
            compile_prefix(model, p, h) if p is not None else None for p, h in zip(prompts, heads)
        ]
        gen_rows = [GenerationRow(i, p) for i, p in zip(rows_ids, prefixes)]
        embeds, mask, cache = pack_rows(model, gen_rows)
        out = model.generate(
            inputs_embeds=embeds, attention_mask=mask, past_key_values=cache, generation_config=cfg
        )
    else:
        embeds, mask = plain_rows(model, rows_ids, prompts, heads)
        out = model.generate(inputs_embeds=embeds, attention_mask=mask, generation_config=cfg)
    return out.sequences, torch.stack(out.logits, 1)


@pytest.mark.parametrize("arch", ARCHS)
def test_compiled_head_equals_plain_generation(loaded_all, arch):
    """A compiled [head][prompt] prefix gives the plain path's greedy tokens and logits, in a
    batch mixing placements, prompts and a row without a prompt; each row as it is alone."""
    loaded = loaded_all[arch]
    model, tok = loaded.model, loaded.tokenizer
    full = [tok(t.rsplit(" ", 1)[0])["input_ids"] for t in TEXTS]
    heads = [full[0][:3], full[1][:1], [], full[3][:3]]
    texts = [ids[len(h) :] for ids, h in zip(full, heads)]
    long, short = random_prompt(3, 12), random_prompt(4, 3)
    prompts: list[SoftPrompt | None] = [long, short, long, None]
    heads[3] = []  # no prompt: its whole text runs as plain tokens
    texts[3] = full[3]
    tokens, logits = _greedy(model, texts, prompts, heads, cached=True)
    ref_tokens, ref_logits = _greedy(model, texts, prompts, heads, cached=False)
    assert torch.equal(tokens, ref_tokens)
    torch.testing.assert_close(logits, ref_logits, atol=1e-4, rtol=1e-4)
    for i in range(4):  # batched == alone
        alone, _ = _greedy(model, texts[i : i + 1], prompts[i : i + 1], heads[i : i + 1], True)
        assert torch.equal(alone[0, -5:], tokens[i, -5:])
