"""`--fsdp`: a full fine-tune's transformer sharded across the processes with PyTorch's FSDP2 (`fully_shard`).

Why: a full FLUX.1 fine-tune holds every weight in fp32, its gradient and two AdamW moments: about 190 GB for the
12B transformer. Sharded over N processes, each holds 1/N of the parameters, gradients and optimizer state (the
optimizer is built over the sharded DTensor parameters, so its state is sharded too) and gathers one block's
weights at a time to run it.

Why torch's `fully_shard` directly and not accelerate's FSDP2 plugin: accelerate turns the plugin on only for GPU-like
distributed types (MULTI_GPU, MULTI_NPU, ...; accelerate 1.16 state.py) and leaves a MULTI_CPU / gloo run unsharded,
so the tests could not exercise it; and its `prepare(model, optimizer)` owns the wrapping, the fp32 upcast and the
optimizer's parameter swap, where the trainer builds its optimizer and sums gradients itself (data_parallel.py).
Calling `fully_shard` on each double / single block and then on the root gives the same layout on CPU and GPU.

Gradients: every process divides its loss by the GLOBAL batch size (trainer.py), so the processes' gradients must be
SUMMED; FSDP2 averages by default, so each sharded module's divide factor is set to 1, with plain SUM collectives
(FSDP2 would otherwise reduce with PREMUL_SUM(1/factor), which gloo lacks). The trainer then leaves these
parameters out of its own all-reduce (`hand_reduced`).

Saving and resume gather the full (unsharded) model and optimizer state on the first process with
torch.distributed.checkpoint's state-dict helpers (every process takes part; only the first keeps the tensors), and
load a full state back into the shards; the same helpers work unsharded, so one state format serves both.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn


def is_sharded(p: torch.Tensor) -> bool:
    """Whether `p` is an FSDP2-sharded parameter (a DTensor), whose gradient FSDP itself reduces."""
    from torch.distributed.tensor import DTensor

    return isinstance(p, DTensor)


def hand_reduced(params: list[nn.Parameter]) -> list[nn.Parameter]:
    """The parameters whose gradients the trainer must all-reduce itself (everything FSDP does not shard)."""
    return [p for p in params if not is_sharded(p)]


def shard_transformer(transformer: nn.Module, log: Callable[[str], None]) -> tuple[int, int]:
    """Shard each double / single (FLUX.1) or joint (SD3) block and then the root (the embedders and the final layer) with FSDP2, with
    gradients summed across processes. Returns (parameter values this process holds, values in the whole model);
    the first process logs every process's share."""
    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard

    total = sum(p.numel() for p in transformer.parameters())
    units = [*getattr(transformer, "double_blocks", []), *getattr(transformer, "single_blocks", []),
             *getattr(transformer, "joint_blocks", [])]  # FLUX.1's blocks, or SD3's
    for block in units:
        fully_shard(block)
    fully_shard(transformer)
    for module in [*units, transformer]:
        module.set_gradient_divide_factor(1.0)  # a sum: each process's loss is already divided by the global batch
        module.set_force_sum_reduction_for_comms(True)  # a plain SUM (gloo has no PREMUL_SUM); a factor 1 divides nothing
    local = sum(p.to_local().numel() if is_sharded(p) else p.numel() for p in transformer.parameters())
    shares: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(shares, local)
    log(f"fsdp: transformer sharded over {len(shares)} processes ({len(units)} blocks + the root); parameter values "
        "held: " + ", ".join(f"process {i} {n} of {total} ({100 * n / total:.1f}%)" for i, n in enumerate(shares)))
    return local, total


def full_model_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The whole model's weights on the CPU: gathered onto the first process when sharded (every process must call
    this; the others get an empty dict), a plain copy otherwise."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    sd = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return {k: v.detach().clone().contiguous() for k, v in sd.items()}


def full_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """The optimizer's state keyed by parameter name, unsharded, on the CPU (first process only when sharded)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    return get_optimizer_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def load_full_model_state(model: nn.Module, sd: dict[str, torch.Tensor]) -> None:
    """A full state dict (every process holds it) into the model, each process keeping its shard."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    set_model_state_dict(model, sd, options=StateDictOptions(full_state_dict=True, strict=True))


def load_full_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer, osd: dict[str, Any]) -> None:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    set_optimizer_state_dict(model, optimizer, osd, options=StateDictOptions(full_state_dict=True))
