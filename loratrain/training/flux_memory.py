"""Where FLUX.1's (and SD3's) transformer lives while a LoRA trains: `--fp8_base` / `--fp8_base_unet` (its blocks' Linears stored
in float8, core/models/fp8_linear.py) and `--blocks_to_swap N` (the last blocks in host memory, streamed in as they
run, core/models/block_swap.py); `--full_bf16` keeps the adapters themselves in bf16.

Why a module of its own: the trainer calls one function in place of `transformer.to(device)`; the order matters and
lives here: cast on the host, then fp8 (before the LoRA hooks attach to the Linears, so the adapters stay bf16/fp32),
then place on the device all but the swapped blocks (a full FLUX.1 never has to fit on the device at once).
"""
from __future__ import annotations

from typing import Any

import torch

from loratrain.core.models.block_swap import BlockSwap, enable_block_swap
from loratrain.core.models.fp8_linear import parameter_bytes, store_in_fp8


def place_transformer(transformer: torch.nn.Module, cfg: Any, device: torch.device, dtype: torch.dtype,
                      log: Any, fp8_parts: tuple[str, ...] | None = None) -> BlockSwap | None:
    """Cast, fp8 and place `transformer` as the options ask; returns the BlockSwap when blocks swap (else None)."""
    torch.nn.Module.to(transformer, dtype=dtype)  # on the host (a no-op when it was loaded in `dtype`)
    if getattr(cfg, "fp8_base", False) or getattr(cfg, "fp8_base_unet", False):
        before = parameter_bytes(transformer)
        n = store_in_fp8(transformer, dtype, getattr(transformer, "fp8_scales", None),
                         **({"parts": fp8_parts} if fp8_parts else {}))
        log(f"fp8 base weights: {n} Linears of the transformer blocks stored in float8_e4m3fn (per-tensor scale), computed "
            f"in {str(dtype).replace('torch.', '')}: {before / 2**30:.2f} -> {parameter_bytes(transformer) / 2**30:.2f} GiB")
    swap = int(getattr(cfg, "blocks_to_swap", 0) or 0)
    if swap:
        return enable_block_swap(transformer, swap, device, log)
    torch.nn.Module.to(transformer, device)
    return None


def adapter_dtype(cfg: Any) -> torch.dtype:
    """The LoRA's own dtype: float32 as sd-scripts trains it, bf16 with --full_bf16 (weights, grads, optimizer state)."""
    return torch.bfloat16 if getattr(cfg, "full_bf16", False) else torch.float32
