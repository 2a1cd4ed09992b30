"""Synthetic photos-with-edges for tests, benchmarks and demos: distinct per seed, sharp, any size."""
from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw


def scene_image(seed: int, size: tuple[int, int] = (640, 576), shapes: int = 60) -> Image.Image:
    """Random rectangles and ellipses on a random background: a pHash and a blur score like a real photo's."""
    rng = np.random.default_rng(seed)
    w, h = size
    img = Image.new("RGB", size, tuple(int(v) for v in rng.integers(0, 256, 3)))
    draw = ImageDraw.Draw(img)
    for _ in range(shapes):
        x0, y0 = int(rng.integers(0, w)), int(rng.integers(0, h))
        x1, y1 = x0 + int(rng.integers(w // 20, w // 3)), y0 + int(rng.integers(h // 20, h // 3))
        color = tuple(int(v) for v in rng.integers(0, 256, 3))
        (draw.rectangle if rng.random() < 0.5 else draw.ellipse)([x0, y0, x1, y1], fill=color)
    return img
