"""Data parallelism without DDP wrappers: each process takes its share of every global batch, and
gradients are summed across processes once per optimizer step.

The adapters live *inside* the base model's layers (PEFT), so the model that runs forward is the
UNet, not any module accelerate could wrap; a DDP wrapper around the adapter container would never
see a forward pass and would never all-reduce. Summing the gradients here is explicit and exact:
every process divides its per-sample losses by the *global* batch size, so after the sum each
holds the gradient of the global batch mean, and N processes with batch b take the same steps as
one process with batch N*b (up to float summation order).
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TypeVar

import torch

T = TypeVar("T")


def local_share(global_batch: Sequence[T], rank: int, world: int) -> tuple[list[T], int]:
    """This process's contiguous share of a global batch, and the global index of its first sample."""
    size = math.ceil(len(global_batch) / world)
    first = min(rank * size, len(global_batch))
    return list(global_batch[first:first + size]), first


def sum_across_processes(params: list[torch.nn.Parameter], scalars: list[float], device: torch.device) -> list[float]:
    """All-reduce (sum) every parameter's gradient and a few scalars in one collective call.

    A process with no samples in this step (a short last batch) contributes zeros, so every
    process calls the collective the same number of times.
    """
    import torch.distributed as dist

    grads = [(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1).float() for p in params]
    flat = torch.cat(grads + [torch.tensor(scalars, dtype=torch.float32, device=device)])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    offset = 0
    for p in params:
        n = p.numel()
        p.grad = flat[offset:offset + n].view_as(p).to(p.dtype)
        offset += n
    return flat[offset:].tolist()
