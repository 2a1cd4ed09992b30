"""Noise, targets and per-sample loss weights as sd-scripts defines them (reference section 4)."""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F


def offset_noise(noise: torch.Tensor, latents: torch.Tensor, strength: float, random_strength: bool,
                 adaptive_scale: float, generator: torch.Generator) -> torch.Tensor:
    """noise + s * delta, delta ~ N(0,1) of shape (B, C, 1, 1)."""
    b, c = latents.shape[:2]
    s = torch.full((b, c, 1, 1), strength, device=latents.device)
    if random_strength:
        s = s * torch.rand((), generator=generator, device=generator.device).to(latents.device)
    if adaptive_scale:
        s = (s + adaptive_scale * latents.mean(dim=(2, 3), keepdim=True).abs()).clamp(min=0)
    delta = torch.randn((b, c, 1, 1), generator=generator, device=generator.device).to(latents.device, latents.dtype)
    return noise + s * delta


def pyramid_noise(noise: torch.Tensor, iterations: int, discount: float, generator: torch.Generator) -> torch.Tensor:
    """Multires noise: add discounted, upsampled coarser Gaussians, then renormalise to unit std."""
    b, c, h, w = noise.shape
    out = noise.clone()
    for i in range(iterations):
        r = 2 + 2 * torch.rand((), generator=generator, device=generator.device).item()
        hi, wi = max(1, int(h / r ** i)), max(1, int(w / r ** i))
        z = torch.randn((b, c, hi, wi), generator=generator, device=generator.device).to(noise.device, noise.dtype)
        out = out + F.interpolate(z, size=(h, w), mode="bilinear", align_corners=False) * discount ** i
        if hi == 1 or wi == 1:
            break
    return out / out.std()


def min_snr_weight(noise_scheduler: Any, timesteps: torch.Tensor, gamma: float, v_prediction: bool) -> torch.Tensor:
    """min(SNR, gamma) / SNR for epsilon targets, min(SNR, gamma) / (SNR + 1) for v-prediction (SNR: diffusers' compute_snr)."""
    from diffusers.training_utils import compute_snr

    s = compute_snr(noise_scheduler, timesteps)
    clipped = torch.clamp(s, max=gamma)
    return clipped / (s + 1) if v_prediction else clipped / s
