"""Colour transfer modes (ct_mode): recolour an image toward a reference, one function per mode.

All take and return float32 BGR images in [0, 1] (HxWx3). The same registry serves training
(src samples toward random dst samples) and, later, the swap path. Definitions: docs/face-model.md#colour-transfer.
"""
from __future__ import annotations

from collections.abc import Callable

import cv2
import numpy as np

from loratrain.core.registry import Registry

Transfer = Callable[..., np.ndarray]
COLOR_TRANSFERS: Registry[Transfer] = Registry("colour transfer mode")


def _pixels(img: np.ndarray) -> np.ndarray:
    return img.reshape(-1, 3).astype(np.float64)


@COLOR_TRANSFERS.register("rct")
def rct(target: np.ndarray, reference: np.ndarray, target_mask: np.ndarray | None = None,
        reference_mask: np.ndarray | None = None, **_: object) -> np.ndarray:
    """Reinhard: match per-channel mean and std in Lab. Masked-out pixels count as zeros, as in DFL."""
    t_lab = cv2.cvtColor(np.clip(target, 0, 1).astype(np.float32), cv2.COLOR_BGR2LAB)
    r_lab = cv2.cvtColor(np.clip(reference, 0, 1).astype(np.float32), cv2.COLOR_BGR2LAB)
    t_stats, r_stats = t_lab.copy(), r_lab.copy()
    if target_mask is not None:
        t_stats[target_mask.reshape(t_stats.shape[:2]) < 0.5] = 0
    if reference_mask is not None:
        r_stats[reference_mask.reshape(r_stats.shape[:2]) < 0.5] = 0
    tm, ts = t_stats.reshape(-1, 3).mean(0), t_stats.reshape(-1, 3).std(0)
    rm, rs = r_stats.reshape(-1, 3).mean(0), r_stats.reshape(-1, 3).std(0)
    out = (t_lab - tm) * (rs / np.maximum(ts, 1e-6)) + rm
    out[..., 0] = np.clip(out[..., 0], 0, 100)
    out[..., 1:] = np.clip(out[..., 1:], -127, 127)
    return np.clip(cv2.cvtColor(out.astype(np.float32), cv2.COLOR_LAB2BGR), 0, 1)


def _sqrtm(cov: np.ndarray) -> np.ndarray:
    vals, vecs = np.linalg.eigh(cov)
    return vecs @ np.diag(np.sqrt(np.maximum(vals, 0))) @ vecs.T


@COLOR_TRANSFERS.register("lct")
def lct(target: np.ndarray, reference: np.ndarray, **_: object) -> np.ndarray:
    """Linear (PCA): x -> Q_r Q_t^-1 (x - mu_t) + mu_r, with Q the covariance square root."""
    t, r = _pixels(target), _pixels(reference)
    mt, mr = t.mean(0), r.mean(0)
    ct = np.cov(t, rowvar=False) + 1e-5 * np.eye(3)
    cr = np.cov(r, rowvar=False) + 1e-5 * np.eye(3)
    m = _sqrtm(cr) @ np.linalg.inv(_sqrtm(ct))
    return np.clip(((t - mt) @ m.T + mr).reshape(target.shape), 0, 1).astype(np.float32)


@COLOR_TRANSFERS.register("mkl")
def mkl(target: np.ndarray, reference: np.ndarray, **_: object) -> np.ndarray:
    """Monge-Kantorovich linear map: the optimal-transport map between the two colour Gaussians."""
    t, r = _pixels(target), _pixels(reference)
    a = np.cov(t, rowvar=False) + 1e-8 * np.eye(3)
    b = np.cov(r, rowvar=False) + 1e-8 * np.eye(3)
    da2, ua = np.linalg.eigh(a)
    da = np.diag(np.sqrt(np.maximum(da2, 1e-12)))
    c = da @ ua.T @ b @ ua @ da
    dc2, uc = np.linalg.eigh(c)
    dc = np.diag(np.sqrt(np.maximum(dc2, 0)))
    da_inv = np.diag(1.0 / np.diag(da))
    tmat = ua @ da_inv @ uc @ dc @ uc.T @ da_inv @ ua.T
    return np.clip(((t - t.mean(0)) @ tmat + r.mean(0)).reshape(target.shape), 0, 1).astype(np.float32)


def _random_rotation(rng: np.random.Generator) -> np.ndarray:
    q, rr = np.linalg.qr(rng.normal(size=(3, 3)))
    q = q * np.sign(np.diag(rr))
    if np.linalg.det(q) < 0:
        q[:, 0] = -q[:, 0]
    return q


@COLOR_TRANSFERS.register("idt")
def idt(target: np.ndarray, reference: np.ndarray, iterations: int = 20, bins: int = 256,
        rng: np.random.Generator | None = None, **_: object) -> np.ndarray:
    """Iterative distribution transfer (Pitie): 1-D histogram matching along random rotated axes."""
    rng = rng or np.random.default_rng(0)
    t, r = _pixels(target), _pixels(reference)
    relax = 1.0 / iterations
    for _ in range(iterations):
        rot = _random_rotation(rng)
        tp, rp = t @ rot, r @ rot
        moved = np.empty_like(tp)
        for k in range(3):
            lo = min(tp[:, k].min(), rp[:, k].min())
            hi = max(tp[:, k].max(), rp[:, k].max()) + 1e-9
            edges = np.linspace(lo, hi, bins + 1)
            t_cdf = np.cumsum(np.histogram(tp[:, k], edges)[0]).astype(np.float64)
            r_cdf = np.cumsum(np.histogram(rp[:, k], edges)[0]).astype(np.float64)
            t_cdf /= t_cdf[-1]
            r_cdf /= r_cdf[-1]
            matched_edges = np.interp(t_cdf, r_cdf, edges[1:])
            moved[:, k] = np.interp(tp[:, k], edges[1:], matched_edges)
        t = t + relax * (moved - tp) @ rot.T
    return np.clip(t.reshape(target.shape), 0, 1).astype(np.float32)


@COLOR_TRANSFERS.register("sot")
def sot(target: np.ndarray, reference: np.ndarray, steps: int = 10, directions: int = 5,
        rng: np.random.Generator | None = None, regularize: bool = True, **_: object) -> np.ndarray:
    """Sliced optimal transport: move pixels along random directions by their rank-matched offsets."""
    rng = rng or np.random.default_rng(0)
    t0 = _pixels(target)
    t, r = t0.copy(), _pixels(reference)
    idx_r = rng.choice(len(r), len(t)) if len(r) != len(t) else np.arange(len(r))
    r = r[idx_r]
    for _ in range(steps):
        advect = np.zeros_like(t)
        for _ in range(directions):
            d = rng.normal(size=3)
            d /= np.linalg.norm(d)
            pt, pr = t @ d, r @ d
            order = np.argsort(pt)
            shift = np.empty_like(pt)
            shift[order] = np.sort(pr) - pt[order]
            advect += shift[:, None] * d
        t += advect / directions
    out = t.reshape(target.shape).astype(np.float32)
    if regularize:
        delta = (out - target.astype(np.float32))
        # DFL: sigmaColor 5.0, sigmaSpace 16 on 0..1 floats; at that sigmaColor the filter is a plain spatial
        # blur of the displacement, which is what keeps sot from recolouring pixel by pixel.
        delta = cv2.bilateralFilter(delta, 0, 5.0, 16)
        out = target.astype(np.float32) + delta
    return np.clip(out, 0, 1).astype(np.float32)


def color_transfer(mode: str, target: np.ndarray, reference: np.ndarray, **kw: object) -> np.ndarray:
    if mode in ("", "none"):
        return target
    return COLOR_TRANSFERS.get(mode)(target, reference, **kw)
