"""Aspect-ratio buckets as sd-scripts makes them, and the resize-to-cover + centre crop."""
from __future__ import annotations

import math

import numpy as np
from PIL import Image


def bucket_resolutions(resolution: tuple[int, int], min_size: int, max_size: int, step: int) -> list[tuple[int, int]]:
    max_area = resolution[0] * resolution[1]
    side = int(math.sqrt(max_area) // step) * step
    resos = {(side, side)}
    width = min_size
    while width <= max_size:
        height = min(max_size, int((max_area // width) // step) * step)
        if height >= min_size:
            resos.add((width, height))
            resos.add((height, width))
        width += step
    return sorted(resos)


def select_bucket(size: tuple[int, int], buckets: list[tuple[int, int]]) -> tuple[int, int]:
    aspect = size[0] / size[1]
    return min(buckets, key=lambda b: (abs(b[0] / b[1] - aspect), -b[0] * b[1]))


def fit_to_bucket(image: Image.Image, bucket: tuple[int, int]) -> np.ndarray:
    """Scale so the image covers the bucket, centre-crop, return HWC uint8."""
    w, h = image.size
    bw, bh = bucket
    scale = max(bw / w, bh / h)
    nw, nh = max(bw, round(w * scale)), max(bh, round(h * scale))
    resized = image.resize((nw, nh), Image.Resampling.LANCZOS if scale < 1 else Image.Resampling.BICUBIC)
    left, top = (nw - bw) // 2, (nh - bh) // 2
    return np.array(resized.crop((left, top, left + bw, top + bh)).convert("RGB"))  # writable: torch.from_numpy takes it as is
