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


def no_upscale_bucket(size: tuple[int, int], max_area: int, step: int) -> tuple[tuple[int, int], tuple[int, int]]:
    """sd-scripts' --bucket_no_upscale: (size to resize to, bucket) for one image, from its own size.

    An image within the resolution's area keeps its size and is only trimmed to multiples of
    `step`; a larger one is scaled down to that area (its width or its height rounded to a step,
    whichever keeps the aspect ratio better) and then trimmed. Nothing is ever upscaled.
    """
    w, h = size
    if w * h > max_area:
        aspect = w / h

        def to_step(x: float) -> int:
            x = int(x + 0.5)
            return x - x % step

        rw = math.sqrt(max_area * aspect)
        rh = max_area / rw
        bw = to_step(rw)
        bh_for_w = to_step(bw / aspect)
        bh = to_step(rh)
        bw_for_h = to_step(bh * aspect)
        err_w = abs(bw / bh_for_w - aspect) if bh_for_w else math.inf
        err_h = abs(bw_for_h / bh - aspect) if bh else math.inf
        resized = (bw, int(bw / aspect + 0.5)) if err_w < err_h else (int(bh * aspect + 0.5), bh)
    else:
        resized = (w, h)
    return resized, (resized[0] - resized[0] % step, resized[1] - resized[1] % step)


#: sd-scripts' resize_interpolation names (OpenCV's) as PIL filters; "area" averages like a box filter
RESAMPLE = {"lanczos": Image.Resampling.LANCZOS, "nearest": Image.Resampling.NEAREST, "bilinear": Image.Resampling.BILINEAR,
            "linear": Image.Resampling.BILINEAR, "bicubic": Image.Resampling.BICUBIC, "cubic": Image.Resampling.BICUBIC,
            "area": Image.Resampling.BOX, "box": Image.Resampling.BOX}


def fit_to_bucket(image: Image.Image, bucket: tuple[int, int], resize_to: tuple[int, int] | None = None,
                  left_top: tuple[int, int] | None = None, interpolation: str = "") -> np.ndarray:
    """Scale so the image covers the bucket (or to `resize_to`), crop (centred, or at `left_top`), return HWC uint8.
    `interpolation`: one of RESAMPLE's names, or "" for lanczos when shrinking and bicubic when enlarging."""
    w, h = image.size
    bw, bh = bucket
    scale = max(bw / w, bh / h)
    nw, nh = resize_to or (max(bw, round(w * scale)), max(bh, round(h * scale)))
    resample = RESAMPLE[interpolation] if interpolation else (Image.Resampling.LANCZOS if nw < w else Image.Resampling.BICUBIC)
    resized = image if (nw, nh) == (w, h) else image.resize((nw, nh), resample)
    left, top = left_top if left_top is not None else ((nw - bw) // 2, (nh - bh) // 2)
    return np.array(resized.crop((left, top, left + bw, top + bh)).convert("RGB"))  # writable: torch.from_numpy takes it as is
