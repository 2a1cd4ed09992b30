"""Image operations of the merger (docs/face-swap.md#merger, steps 7-9): colour transfer of the prediction with DFL's
masked variants, histogram matching, blur/sharpen, motion blur, frame denoise and degrades.

All work on float32 BGR images in 0..1.
"""
from __future__ import annotations

from collections.abc import Callable

import cv2
import numpy as np

from loratrain.core.registry import Registry

from ..color import color_transfer

SHARPEN: Registry[Callable[[np.ndarray, float], np.ndarray]] = Registry("sharpen mode")


def transfer(mode: str, predicted: np.ndarray, dst: np.ndarray, area: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Recolour the prediction toward the dst crop. `area` is the binary face area (R x R x 1); "-m" modes run the
    transfer on both images multiplied by it, rct uses it as the statistics mask (DFL's merger)."""
    if mode == "none":
        return predicted
    if mode == "rct":
        return color_transfer("rct", predicted, dst, target_mask=area, reference_mask=area)
    if mode.endswith("-m"):
        base = mode[:-2]
        kw = {"directions": 30} if base == "sot" else {}
        out = color_transfer(base, predicted * area, dst * area, rng=rng, **kw)
    else:
        out = color_transfer(mode, predicted, dst, rng=rng)
    return np.clip(out, 0, 1).astype(np.float32)


def hist_match(source: np.ndarray, template: np.ndarray, threshold: int = 255) -> np.ndarray:
    """Per-channel CDF matching; source quantiles are scaled to threshold/255, so 238 keeps highlights below
    the template's brightest values (DFL's hist_match_threshold)."""
    out = np.empty_like(source, dtype=np.float32)
    for c in range(source.shape[2]):
        s, t = source[..., c].ravel(), template[..., c].ravel()
        s_values, s_index, s_counts = np.unique(s, return_inverse=True, return_counts=True)
        t_values, t_counts = np.unique(t, return_counts=True)
        s_q = np.cumsum(s_counts, dtype=np.float64)
        s_q = threshold * s_q / s_q[-1]
        t_q = np.cumsum(t_counts, dtype=np.float64)
        t_q = 255 * t_q / t_q[-1]
        out[..., c] = np.interp(s_q, t_q, t_values)[s_index].reshape(source.shape[:2])
    return out


def masked_hist_match(predicted: np.ndarray, dst: np.ndarray, area: np.ndarray | None, threshold: int) -> np.ndarray:
    """Histogram-match inside `area` (None: everywhere); outside it both images are white, as in DFL."""
    if area is None:
        return hist_match(predicted, dst, threshold)
    white = 1.0 - area
    return np.clip(hist_match(np.minimum(predicted * area + white, 1), np.minimum(dst * area + white, 1), threshold), 0, 1)


@SHARPEN.register("box")
def box_sharpen(img: np.ndarray, amount: float, size: int = 3) -> np.ndarray:
    """kernel = delta + (delta - box) * amount."""
    delta = np.zeros((size, size), np.float32)
    delta[size // 2, size // 2] = 1
    kernel = delta + (delta - np.full((size, size), 1 / size ** 2, np.float32)) * amount
    return cv2.filter2D(img, -1, kernel)


@SHARPEN.register("gaussian")
def gaussian_sharpen(img: np.ndarray, amount: float, size: int = 3) -> np.ndarray:
    """Unsharp mask: img * (1 + a/2) - blur * a/2."""
    blur = cv2.GaussianBlur(img, (size, size), 0)
    return cv2.addWeighted(img, 1 + 0.5 * amount, blur, -0.5 * amount, 0)


def repeated_median(img: np.ndarray, power: int, step: int) -> np.ndarray:
    """Median-5 passes: each full `step` of power replaces the image, the remainder blends in partially."""
    n = power
    while n > 0:
        blurred = cv2.medianBlur(img, 5)
        img = blurred if n >= step else img * (1 - (n % step) / step) + blurred * ((n % step) / step)
        n = max(n - 10, 0)
    return img.astype(np.float32)


def blursharpen(img: np.ndarray, mode: str, amount: int) -> np.ndarray:
    """amount -100..100: positive sharpens with `mode`, negative blurs with repeated medians."""
    if amount > 0 and mode != "none":
        return np.clip(SHARPEN.get(mode)(img, amount / 100), 0, 1)
    if amount < 0:
        return repeated_median(img, -amount, 10)
    return img


def motion_blur(img: np.ndarray, size: int, degrees: float) -> np.ndarray:
    """A line kernel of `size` px along `degrees`, normalised."""
    k = np.zeros((size, size), np.float32)
    k[(size - 1) // 2, :] = 1
    k = cv2.warpAffine(k, cv2.getRotationMatrix2D((size / 2 - 0.5, size / 2 - 0.5), degrees, 1.0), (size, size))
    return cv2.filter2D(img, -1, k / max(float(k.sum()), 1e-6))


def motion_kernel_size(motion_px: float, power: int) -> int:
    """DFL: int(motion * power/100) + 1, clipped to 2..50; 0 (no blur) below one pixel."""
    k = int(motion_px * power / 100)
    return 0 if k < 1 else int(np.clip(k + 1, 2, 50))


def denoise(frame: np.ndarray, power: int) -> np.ndarray:
    """image_denoise_power 0..500: full median passes per 100, a partial one for the rest."""
    return repeated_median(frame, power, 100) if power else frame


def bicubic_degrade(frame: np.ndarray, power: int) -> np.ndarray:
    if not power:
        return frame
    h, w = frame.shape[:2]
    p = 1.0 - power / 101.0
    small = cv2.resize(frame, (max(1, int(w * p)), max(1, int(h * p))), interpolation=cv2.INTER_CUBIC)
    return np.clip(cv2.resize(small, (w, h), interpolation=cv2.INTER_CUBIC), 0, 1)


def color_degrade(img: np.ndarray, power: int) -> np.ndarray:
    """Blend toward a 256-colour (adaptive palette) version of the image."""
    if not power:
        return img
    from PIL import Image

    rgb = Image.fromarray(cv2.cvtColor((np.clip(img, 0, 1) * 255).astype(np.uint8), cv2.COLOR_BGR2RGB))
    reduced = cv2.cvtColor(np.asarray(rgb.quantize(256).convert("RGB")), cv2.COLOR_RGB2BGR).astype(np.float32) / 255
    alpha = power / 100
    return (img * (1 - alpha) + reduced * alpha).astype(np.float32)
