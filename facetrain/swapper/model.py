"""The torch side of a swapper and its recogniser: the pieces training differentiates through.

`TorchSwapper` runs a swapper graph (`OnnxModule`) on RGB 0..1 crops at its template and maps raw recogniser
embeddings to its `source` input exactly as FaceFusion does (times `emap`, over the embedding's norm), so what we
train is what the exported file computes. `TorchRecognizer` runs a recogniser graph, frozen, on faces cropped at
*another* template: the warp between two templates is one fixed similarity, applied with `grid_sample`, so the
identity loss back-propagates through it into the swapper's output.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from loratrain.core.errors import ConfigError

from .align import TEMPLATES, similarity_matrix
from .contract import SwapperContract, read_contract
from .onnx_module import OnnxModule, load_onnx

RECOGNISER_TEMPLATE, RECOGNISER_SIZE = "arcface_112_v2", 112


def template_warp(src_template: str, src_size: int, dst_template: str, dst_size: int) -> np.ndarray:
    """2x3 pixel matrix taking a crop at one template to the same face at another."""
    return similarity_matrix(TEMPLATES[src_template] * src_size, dst_template, dst_size)


def affine_theta(mat: np.ndarray, in_size: int, out_size: int) -> torch.Tensor:
    """`affine_grid` theta (output -> input, normalised, align_corners=False) for a cv2-style 2x3 pixel matrix
    (input -> output, pixel centres at integers)."""
    m = np.vstack([np.asarray(mat, np.float64), [0, 0, 1]])
    def norm(n: int) -> np.ndarray:  # pixel -> normalised: (2x + 1) / n - 1
        return np.array([[2 / n, 0, 1 / n - 1], [0, 2 / n, 1 / n - 1], [0, 0, 1]])
    theta = norm(in_size) @ np.linalg.inv(m) @ np.linalg.inv(norm(out_size))
    return torch.tensor(theta[:2], dtype=torch.float32)


def warp(x: torch.Tensor, theta: torch.Tensor, size: int, padding: str = "border") -> torch.Tensor:
    """Warp N x C x H x W by one theta (2x3) or one per image (N x 2 x 3) to N x C x size x size."""
    theta = theta.to(x.device, x.dtype)
    if theta.dim() == 2:
        theta = theta.expand(x.shape[0], 2, 3)
    grid = F.affine_grid(theta, [x.shape[0], x.shape[1], size, size], align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode=padding, align_corners=False)


class TorchSwapper(nn.Module):
    def __init__(self, module: OnnxModule, contract: SwapperContract) -> None:
        super().__init__()
        self.module, self.contract = module, contract
        emap = contract.emap if contract.emap is not None else np.eye(contract.embed, dtype=np.float32)
        self.register_buffer("emap", torch.from_numpy(np.array(emap, np.float32)), persistent=False)

    @classmethod
    def load(cls, path: str | Path, what: str = "swapper") -> TorchSwapper:
        proto = load_onnx(path, what)
        label = f"{what} {Path(path).name}"
        return cls(OnnxModule(proto, label), read_contract(proto, label))

    def probe(self) -> None:
        """Run the graph once on zeros, so a file the importer cannot run fails here, clearly, before training."""
        c = self.contract
        dev = self.emap.device
        try:
            with torch.no_grad():
                out = self(torch.zeros(1, 3, c.size, c.size, device=dev), torch.zeros(1, c.embed, device=dev))
        except Exception as e:  # any op failing on this graph is a property of the user's file
            raise ConfigError(f"{self.module.what}: the importer cannot run this graph ({type(e).__name__}: "
                              f"{str(e).splitlines()[0][:200] if str(e) else ''})") from None
        if tuple(out.shape) != (1, 3, c.size, c.size):
            raise ConfigError(f"{self.module.what}: the output is {list(out.shape)}, expected [1, 3, {c.size}, {c.size}]")
        if not torch.isfinite(out).all():
            raise ConfigError(f"{self.module.what}: its output for a blank face holds NaN or inf (its weights do?); "
                              "training it would only spread them")

    @property
    def size(self) -> int:
        return self.contract.size

    def latent(self, embedding: torch.Tensor) -> torch.Tensor:
        return (embedding @ self.emap) / embedding.norm(dim=1, keepdim=True).clamp_min(1e-12)

    def forward(self, target: torch.Tensor, latent: torch.Tensor) -> torch.Tensor:
        """target: N x 3 x S x S RGB 0..1; latent: N x D (see `latent`) -> N x 3 x S x S RGB (0..1 at convergence)."""
        x = target * 2 - 1 if self.contract.normalisation == "-1..1" else target
        out = self.module(**{self.contract.target: x, self.contract.source: latent})
        return (out + 1) / 2 if self.contract.normalisation == "-1..1" else out

    def to_onnx(self, extra: dict[str, str] | None = None) -> Any:
        from .contract import stamp

        return stamp(self.module.to_onnx(), self.contract.template, self.contract.normalisation, extra)


class TorchRecognizer(nn.Module):
    """A frozen ArcFace-style recogniser (N x 3 x 112 x 112 in -1..1 -> N x D) reading crops at another template."""

    def __init__(self, module: OnnxModule, src_template: str, src_size: int) -> None:
        super().__init__()
        self.module = module
        for p in module.parameters():
            p.requires_grad_(False)
        shapes = module.input_shapes
        if len(module.inputs) != 1 or shapes[module.inputs[0]][1:] != [3, RECOGNISER_SIZE, RECOGNISER_SIZE]:
            got = ", ".join(f"{k} {v}" for k, v in shapes.items())
            raise ConfigError(f"{module.what}: expected a face recogniser with one input N x 3 x 112 x 112 (ArcFace-style); "
                              f"it has {got}")
        self.src_size = src_size
        self.theta = affine_theta(template_warp(src_template, src_size, RECOGNISER_TEMPLATE, RECOGNISER_SIZE), src_size,
                                  RECOGNISER_SIZE)

    @classmethod
    def load(cls, path: str | Path, src_template: str, src_size: int) -> TorchRecognizer:
        return cls(OnnxModule(load_onnx(path, "recognizer"), f"recognizer {Path(path).name}"), src_template, src_size)

    def probe(self) -> int:
        """Run once on two different faces (a batch of 2 when the file's batch is free: one embedding per face, not
        one for the batch); the embedding size, or a ConfigError naming the file."""
        dev = next(iter(self.module.parameters()), self.theta).device
        batch = self.module.input_shapes[self.module.inputs[0]][0]
        n = min(batch, 256) if isinstance(batch, int) and batch > 0 else 2
        x = torch.linspace(0, 1, n, device=dev).reshape(n, 1, 1, 1).expand(n, 3, self.src_size, self.src_size)
        try:
            with torch.no_grad():
                out = self(x)
        except Exception as e:  # any op failing on this graph is a property of the user's file
            raise ConfigError(f"{self.module.what}: the importer cannot run this graph ({type(e).__name__}: "
                              f"{str(e).splitlines()[0][:200] if str(e) else ''})") from None
        if out.shape[0] != n or out.shape[1] < 1:
            raise ConfigError(f"{self.module.what}: {n} faces in gave embeddings of shape {list(out.shape)}; a recogniser "
                              "gives one embedding per face")
        if not torch.isfinite(out).all():
            raise ConfigError(f"{self.module.what}: its embeddings hold NaN or inf (its weights do?)")
        return int(out.shape[1])

    def forward(self, x01: torch.Tensor) -> torch.Tensor:
        """Raw embeddings of N x 3 x S x S RGB 0..1 crops at the source template."""
        crop = warp(x01.float(), self.theta, RECOGNISER_SIZE)
        out = self.module(crop * 2 - 1)
        if out.dim() != 2:
            out = out.reshape(out.shape[0], -1)
        return out


class TorchLpips(nn.Module):
    """A user's LPIPS network (two N x 3 x H x W images in -1..1 -> a distance per image), frozen."""

    def __init__(self, module: OnnxModule) -> None:
        super().__init__()
        self.module = module
        for p in module.parameters():
            p.requires_grad_(False)
        if len(module.inputs) != 2:
            raise ConfigError(f"{module.what}: an LPIPS network takes two images; it has inputs {module.inputs}")

    def probe(self, size: int) -> None:
        """Run once on two pairs of different images: one finite distance per pair, or a ConfigError naming the file
        (before training, not at its first step)."""
        a = torch.linspace(0, 1, 2).reshape(2, 1, 1, 1).expand(2, 3, size, size)
        dev = next(iter(self.module.parameters()), a).device
        try:
            with torch.no_grad():
                d = self(a.to(dev), a.flip(0).to(dev))
        except Exception as e:  # any op failing on this graph is a property of the user's file
            raise ConfigError(f"{self.module.what}: the importer cannot run this graph on two {size} px images "
                              f"({type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''})") from None
        if tuple(d.shape) != (2,) or not torch.isfinite(d).all():
            raise ConfigError(f"{self.module.what}: two image pairs in gave {list(d.shape)} values "
                              f"({d.flatten()[:4].tolist()}); an LPIPS network gives one finite distance per pair")

    @classmethod
    def load(cls, path: str | Path) -> TorchLpips:
        return cls(OnnxModule(load_onnx(path, "lpips_model"), f"lpips_model {Path(path).name}"))

    def forward(self, a01: torch.Tensor, b01: torch.Tensor) -> torch.Tensor:
        d = self.module(a01 * 2 - 1, b01 * 2 - 1)
        if d.dim() == 0 or d.shape[0] != a01.shape[0]:
            raise ValueError(f"{a01.shape[0]} image pairs gave distances of shape {list(d.shape)}")
        return d.reshape(d.shape[0], -1).mean(1)
