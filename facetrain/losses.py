"""SAEHD losses (docs/face-model.md#losses): multi-window DSSIM + MSE, mask loss, eyes/mouth priority, style terms."""
from __future__ import annotations

from functools import lru_cache

import torch
from torch.nn import functional as F


@lru_cache(maxsize=16)
def _window(size: int, sigma: float, channels: int, device: str, dtype: torch.dtype) -> torch.Tensor:
    coords = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-(coords ** 2) / (2 * sigma ** 2))
    g = (g / g.sum())
    w = (g[:, None] * g[None, :]).to(dtype=dtype, device=device)
    return w.expand(channels, 1, size, size).contiguous()


def dssim(a: torch.Tensor, b: torch.Tensor, window: int, sigma: float = 1.5) -> torch.Tensor:
    """(1 - SSIM) / 2 per sample: Gaussian window, VALID padding, k1 0.01, k2 0.03, max value 1."""
    c = a.shape[1]
    w = _window(window, sigma, c, str(a.device), a.dtype)
    mu_a, mu_b = F.conv2d(a, w, groups=c), F.conv2d(b, w, groups=c)
    aa = F.conv2d(a * a, w, groups=c) - mu_a ** 2
    bb = F.conv2d(b * b, w, groups=c) - mu_b ** 2
    ab = F.conv2d(a * b, w, groups=c) - mu_a * mu_b
    c1, c2 = 0.01 ** 2, 0.03 ** 2
    ssim = ((2 * mu_a * mu_b + c1) * (2 * ab + c2)) / ((mu_a ** 2 + mu_b ** 2 + c1) * (aa + bb + c2))
    return (1 - ssim.mean(dim=(1, 2, 3))) / 2


def reconstruction_loss(target: torch.Tensor, pred: torch.Tensor, resolution: int) -> torch.Tensor:
    """10*DSSIM (two windows, 5 each, from 256 px up) + 10*MSE, per sample."""
    if resolution < 256:
        loss = 10 * dssim(target, pred, max(3, int(resolution / 11.6)))
    else:
        loss = 5 * dssim(target, pred, int(resolution / 11.6)) + 5 * dssim(target, pred, int(resolution / 23.2))
    return loss + 10 * ((target - pred) ** 2).mean(dim=(1, 2, 3))


def gaussian_blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """Blur with kernel max(3, int(4*sigma)) made odd, zero padding (as DFL's ops)."""
    size = max(3, int(4 * sigma)) | 1
    w = _window(size, sigma, x.shape[1], str(x.device), x.dtype)
    return F.conv2d(x, w, padding=size // 2, groups=x.shape[1])


def soft_mask(mask: torch.Tensor, resolution: int) -> torch.Tensor:
    """mask_blur: 1 inside the face, fading to 0 only outside the original edge."""
    return torch.clamp(gaussian_blur(mask, max(1, resolution // 32)), 0, 0.5) * 2


def blur_out_background(target: torch.Tensor, mask: torch.Tensor, resolution: int) -> torch.Tensor:
    """Replace the background by a normalised blur of the nearby background (blur_out_mask)."""
    sigma = resolution / 128
    num = gaussian_blur(target * (1 - mask), sigma)
    den = 1 - gaussian_blur(mask, sigma)
    return target * mask + (num / den.clamp_min(1e-4)) * (1 - mask)


def style_loss(a: torch.Tensor, b: torch.Tensor, power: float, sigma: float) -> torch.Tensor:
    """Per-sample squared differences of blurred means and stds, times 10000*power/channels."""
    a, b = gaussian_blur(a, sigma), gaussian_blur(b, sigma)
    ma, mb = a.mean(dim=(2, 3)), b.mean(dim=(2, 3))
    sa, sb = a.std(dim=(2, 3)), b.std(dim=(2, 3))
    return ((ma - mb) ** 2 + (sa - sb) ** 2).sum(1) * (10000 * power / a.shape[1])


def total_variation(x: torch.Tensor) -> torch.Tensor:
    return ((x[:, :, 1:, :] - x[:, :, :-1, :]) ** 2).mean(dim=(1, 2, 3)) + ((x[:, :, :, 1:] - x[:, :, :, :-1]) ** 2).mean(dim=(1, 2, 3))
