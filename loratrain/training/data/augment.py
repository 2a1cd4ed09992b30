"""sd-scripts' image augmentations that change the pixels every step: color_aug and random_crop.

Their latents cannot be cached: an item of such a subset is decoded, cropped, augmented and
VAE-encoded at each step instead (sd-scripts refuses them with cache_latents; here only those
subsets pay the cost). Every draw comes from a generator the trainer seeds per sample and step,
so a resumed run, or N processes, see exactly the same crops and colours.
"""
from __future__ import annotations

import random

import numpy as np
from PIL import Image

from .buckets import fit_to_bucket

HUE_SHIFT = 8  # sd-scripts' limit, in OpenCV hue units (0-180): +-16 degrees


def random_crop_offset(size: tuple[int, int], bucket: tuple[int, int], resize_to: tuple[int, int] | None,
                       rng: random.Random) -> tuple[int, int]:
    """(left, top) of a uniformly drawn bucket-sized window in the image scaled to cover the bucket."""
    w, h = size
    bw, bh = bucket
    scale = max(bw / w, bh / h)
    nw, nh = resize_to or (max(bw, round(w * scale)), max(bh, round(h * scale)))
    return rng.randint(0, nw - bw), rng.randint(0, nh - bh)


def color_aug(pixels: np.ndarray, rng: random.Random) -> np.ndarray:
    """sd-scripts' color_aug on an HWC uint8 image: a third of the time, half a hue shift of up to 8 OpenCV
    units (16 degrees), half a gamma in [0.95, 1.05] applied to the 0-255 values (as sd-scripts does, so it
    works as a brightness change), clipped."""
    if rng.random() > 0.33:
        return pixels
    if rng.random() > 0.5:
        shift = rng.uniform(-HUE_SHIFT, HUE_SHIFT) * 2 * 256 / 360  # OpenCV units -> degrees -> PIL's 0-255 hue
        hsv = np.array(Image.fromarray(pixels).convert("HSV"))
        hsv[:, :, 0] = ((hsv[:, :, 0].astype(np.float32) + shift) % 256).astype(np.uint8)
        return np.array(Image.fromarray(hsv, "HSV").convert("RGB"))
    gamma = rng.uniform(0.95, 1.05)
    return np.clip(pixels.astype(np.float64) ** gamma, 0, 255).astype(np.uint8)


def augmented_pixels(image: Image.Image, bucket: tuple[int, int], resize_to: tuple[int, int] | None, crop: bool,
                     colour: bool, rng: random.Random, interpolation: str = "") -> tuple[np.ndarray, tuple[int, int]]:
    """The item's bucket-sized HWC uint8 pixels with this step's crop and colour, and the crop's (top, left)."""
    left_top = random_crop_offset(image.size, bucket, resize_to, rng) if crop else None
    pixels = fit_to_bucket(image, bucket, resize_to, left_top, interpolation)
    if colour:
        pixels = color_aug(pixels, rng)
    if left_top is None:
        return pixels, (-1, -1)
    return pixels, (left_top[1], left_top[0])
