"""The WD tagger input: white-padded centred square, resized, BGR float32 0-255, NHWC.

The canonical resize is PIL bicubic (SmilingWolf's Space); `area_lanczos` is sd-scripts' variant
(area when shrinking, Lanczos when enlarging) for users who want its exact captions.
"""
from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image

from loratrain.core.images import open_image, to_rgb_on_white
from loratrain.core.registry import Registry

Resize = Callable[[Image.Image, int], Image.Image]
RESIZE_MODES: Registry[Resize] = Registry("tagger resize mode")


@RESIZE_MODES.register("bicubic")
def _bicubic(img: Image.Image, size: int) -> Image.Image:
    return img.resize((size, size), Image.Resampling.BICUBIC)


@RESIZE_MODES.register("area_lanczos")
def _area_lanczos(img: Image.Image, size: int) -> Image.Image:
    method = Image.Resampling.BOX if img.width > size else Image.Resampling.LANCZOS
    return img.resize((size, size), method)


def pad_to_square(img: Image.Image) -> Image.Image:
    """Centre on a white square; an odd margin puts the extra pixel on the right / bottom."""
    w, h = img.size
    side = max(w, h)
    if w == h:
        return img
    canvas = Image.new("RGB", (side, side), (255, 255, 255))
    canvas.paste(img, ((side - w) // 2, (side - h) // 2))
    return canvas


def prepare_image(img: Image.Image, size: int, resize: str = "bicubic") -> np.ndarray:
    """HWC float32 BGR array for one image."""
    square = pad_to_square(to_rgb_on_white(img))
    if square.size != (size, size):
        square = RESIZE_MODES.get(resize)(square, size)
    return np.asarray(square, dtype=np.float32)[:, :, ::-1]


def load_prepared(path: str | Path, size: int, resize: str = "bicubic") -> np.ndarray:
    with open_image(path) as img:
        return prepare_image(img, size, resize)
