"""DeepFakeArchi building blocks (docs/face-model.md#building-blocks), in PyTorch, NCHW."""
from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F


class Activation(nn.Module):
    """Leaky ReLU (slope 0.1), or x*cos(x) with the `c` modifier."""

    def __init__(self, cos: bool = False, slope: float = 0.1) -> None:
        super().__init__()
        self.cos, self.slope = cos, slope

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.cos(x) if self.cos else F.leaky_relu(x, self.slope)


def _init(module: nn.Module) -> nn.Module:
    """Glorot-uniform weights and zero biases, as the TensorFlow original starts."""
    for m in module.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            nn.init.xavier_uniform_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
    return module


class Downscale(nn.Sequential):
    def __init__(self, cin: int, cout: int, cos: bool = False, kernel: int = 5) -> None:
        super().__init__(nn.Conv2d(cin, cout, kernel, stride=2, padding=kernel // 2), Activation(cos))
        _init(self)


class Upscale(nn.Sequential):
    """3x3 conv to 4x channels, activation, depth-to-space x2."""

    def __init__(self, cin: int, cout: int, cos: bool = False) -> None:
        super().__init__(nn.Conv2d(cin, cout * 4, 3, padding=1), Activation(cos), nn.PixelShuffle(2))
        _init(self)


class ResidualBlock(nn.Module):
    def __init__(self, ch: int, cos: bool = False) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(ch, ch, 3, padding=1)
        self.conv2 = nn.Conv2d(ch, ch, 3, padding=1)
        self.act = Activation(cos, 0.2)
        _init(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv2(self.act(self.conv1(x)))
        return self.act(x + y)


def pixel_norm(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    return x * torch.rsqrt(x.pow(2).mean(dim=1, keepdim=True) + eps)
