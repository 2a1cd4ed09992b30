"""Training faces for a swapper: faceset faces re-cropped at the swapper's template, cleaned, augmented.

Our facesets hold DFL-aligned crops with their 68 landmarks; the swapper was trained on 5-point similarity
crops (`arcface_128` for inswapper), so every face is re-aligned from its own landmarks. The recipe's data
hygiene happens once, before training: faces much blurrier than the faceset's median are dropped (a swapper
learns blur as part of the identity), then near-duplicate frames (recogniser embeddings almost equal) so a
long static shot does not outweigh the rest. Augmentation (flip, colour jitter, rotation, 0.9-1 crops) runs on
the batch in torch, seeded by (seed, iteration), so a resumed run sees the very batches the unbroken run would.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np
import torch

from loratrain.core.errors import ConfigError

from ..faceset import list_faces, load_face
from .align import align_crop, five_points
from .model import warp


@dataclass
class SwapperFaces:
    names: list[str]
    crops: np.ndarray                      # N x S x S x 3 uint8 RGB at the swapper's template
    dropped_blurry: list[str] = field(default_factory=list)
    dropped_duplicate: list[str] = field(default_factory=list)

    def tensor(self, idx: np.ndarray | list[int]) -> torch.Tensor:
        return torch.from_numpy(self.crops[np.asarray(idx)]).permute(0, 3, 1, 2).float() / 255

    def subset(self, keep: list[int]) -> SwapperFaces:
        return SwapperFaces([self.names[i] for i in keep], self.crops[keep], self.dropped_blurry, self.dropped_duplicate)


def load_faces(folder: str, template: str, size: int, what: str) -> SwapperFaces:
    """Every face of `folder`, cropped at `template` / `size`, as RGB uint8."""
    names, crops = [], []
    for path in list_faces(folder):
        img, meta = load_face(path)
        lm = meta.landmarks_array()
        if lm.shape != (68, 2):
            continue
        crop, _ = align_crop(img, five_points(lm), template, size)
        names.append(Path(path).name)
        crops.append(crop[..., ::-1])
    if not crops:
        raise ConfigError(f"{what} {folder}: no faces with 68 landmarks (extract them with `loratrain face extract`)")
    return SwapperFaces(names, np.ascontiguousarray(np.stack(crops)))


def sharpness(crops: np.ndarray) -> np.ndarray:
    """Variance of the Laplacian of each crop's centre (the face, not the background)."""
    s = crops.shape[1]
    c = crops[:, s // 4:s - s // 4, s // 4:s - s // 4]
    return np.array([cv2.Laplacian(cv2.cvtColor(np.ascontiguousarray(x), cv2.COLOR_RGB2GRAY), cv2.CV_32F).var() for x in c])


def drop_blurry(faces: SwapperFaces, fraction: float) -> SwapperFaces:
    if fraction <= 0 or len(faces.names) < 3:
        return faces
    sharp = sharpness(faces.crops)
    floor = fraction * float(np.median(sharp))
    keep = [i for i, v in enumerate(sharp) if v >= floor]
    out = faces.subset(keep)
    out.dropped_blurry = [n for i, n in enumerate(faces.names) if i not in set(keep)]
    return out


def dedupe(faces: SwapperFaces, embeddings: np.ndarray, threshold: float) -> tuple[SwapperFaces, np.ndarray]:
    """Greedy, in name order: keep a face unless its cosine similarity to a kept one exceeds `threshold`."""
    if threshold >= 1:
        return faces, embeddings
    unit = embeddings / np.linalg.norm(embeddings, axis=1, keepdims=True).clip(1e-12)
    keep: list[int] = []
    for i in range(len(unit)):
        if not keep or float((unit[keep] @ unit[i]).max()) <= threshold:
            keep.append(i)
    out = faces.subset(keep)
    out.dropped_duplicate = [n for i, n in enumerate(faces.names) if i not in set(keep)]
    return out, embeddings[keep]


def split_names(names: list[str], share: float, seed: int) -> list[str]:
    """The held-out names (seeded; at least 1 when share > 0 and 3+ faces; never all)."""
    if share <= 0 or len(names) < 3:
        return []
    n = min(len(names) - 1, max(1, round(share * len(names))))
    rng = np.random.default_rng(seed + 7919)
    return sorted(names[i] for i in rng.permutation(len(names))[:n])


@dataclass(frozen=True)
class Augment:
    flip: bool = True
    jitter: float = 0.1
    rotation: float = 10.0
    crop_scale: float = 0.9

    def __call__(self, x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        """A random flip / rotation / crop (one warp) and colour jitter per image of N x 3 x S x S RGB 0..1."""
        n, s = x.shape[0], x.shape[-1]
        u = torch.rand(n, 6, generator=gen)
        angle = (u[:, 0] * 2 - 1) * math.radians(self.rotation)
        zoom = self.crop_scale + (1 - self.crop_scale) * u[:, 1]          # share of the face the crop keeps
        shift = (u[:, 2:4] * 2 - 1) * (1 - zoom)[:, None]                 # stay inside the face
        sign = torch.where((u[:, 4] < 0.5) & torch.tensor(self.flip), -1.0, 1.0)
        cos, sin = torch.cos(angle) * zoom, torch.sin(angle) * zoom
        theta = torch.stack([torch.stack([cos * sign, -sin, shift[:, 0]], 1), torch.stack([sin * sign, cos, shift[:, 1]], 1)], 1)
        x = warp(x, theta, s)
        if self.jitter > 0:
            j = (torch.rand(n, 3, generator=gen) * 2 - 1) * self.jitter
            x = x * (1 + j[:, 0, None, None, None])
            mean = x.mean((1, 2, 3), keepdim=True)
            x = (x - mean) * (1 + j[:, 1, None, None, None]) + mean
            gray = x.mean(1, keepdim=True)
            x = (x - gray) * (1 + j[:, 2, None, None, None]) + gray
        return x.clamp(0, 1)
