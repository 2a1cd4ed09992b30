"""The face segmenter (XSeg): a small U-Net from an aligned face to the probability that a pixel is face.

DFL's XSeg is a U-Net too (256 px, 32 base channels, six halvings down to 4 x 4, skip connections, a sigmoid
output); ours has the same shape of network with GroupNorm in place of DFL's filter-response norm, which
behaves the same at the batch sizes of 1-8 a segmenter is trained with. Resolution, width and depth are
stored in the file, so a tiny test model and a 256-px one load through the same code.

`XSegPredictor` is what the rest of the toolkit uses: aligned crops in (BGR float 0..1 at any size), masks out
at the same size, values under 1/255 set to 0 (DFL's merger does the same).
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import cv2
import numpy as np
import torch
from safetensors import safe_open
from torch import nn

from loratrain.core.errors import ConfigError
from loratrain.core.safe_io import save_safetensors

META_KEY = "loratrain.xseg"
NOISE = 1.0 / 255.0


@dataclass
class XSegSpec:
    resolution: int = 256
    base: int = 32        # channels of the first level; doubled per level up to 8x
    depth: int = 6        # halvings: 256 px -> 4 x 4 at depth 6
    face_type: str = "wf"

    def check(self, source: str = "xseg") -> None:
        """The ranges `face xseg train` accepts; a file's header is held to them before anything is built, so a
        planted header cannot size a network of gigabytes."""
        from ..face_types import FACE_TYPES

        for name, lo, hi in (("resolution", 32, 1024), ("base", 4, 128), ("depth", 2, 8)):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or not lo <= value <= hi:
                raise ConfigError(f"{source}: {name} {value!r} is outside {lo}..{hi}")
        if self.resolution % (2 ** self.depth):
            raise ConfigError(f"{source}: resolution {self.resolution} must be divisible by 2^depth = {2 ** self.depth}")
        if not isinstance(self.face_type, str) or (self.face_type and self.face_type not in FACE_TYPES):
            raise ConfigError(f"{source}: unknown face type {self.face_type!r}")


def _block(cin: int, cout: int) -> nn.Sequential:
    groups = 4 if cout % 4 == 0 else 1
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1), nn.GroupNorm(groups, cout), nn.LeakyReLU(0.1),
                         nn.Conv2d(cout, cout, 3, padding=1), nn.GroupNorm(groups, cout), nn.LeakyReLU(0.1))


class XSegNet(nn.Module):
    def __init__(self, spec: XSegSpec) -> None:
        super().__init__()
        spec.check()
        self.spec = spec
        chans = [spec.base * min(2 ** i, 8) for i in range(spec.depth + 1)]
        self.stem = _block(3, chans[0])
        self.down = nn.ModuleList(_block(chans[i], chans[i + 1]) for i in range(spec.depth))
        self.up = nn.ModuleList(nn.ConvTranspose2d(chans[i + 1], chans[i], 2, stride=2) for i in range(spec.depth))
        self.merge = nn.ModuleList(_block(2 * chans[i], chans[i]) for i in range(spec.depth))
        self.head = nn.Conv2d(chans[0], 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """N x 3 x R x R BGR in 0..1 -> N x 1 x R x R logits."""
        skips = [self.stem(x * 2 - 1)]
        for block in self.down:
            skips.append(block(nn.functional.max_pool2d(skips[-1], 2)))
        h = skips.pop()
        for i in reversed(range(len(self.down))):
            h = self.merge[i](torch.cat([self.up[i](h), skips[i]], 1))
        return self.head(h)


def save_xseg(model: XSegNet, path: str | Path, info: dict) -> None:
    """Weights as safetensors; the spec and training figures (iteration, held-out IoU) as JSON metadata."""
    tensors = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    save_safetensors(tensors, path, {META_KEY: json.dumps({"spec": asdict(model.spec), **info})})


def load_xseg(path: str | Path) -> tuple[XSegNet, dict]:
    """A segmenter file written by `face xseg train`; a wrong or foreign file is a named ConfigError."""
    path = Path(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = json.loads((f.metadata() or {})[META_KEY])
            tensors = {k: f.get_tensor(k) for k in f.keys()}
        if not isinstance(meta, dict) or not isinstance(meta.get("spec"), dict):
            raise KeyError(META_KEY)
        spec = XSegSpec(**meta["spec"])
        spec.check(str(path))
        model = XSegNet(spec)
        model.load_state_dict(tensors)
    except KeyError:
        raise ConfigError(f"{path}: not a loratrain XSeg model (no {META_KEY} metadata; train one with `face xseg train`)") from None
    except FileNotFoundError:
        raise ConfigError(f"xseg model not found: {path}") from None
    except ConfigError:
        raise
    except Exception as e:  # safetensors, json, shapes: all mean the file is not ours or is damaged
        raise ConfigError(f"{path}: unreadable XSeg model ({str(e).splitlines()[0][:200]})") from None
    return model.eval(), meta


def to_input(faces: np.ndarray, resolution: int) -> torch.Tensor:
    """N x H x W x 3 BGR float 0..1 crops as the network's N x 3 x R x R input."""
    if faces.shape[1] != resolution:
        interp = cv2.INTER_AREA if faces.shape[1] > resolution else cv2.INTER_LINEAR
        faces = np.stack([cv2.resize(f, (resolution, resolution), interpolation=interp) for f in faces])
    return torch.from_numpy(np.ascontiguousarray(faces.transpose(0, 3, 1, 2), np.float32))


class XSegPredictor:
    """Masks for aligned crops, batched; the merger's and `face xseg apply`'s one way of running a segmenter."""

    def __init__(self, path: str | Path, device: str = "cpu", batch: int = 16) -> None:
        self.model, self.info = load_xseg(path)
        self.device = torch.device(device)
        self.model.to(self.device)
        self.batch = batch
        self.name = Path(path).name

    @property
    def resolution(self) -> int:
        return self.model.spec.resolution

    @property
    def face_type(self) -> str:
        return self.model.spec.face_type

    def __call__(self, faces: np.ndarray) -> np.ndarray:
        """N x S x S x 3 BGR float 0..1 -> N x S x S float32 masks in 0..1 (under 1/255 -> 0)."""
        if len(faces) == 0:
            return np.zeros((0, *faces.shape[1:3]), np.float32)
        size = faces.shape[1]
        outs = []
        with torch.inference_mode():
            for i in range(0, len(faces), self.batch):
                x = to_input(faces[i:i + self.batch], self.resolution).to(self.device)
                outs.append(torch.sigmoid(self.model(x))[:, 0].float().cpu().numpy())
        masks = np.concatenate(outs)
        if size != self.resolution:
            masks = np.stack([cv2.resize(m, (size, size), interpolation=cv2.INTER_LINEAR) for m in masks])
        masks = np.clip(masks, 0, 1).astype(np.float32)
        masks[masks < NOISE] = 0
        return masks
