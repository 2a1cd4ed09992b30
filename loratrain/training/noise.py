"""Noise, targets and per-sample loss weights as sd-scripts defines them (docs/lora-training.md)."""
from __future__ import annotations

import math
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
    if v_prediction:
        return clipped / (s + 1)
    # min(s, gamma) / s is 1 wherever s <= gamma; written so, a zero terminal SNR (zero_terminal_snr) gives 1, not 0/0
    return torch.where(s <= gamma, torch.ones_like(s), gamma / s.clamp(min=gamma))


def huber_c(noise_scheduler: Any, timesteps: torch.Tensor, schedule: str, c: float, scale: float) -> torch.Tensor:
    """The per-sample parameter of sd-scripts' huber / smooth_l1 losses, shape (B,).

    constant: c * scale. exponential: decays from `scale` at t=0 to c * scale at the last timestep.
    snr: (1 - c) / (1 + sigma_t)^2 + c with sigma_t = sqrt((1 - abar_t) / abar_t): close to 1
    (quadratic, like l2) where the sample is barely noised, c (nearly l1) where it is mostly noise.
    """
    if schedule == "constant":
        return torch.full(timesteps.shape, c * scale, device=timesteps.device)
    if schedule == "exponential":
        n = noise_scheduler.config.num_train_timesteps
        return torch.exp(timesteps.float() * (math.log(c) / n)) * scale
    abar = noise_scheduler.alphas_cumprod.to(timesteps.device)[timesteps].float()
    sigma = ((1.0 - abar) / abar).sqrt()
    return (1.0 - c) / (1.0 + sigma) ** 2 + c


def elementwise_loss(pred: torch.Tensor, target: torch.Tensor, loss_type: str, c: torch.Tensor | None = None) -> torch.Tensor:
    """Per-element loss, as sd-scripts' loss_type: l2, l1, huber (2c(sqrt(d^2 + c^2) - c)) or smooth_l1 (the same / c)."""
    if loss_type == "l2":
        return F.mse_loss(pred, target, reduction="none")
    if loss_type == "l1":
        return F.l1_loss(pred, target, reduction="none")
    assert c is not None
    c = c.view(-1, *([1] * (pred.dim() - 1)))
    pseudo = torch.sqrt((pred - target) ** 2 + c ** 2) - c
    return 2 * c * pseudo if loss_type == "huber" else 2 * pseudo


def debiased_weight(noise_scheduler: Any, timesteps: torch.Tensor, v_prediction: bool) -> torch.Tensor:
    """Debiased estimation: 1/sqrt(SNR) for epsilon targets, 1/(SNR + 1) for v-prediction, SNR clamped at 1000.

    Also clamped at 1e-3 from below: with zero_terminal_snr the last timestep has SNR 0, where 1/sqrt
    would make the loss infinite (sd-scripts' NaN there); the weight stops at ~31.6 instead.
    """
    from diffusers.training_utils import compute_snr

    s = compute_snr(noise_scheduler, timesteps).clamp(min=1e-3, max=1000.0)
    return 1.0 / (s + 1) if v_prediction else 1.0 / s.sqrt()


def snr_scale(noise_scheduler: Any, timesteps: torch.Tensor) -> torch.Tensor:
    """SNR / (SNR + 1), SNR clamped at 1000 (sd-scripts' get_snr_scale): what scale_v_pred_loss_like_noise_pred
    multiplies by and v_pred_like_loss divides by. Clamped at 1e-5 from below too, under the SD schedule's
    smallest SNR (4e-5, so those match sd-scripts) and above zero_terminal_snr's 0 (where sd-scripts divides by 0)."""
    from diffusers.training_utils import compute_snr

    s = compute_snr(noise_scheduler, timesteps).clamp(min=1e-5, max=1000.0)
    return s / (s + 1)
