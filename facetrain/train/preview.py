"""The five DeepFaceLab preview columns and the likeness score (identity distance of the swap to src)."""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import cv2
import numpy as np
import torch

from loratrain.core.safe_io import atomic_path

if TYPE_CHECKING:
    from ..extract.plugins import IdentityEncoderLike


def preview_grid(src: torch.Tensor, pred_src: torch.Tensor, dst: torch.Tensor, pred_dst: torch.Tensor,
                 swap: torch.Tensor) -> np.ndarray:
    """Rows of src | src predicted | dst | dst predicted | swap, as one BGR uint8 image."""
    cols = [t.detach().float().clamp(0, 1).cpu().numpy().transpose(0, 2, 3, 1) for t in (src, pred_src, dst, pred_dst, swap)]
    rows = [np.concatenate([c[i] for c in cols], axis=1) for i in range(cols[0].shape[0])]
    grid = (np.concatenate(rows, axis=0) * 255).round().astype(np.uint8)
    h = cols[0].shape[1]
    labels = ["src", "pred src", "dst", "pred dst", "swap"]
    bar = np.full((max(14, h // 8), grid.shape[1], 3), 32, np.uint8)
    for i, text in enumerate(labels):
        cv2.putText(bar, text, (i * h + 3, bar.shape[0] - 4), cv2.FONT_HERSHEY_SIMPLEX, max(0.3, h / 300), (230, 230, 230), 1)
    return np.concatenate([bar, grid], axis=0)


def write_preview(image_bgr: np.ndarray, path: Path) -> Path:
    with atomic_path(path) as tmp:
        ok, buf = cv2.imencode(".png", image_bgr)
        if not ok:
            raise RuntimeError("could not encode the preview")
        tmp.write_bytes(buf.tobytes())
    return path


class Likeness:
    """Mean identity distance between swapped dst faces and the src person (lower is more like src), by `encoder`
    (extract/plugins.py `identity_encoder`: dlib's, or an ArcFace-style ONNX file's cosine distance)."""

    def __init__(self, src_faces: np.ndarray, src_landmarks: list[np.ndarray], encoder: IdentityEncoderLike) -> None:
        self.encode = encoder
        emb = [self.encode(_rgb8(f), lm) for f, lm in zip(src_faces, src_landmarks)]
        self.reference = np.mean(emb, axis=0)

    def __call__(self, swaps: torch.Tensor, dst_landmarks: list[np.ndarray]) -> float:
        faces = swaps.detach().float().clamp(0, 1).cpu().numpy().transpose(0, 2, 3, 1)
        dists = [self.encode.distance(self.encode(_rgb8(f), lm), self.reference) for f, lm in zip(faces, dst_landmarks)]
        return float(np.mean(dists))


def _rgb8(bgr01: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray((bgr01[..., ::-1] * 255).round().clip(0, 255).astype(np.uint8))
