"""Several processes, one run: rows split across processes, the prompt's gradient summed,
and (``--shard-model``) the frozen model's decoder layers sharded with PyTorch FSDP2.

Launched by torchrun or ``accelerate launch``; with one process everything here reduces to
the plain single-process step.
"""

from __future__ import annotations

import torch
from accelerate import Accelerator

from softprompt.console import say
from softprompt.kinds import Kind
from softprompt.loading import decoder_layers
from softprompt.prompt import PromptSet
from softprompt.rows import IGNORE_INDEX, Row
from softprompt.training.recompute import recomputing


def label_count(rows: list[Row], first_only: bool = False) -> int:
    """Label tokens of ``rows`` (classification mode: one answer position per row)."""
    # Labels at position 0 are never predicted (nothing comes before them but the prompt's
    # last virtual token, which does predict them), so every label counts.
    if first_only:
        return len(rows)
    return sum(sum(1 for x in r.labels if x != IGNORE_INDEX) for r in rows)


def forward_backward(
    accelerator: Accelerator,
    kind: Kind,
    model,
    prompts: PromptSet,
    group: list[list[Row]],
    pad_id: int,
    choice_ids: torch.Tensor | None = None,
    sharded: bool = False,
    recompute: bool = False,
) -> tuple[float, int, int]:
    """Forward and backward for one optimizer step over ``group`` (its micro-batches).

    Each of the P processes takes rows rank, rank+P, ... of every micro-batch; the loss is
    divided by the label tokens of *all* rows, and the gradients are summed across
    processes, so P processes make the same step as one. With ``sharded`` layers (FSDP2)
    every process must run every forward. Returns (summed loss, label
    tokens, positions the body ran), each over all processes. A task with no row in the
    whole step keeps no gradient, so the optimizer leaves its prompt (and moments) alone.
    ``recompute``: the decoder layers keep no activations and run again in backward
    (``--gradient-checkpointing``, ``recompute.recomputing``).
    """
    rank, world = accelerator.process_index, accelerator.num_processes
    # the whole step's denominator (classification mode: one position per row)
    n_tok = sum(label_count(rows, choice_ids is not None) for rows in group)
    loss_sum = torch.zeros((), device=accelerator.device)
    processed = torch.zeros((), dtype=torch.long, device=accelerator.device)
    for rows in group:
        mine, weight = rows[rank::world], 1.0
        if not mine:
            if not sharded:
                continue
            # Sharded layers gather their weights collectively: every process must run
            # every forward, so this one runs a row and throws its loss away.
            mine, weight = rows[:1], 0.0
        with recomputing(model, recompute):
            loss, _, positions = kind.rows_loss(
                model, prompts, mine, pad_id, accelerator.device, choice_ids
            )
            loss = loss * weight
            accelerator.backward(loss / n_tok)  # mean over the whole step's label tokens
        loss_sum += loss.detach()
        if weight:
            processed += positions
    if world > 1:
        in_step = {r.task for rows in group for r in rows}
        for i, p in enumerate(prompts.parameters()):
            if i not in in_step:  # no row of this task on any process
                continue
            if p.grad is None:  # no rows of it here: contribute zeros
                p.grad = torch.zeros_like(p)
            p.grad = accelerator.reduce(p.grad, "sum")
        loss_sum, processed = (
            accelerator.reduce(loss_sum, "sum"),
            accelerator.reduce(processed, "sum"),
        )
    return float(loss_sum), n_tok, int(processed)


def shard_layers(model, accelerator: Accelerator) -> None:
    """Split every decoder layer's weights across the processes with PyTorch FSDP2
    (``fully_shard``): a layer gathers its weights just before it runs and frees them after,
    forward and backward. The embeddings, final norm and LM head stay whole on every process:
    softprompt calls the body and the head separately (the head only at labelled positions),
    outside any root wrapper. The prompt is tiny and stays replicated."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    world = accelerator.num_processes
    layers = decoder_layers(model)
    mesh = init_device_mesh(accelerator.device.type, (world,))
    for layer in layers:  # each layer is its own FSDP root (no wrapper above it), and FSDP
        # keeps a root's gathered weights after forward unless told: every layer would stay
        # whole on every process from the first step on
        fully_shard(layer, mesh=mesh, reshard_after_forward=True)
    if accelerator.device.type == "cpu":
        return_freed_memory()
    whole = sum(p.numel() for p in model.parameters()) - sum(
        p.numel() for layer in layers for p in layer.parameters()
    )
    head = model.get_output_embeddings()
    tied = any(getattr(c, "tie_word_embeddings", False)  # a composite model's or its text's
               for c in (model.config, model.config.get_text_config()))  # fmt: skip
    if head is not None and tied and head.weight is not model.get_input_embeddings().weight:
        whole -= head.weight.numel()  # not tied yet (sharded loading ties it once read): once
    say(
        f"sharded {len(layers)} decoder layers across {world} processes (FSDP2); "
        f"{whole / 1e6:.0f}M parameters (embeddings, norm, head) stay whole on each"
    )


def return_freed_memory() -> bool:
    """Make glibc give large freed blocks back to the system (``mallopt``: blocks of 1 MiB
    and more are mapped on their own and unmapped when freed). By default glibc raises that
    threshold to 32 MiB as blocks are freed, so a layer's gathered weights, freed after the
    layer runs, stay in the process's heap and its resident memory grows with every layer
    gathered. Sharded training is about memory, so it pays the extra page faults. Returns
    False where there is no glibc (macOS, musl): nothing changes there."""
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
        mallopt = libc.mallopt if libc is not None else None
    except (OSError, AttributeError):
        return False
    if mallopt is None:
        return False
    M_MMAP_THRESHOLD = -3  # glibc's malloc.h
    return bool(mallopt(M_MMAP_THRESHOLD, 1 << 20))
