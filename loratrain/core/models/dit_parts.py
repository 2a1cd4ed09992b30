"""Pieces FLUX.1's and SD3's MM-DiTs share (`flux.py`, `sd3.py`): the same maths written once.

Why here: both transformers embed timesteps with the same sinusoids, norm q/k with the same float32 RMS norm, split a
fused [q | k | v] projection into heads the same way, checkpoint their blocks the same way, and find their keys under
the same single-file prefixes. The modules keep their own attribute names (those are the checkpoints' key names).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

#: key prefixes single files put before the transformer's own keys (SAI's and ComfyUI's files: model.diffusion_model.)
SINGLE_FILE_PREFIXES = ("model.diffusion_model.", "diffusion_model.", "")


def find_prefix(keys: object, probe: str, prefixes: tuple[str, ...] = SINGLE_FILE_PREFIXES) -> str | None:
    """The prefix in front of `probe` among `keys` (`""` when bare), None when no prefix has it."""
    keys = keys if isinstance(keys, (set, dict)) else set(keys)  # type: ignore[call-overload]
    return next((p for p in prefixes if p + probe in keys), None)  # type: ignore[operator]


def block_count(keys: object, stem: str) -> int:
    """Highest block index + 1 of the keys `<stem><N>.…` (0 when there are none)."""
    found = [int(i) for k in keys if k.startswith(stem) and (i := k[len(stem):].split(".", 1)[0]).isdigit()]  # type: ignore[attr-defined]
    return max(found) + 1 if found else 0


def timestep_embedding(t: torch.Tensor, dim: int = 256, max_period: float = 10_000.0, factor: float = 1000.0) -> torch.Tensor:
    """Sinusoidal embedding of t (times `factor`: 1000 for FLUX's t in [0, 1], 1 for SD3's 0..1000), cosines first;
    float32."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = (t.float() * factor)[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """x / rms(x) * weight over the last axis, computed in float32, returned in x's dtype."""
    xf = x.float()
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps) * weight.float()).to(x.dtype)


def layer_norm(x: torch.Tensor) -> torch.Tensor:
    """LayerNorm over the last axis without affine parameters (eps 1e-6), as both models' AdaLN uses it."""
    return F.layer_norm(x, x.shape[-1:], eps=1e-6)


def split_heads(qkv: torch.Tensor, heads: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(B, L, 3*H*D) laid out [q | k | v], each head-major -> three (B, H, L, D)."""
    q, k, v = qkv.unflatten(-1, (3, heads, -1)).permute(2, 0, 3, 1, 4)
    return q, k, v


def _moved(x: object, device: torch.device) -> object:
    """Tensors (also inside tuples / lists) on `device`; anything else as it is."""
    def move(v: object) -> object:
        if isinstance(v, torch.Tensor):
            return v.to(device)
        return type(v)(move(u) for u in v) if isinstance(v, (tuple, list)) else v

    return move(x)


class BlockCheckpointing:
    """`enable_gradient_checkpointing()` and `_run(block, ...)` for a transformer whose forward runs its blocks.

    With `cpu_offload` (sd-scripts' --cpu_offload_checkpointing) each checkpointed block hands its output back in host
    memory, so the activations kept between blocks for backward (a block's input, the only thing a checkpoint keeps)
    live on the CPU; the block moves its inputs to the compute device when it runs, in forward and again when backward
    recomputes it. The forward calls `_back(x)` on the last block's output before the final layer."""

    gradient_checkpointing = False
    cpu_offload_checkpointing = False
    training: bool

    def enable_gradient_checkpointing(self, on: bool = True, cpu_offload: bool = False) -> None:
        """Recompute each block's activations in backward (non-reentrant checkpoint): memory for ~30% more compute;
        `cpu_offload` also keeps the blocks' inputs in host memory."""
        self.gradient_checkpointing = on
        self.cpu_offload_checkpointing = bool(on and cpu_offload)

    def _checkpointing(self) -> bool:
        return self.gradient_checkpointing and self.training and torch.is_grad_enabled()

    def _compute_device(self) -> torch.device:
        return next(self.parameters()).device  # type: ignore[attr-defined]  # the input projection: never swapped out

    def _run(self, block: nn.Module, *args: object) -> object:
        if not self._checkpointing():
            return block(*args)
        if not self.cpu_offload_checkpointing:
            return checkpoint(block, *args, use_reentrant=False)
        device, host = self._compute_device(), torch.device("cpu")

        def offloaded(*inputs: object) -> object:
            return _moved(block(*_moved(inputs, device)), host)

        return checkpoint(offloaded, *args, use_reentrant=False)

    def _back(self, x: torch.Tensor) -> torch.Tensor:
        """The last block's output on the compute device (it is in host memory with cpu_offload)."""
        return x.to(self._compute_device()) if self.cpu_offload_checkpointing and self._checkpointing() else x
