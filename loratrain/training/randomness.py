"""Seeds and draws the trainers share: every random choice of a step comes from a generator seeded by where it is
(seed, epoch, batch, position, purpose), so a resumed run or several processes draw exactly what one unbroken run
draws; the VAE posterior sample takes its noise from such a generator on the CPU, so any device draws the same."""
from __future__ import annotations

import hashlib
from collections.abc import Iterator
from contextlib import contextmanager

import torch


@contextmanager
def seeded(seed: int, device: torch.device) -> Iterator[None]:
    """torch's global generator seeded for the block, and restored after it."""
    devices = [device.index or 0] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


def _seed_for(*parts: int) -> int:
    return int.from_bytes(hashlib.sha256(repr(parts).encode()).digest()[:7], "little")


@torch.no_grad()
def sample_latents(vae: torch.nn.Module, pixels: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """A sample of the VAE's posterior for a batch of [-1, 1] pixels, shifted (FLUX.1's AE) and scaled for the
    denoiser; the noise comes from `generator` (on the CPU, so a run draws the same on any device)."""
    device = next(vae.parameters()).device
    dist = vae.encode(pixels.to(device, torch.float32)).latent_dist
    noise = torch.randn(dist.mean.shape, generator=generator).to(device)
    shift = getattr(vae.config, "shift_factor", None)  # None for SD's VAEs
    z = dist.mean + dist.std * noise
    return (z if shift is None else z - shift) * vae.config.scaling_factor
