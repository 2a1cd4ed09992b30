"""The two optional critics: a code discriminator (true_face_power) and a patch discriminator (gan_power)."""
from __future__ import annotations

import math

import torch
from torch import nn


class CodeDiscriminator(nn.Module):
    """Tells src codes from dst codes; the generator learns to make src codes look like dst's."""

    def __init__(self, in_ch: int, width: int = 256) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Conv2d(in_ch, width, 3, padding=1), nn.LeakyReLU(0.1),
                                 nn.Conv2d(width, width, 3, stride=2, padding=1), nn.LeakyReLU(0.1))
        self.head = nn.Linear(width, 1)

    def forward(self, code: torch.Tensor) -> torch.Tensor:
        return self.head(self.net(code).mean(dim=(2, 3)))


class PatchDiscriminator(nn.Module):
    """PatchGAN: one logit per patch of about `patch_size` pixels (stride-2 4x4 convs until the field covers it)."""

    def __init__(self, patch_size: int, base: int = 16) -> None:
        super().__init__()
        layers, ch, field = [], 3, 1
        n = max(1, min(6, round(math.log2(max(patch_size, 4) / 4)) + 1))
        for i in range(n):
            out = base * min(2 ** i, 8)
            layers += [nn.Conv2d(ch, out, 4, stride=2, padding=1), nn.LeakyReLU(0.2)]
            ch, field = out, field * 2 + 2
        layers.append(nn.Conv2d(ch, 1, 3, padding=1))
        self.net = nn.Sequential(*layers)
        self.receptive_field = field

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)
