"""What the checks need from each image, computed once per image on worker threads.

pHash: DCT of the 32x32 grayscale image, the 8x8 lowest frequencies compared with their median (the
`imagehash` definition), so the Hamming distance between two 64-bit hashes measures visual
difference. Blur: variance of the 4-neighbour Laplacian of the grayscale image scaled to at most
1024 px on its long side (the OpenCV recipe on a fixed scale, so one threshold fits every size).
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
from PIL import Image

from loratrain.core.images import grayscale_array, laplacian_variance, open_image, to_rgb_on_white

BLUR_SIDE = 1024


@dataclass
class ImageInfo:
    path: Path
    width: int = 0
    height: int = 0
    error: str | None = None
    pixel_hash: str = ""
    phash: int = 0
    blur: float = 0.0
    format: str = ""  # what Pillow found in the file (PNG, JPEG, MPO, WEBP, BMP), whatever its extension says


@lru_cache(maxsize=4)
def _dct_matrix(n: int) -> np.ndarray:
    k = np.arange(n)[:, None]
    i = np.arange(n)[None, :]
    m = np.cos(np.pi * (2 * i + 1) * k / (2 * n)) * np.sqrt(2.0 / n)
    m[0] /= np.sqrt(2.0)
    return m


def phash(img: Image.Image, hash_size: int = 8, factor: int = 4) -> int:
    n = hash_size * factor
    small = np.asarray(to_rgb_on_white(img).convert("L").resize((n, n), Image.Resampling.LANCZOS), dtype=np.float64)
    d = _dct_matrix(n)
    low = (d @ small @ d.T)[:hash_size, :hash_size]
    bits = (low > np.median(low)).ravel()
    return int(sum(1 << i for i, b in enumerate(bits) if b))


def measure(path: Path) -> ImageInfo:
    info = ImageInfo(path=path)
    try:
        img = open_image(path)
    except Exception as e:  # the error text names the file; the check reports it
        info.error = str(e)
        return info
    with img:
        info.width, info.height = img.size
        info.format = img.format or ""
        rgb = to_rgb_on_white(img)
        h = hashlib.sha1(f"{rgb.size}".encode())
        h.update(rgb.tobytes())
        info.pixel_hash = h.hexdigest()
        info.phash = phash(rgb)
        info.blur = laplacian_variance(grayscale_array(rgb, BLUR_SIDE))
    return info


def hamming_pairs(hashes: list[int], max_distance: int) -> list[tuple[int, int, int]]:
    """(i, j, distance) for every pair within `max_distance` bits; vectorised, one row at a time."""
    arr = np.asarray(hashes, dtype=np.uint64)
    out = []
    for i in range(len(arr) - 1):
        dist = np.bitwise_count(arr[i + 1:] ^ arr[i])
        for j in np.flatnonzero(dist <= max_distance):
            out.append((i, i + 1 + int(j), int(dist[j])))
    return out
