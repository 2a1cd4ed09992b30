"""Offline face photos for tests and `loratrain demo face`: scikit-image's astronaut, augmented.

Only one real face ships with scikit-image, so src and dst are the same person in different looks
(dst is re-coloured and re-framed): enough to exercise extraction, alignment and training for real.
"""
from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np


def astronaut_bgr() -> np.ndarray:
    try:
        from skimage import data
    except ImportError:
        raise ImportError("the bundled demo photos come from scikit-image: pip install 'loratrain[face]'") from None
    return cv2.cvtColor(data.astronaut(), cv2.COLOR_RGB2BGR)


def make_photos(folder: str | Path, n: int, seed: int, look: str = "src") -> list[Path]:
    """`n` photos: small rotations, zooms, shifts and exposure changes; `dst` photos are also re-coloured."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    base = astronaut_bgr()[:300, 60:420]  # head and shoulders
    rng = np.random.default_rng(seed)
    h, w = base.shape[:2]
    out = []
    for i in range(n):
        angle, zoom = rng.uniform(-12, 12), rng.uniform(0.9, 1.15)
        mat = cv2.getRotationMatrix2D((w / 2 + rng.uniform(-15, 15), h / 3), angle, zoom)
        mat[:, 2] += rng.uniform(-20, 20, 2)
        img = cv2.warpAffine(base, mat, (w, h), flags=cv2.INTER_CUBIC, borderMode=cv2.BORDER_REFLECT)
        img = img.astype(np.float32) * rng.uniform(0.85, 1.15)
        if look == "dst":
            img = img * np.array([0.75, 0.95, 1.25], np.float32) + 10  # warmer light
            img = img[:, ::-1] if i % 2 else img
        path = folder / f"{look}_{i:03d}.png"
        cv2.imwrite(str(path), np.clip(img, 0, 255).astype(np.uint8))
        out.append(path)
    return out
