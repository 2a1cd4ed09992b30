"""Sample augmentation as in SAEHD: grid random warp (input only), random affine + flip (shared), HSV.

Definitions: docs/face-model.md#augmentation. The warp and the affine of one sample come from one parameter set, so the warped input,
the target and the masks stay registered; only the grid warp is reserved for the network input.

One deliberate difference from DFL's grid warp: DFL's control grid runs 0..w over w/cell + 1 points and
leaves every pixel shifted by about (+0.5, +0.5) px on average; we subtract the warp of the un-jittered
grid, so the mean displacement is zero. The noise strength itself is DFL's (see `warp_params`).
"""
from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np


@dataclass
class WarpParams:
    mapx: np.ndarray
    mapy: np.ndarray
    affine: np.ndarray
    flip: bool
    size: int


def truncated_normal(rng: np.random.Generator, shape: tuple[int, ...], cut: float = 2.5) -> np.ndarray:
    """Standard normal draws redrawn until inside +-cut, divided by cut (DFL's `random_normal`)."""
    out = rng.normal(size=shape)
    bad = np.abs(out) > cut
    while bad.any():
        out[bad] = rng.normal(size=int(bad.sum()))
        bad = np.abs(out) > cut
    return (out / cut).astype(np.float32)


def warp_params(size: int, rng: np.random.Generator, flip: bool = False, rotation: tuple[float, float] = (-10, 10),
                scale: tuple[float, float] = (-0.15, 0.15), shift: tuple[float, float] = (-0.05, 0.05)) -> WarpParams:
    w = max(size, 64)  # computed at >= 64 px and resized, as DFL does for small outputs
    cell = w // int(rng.choice([2, 4, 8]))
    count = w // cell + 1
    grid = np.broadcast_to(np.linspace(0, w, count), (count, count)).astype(np.float32)
    # DFL's noise: a normal cut at +-2.5 and divided by 2.5 (std ~0.38), and its y map is a transposed view
    # of its x map, so the two in-place adds mix: dx(i, j) = nx(i, j) + ny(j, i) and dy = dx transposed.
    # Mean |displacement| is then ~1.55% of the side, as in DFL (a plain N(0, 1) doubled it).
    inner = count - 2
    nx = truncated_normal(rng, (inner, inner)) * cell * 0.24
    ny = truncated_normal(rng, (inner, inner)) * cell * 0.24
    noise_x = np.zeros_like(grid)
    noise_x[1:-1, 1:-1] = nx + ny.T
    noise_y = noise_x.T
    half = cell // 2

    def dense(control: np.ndarray) -> np.ndarray:
        return cv2.resize(control, (w + cell, w + cell))[half:half + w, half:half + w].astype(np.float32)

    # DFL's grid runs 0..w over w+1 control points, which shifts every pixel by about half a pixel; the
    # warp of the un-jittered grid is subtracted so that on average the content stays exactly in place.
    ident = np.broadcast_to(np.arange(w, dtype=np.float32), (w, w))
    mapx = dense(grid + noise_x) - (dense(grid) - ident)
    mapy = dense(grid.T + noise_y) - (dense(grid.T) - ident.T)
    if w != size:
        mapx = cv2.resize(mapx, (size, size)) * (size / w)
        mapy = cv2.resize(mapy, (size, size)) * (size / w)
    angle = rng.uniform(*rotation)
    s = rng.uniform(1 / (1 - scale[0]), 1 + scale[1])
    tx, ty = rng.uniform(*shift, size=2)
    affine = cv2.getRotationMatrix2D((size // 2, size // 2), angle, s)
    affine[:, 2] += (tx * size, ty * size)
    return WarpParams(mapx, mapy, affine, bool(flip and rng.integers(10) < 4), size)


def apply_warp(img: np.ndarray, p: WarpParams, random_warp: bool, is_mask: bool = False) -> np.ndarray:
    """Grid warp (when asked) then the shared affine and flip."""
    interp = cv2.INTER_LINEAR if is_mask else cv2.INTER_CUBIC
    if random_warp:
        img = cv2.remap(img, p.mapx, p.mapy, interp, borderMode=cv2.BORDER_REPLICATE)
    border = cv2.BORDER_CONSTANT if is_mask else cv2.BORDER_REPLICATE
    out = cv2.warpAffine(img, p.affine, (p.size, p.size), flags=interp, borderMode=border)
    if out.ndim < img.ndim:
        out = out[..., None]
    if p.flip:
        out = out[:, ::-1]
    return np.ascontiguousarray(out)


def random_hsv(img: np.ndarray, power: float, rng: np.random.Generator) -> np.ndarray:
    """Hue shift of up to +-180*power degrees, saturation and value shifts of up to +-power/2."""
    if power <= 0:
        return img
    hsv = cv2.cvtColor(img.astype(np.float32), cv2.COLOR_BGR2HSV)
    hsv[..., 0] = (hsv[..., 0] + rng.uniform(-0.5, 0.5) * 360 * power) % 360
    hsv[..., 1] = np.clip(hsv[..., 1] + (rng.random() - 0.5) * power, 0, 1)
    hsv[..., 2] = np.clip(hsv[..., 2] + (rng.random() - 0.5) * power, 0, 1)
    return np.clip(cv2.cvtColor(hsv, cv2.COLOR_HSV2BGR), 0, 1)
