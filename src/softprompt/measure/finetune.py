"""Reference methods for `compare`: LoRA (through PEFT) and full fine-tuning.

Both train weights, unlike prompt tuning, with the same data rows, loss and step budget, so
the comparison differs only in what learns. They are references, not a second trainer:
no checkpoints, no resume, a fixed number of steps.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm
from transformers import get_linear_schedule_with_warmup

from softprompt.console import is_first_process
from softprompt.loss import lm_loss
from softprompt.rows import Row, batch_order, collate


def train_weights(
    model: nn.Module,
    rows: list[Row],
    *,
    steps: int,
    lr: float,
    batch_size: int,
    pad_id: int,
    seed: int = 0,
    choice_ids: Tensor | None = None,
    log: Callable[[int, float], None] | None = None,
    desc: str = "training",
) -> float:
    """``steps`` AdamW steps on the parameters of ``model`` that require grad; returns seconds.

    The model stays in eval mode (no dropout), as the frozen base does in prompt tuning. A
    progress bar named ``desc`` (steps, elapsed, estimate) shows on the first process.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    scheduler = get_linear_schedule_with_warmup(optimizer, int(0.06 * steps), steps)
    device = model.get_input_embeddings().weight.device
    lengths = [len(r.input_ids) for r in rows]
    torch.manual_seed(seed)
    step, epoch, start = 0, 0, time.perf_counter()
    bar = tqdm(total=steps, desc=desc, unit="step", disable=not is_first_process())
    while step < steps:
        for batch_idx in batch_order(lengths, batch_size, seed, epoch):
            batch = {
                k: v.to(device) for k, v in collate([rows[i] for i in batch_idx], pad_id).items()
            }
            loss, n = lm_loss(model, None, batch, choice_ids=choice_ids)
            (loss / max(n, 1)).backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            bar.update(1)
            if log is not None:
                log(step, float(loss.detach()) / max(n, 1))
            if step >= steps:
                break
        epoch += 1
    bar.close()
    return time.perf_counter() - start


def add_lora(model: nn.Module, seed: int, r: int = 8) -> nn.Module:
    """Inject LoRA adapters (rank ``r``, alpha 2r) into every linear layer but the head, in
    place; returns the PEFT wrapper. ``remove_lora`` restores the frozen base.

    The adapters' random start (PEFT draws A from torch's global generator) is drawn from
    ``seed`` alone, the global generator left as it was: otherwise it depends on whatever
    drew random numbers before in the process (the methods compared before LoRA), and the
    same seed gives another LoRA."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(
        r=r, lora_alpha=2 * r, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM"
    )
    with torch.random.fork_rng():  # every device's generator restored after
        torch.manual_seed(seed)
        return get_peft_model(model, config)


def remove_lora(peft_model: nn.Module) -> nn.Module:
    """Take the adapters out again (without merging them): the base model as it was."""
    base = peft_model.unload()
    base.requires_grad_(False)
    return base


def trainable_copy(model: nn.Module) -> nn.Module:
    """A copy of the whole model whose weights all learn (full fine-tuning)."""
    clone = copy.deepcopy(model)
    clone.requires_grad_(True)
    return clone


def count_trainable(model: nn.Module) -> int:
    """Parameters that receive gradients (tied weights counted once)."""
    seen, total = set(), 0
    for p in model.parameters():
        if p.requires_grad and id(p) not in seen:
            seen.add(id(p))
            total += p.numel()
    return total


def state_bytes(model: nn.Module) -> int:
    """What saving every weight would take: the bytes of all distinct tensors."""
    seen, total = set(), 0
    for p in model.state_dict().values():
        if p.data_ptr() not in seen:
            seen.add(p.data_ptr())
            total += p.numel() * p.element_size()
    return total
