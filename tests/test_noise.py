"""Noise offset, pyramid noise and min-SNR weights against their definitions (docs/lora-training.md#noise-offset,
docs/lora-training.md#pyramid-noise, docs/lora-training.md#min-snr-weighting)."""
from __future__ import annotations

from types import SimpleNamespace

import torch

from loratrain.training.noise import min_snr_weight, offset_noise, pyramid_noise


def test_offset_noise_is_a_per_channel_constant():
    g = torch.Generator().manual_seed(0)
    noise = torch.zeros(2, 4, 8, 8)
    out = offset_noise(noise, torch.zeros(2, 4, 8, 8), 0.1, False, 0.0, g)
    per_channel = out.flatten(2)
    assert torch.allclose(per_channel, per_channel[..., :1].expand_as(per_channel))
    assert out.abs().max() > 0


def test_pyramid_noise_has_unit_std_and_low_frequency_energy():
    g = torch.Generator().manual_seed(0)
    base = torch.randn(4, 4, 64, 64, generator=g)
    out = pyramid_noise(base, 6, 0.8, g)
    assert abs(out.std().item() - 1.0) < 1e-4
    blur = torch.nn.functional.avg_pool2d
    assert blur(out, 8).std() > 2 * blur(base, 8).std()


def test_min_snr_weights():
    ac = torch.tensor([0.99, 0.5, 0.01])
    t = torch.tensor([0, 1, 2])
    snr = ac / (1 - ac)
    sched = SimpleNamespace(alphas_cumprod=ac)  # what diffusers' compute_snr reads
    eps = min_snr_weight(sched, t, 5.0, v_prediction=False)
    v = min_snr_weight(sched, t, 5.0, v_prediction=True)
    assert torch.allclose(eps, torch.minimum(snr, torch.tensor(5.0)) / snr)
    assert torch.allclose(v, torch.minimum(snr, torch.tensor(5.0)) / (snr + 1))
    assert eps[0] < 1 and eps[2] == 1
