"""One face onto one frame: DFL's MergeMasked as a sequence of small steps (docs/face-swap.md#merger), with one change:
everything after the prediction runs inside the face's bounding box in the frame (as FaceFusion's paste-back
does) instead of on the whole frame, so a 1080p frame costs about what a 256-px one does.

Blend modes are a registry: each turns the working context into the composited region.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import cv2
import numpy as np

from loratrain.core.registry import Registry

from ..landmarks import face_matrix, hull_mask, transform_points
from . import post
from .masks import MaskInputs, big_enough, face_mask, process_subres, seamless_mask


@dataclass
class MergeOptions:
    """The merger's options (SwapConfig's merge group), detached from the config class for worker threads."""

    mode: str = "overlay"
    mask_mode: str = "learned-prd*learned-dst"
    erode_mask_modifier: int = 0
    blur_mask_modifier: int = 0
    output_face_scale: int = 0
    color_transfer_mode: str = "rct"
    masked_hist_match: bool = True
    hist_match_threshold: int = 238
    sharpen_mode: str = "none"
    blursharpen_amount: int = 0
    motion_blur_power: int = 0
    image_denoise_power: int = 0
    bicubic_degrade_power: int = 0
    color_degrade_power: int = 0

    @classmethod
    def of(cls, cfg: object) -> "MergeOptions":
        return cls(**{k: getattr(cfg, k) for k in cls.__dataclass_fields__})


@dataclass
class FaceCrop:
    """A dst face ready for the model: its frame landmarks, the frame-to-crop matrix and the aligned crop."""

    landmarks: np.ndarray
    mat: np.ndarray
    dst: np.ndarray          # R x R x 3 float32 BGR 0..1
    face_type: str
    motion: tuple[float, float] = (0.0, 0.0)  # frame-to-frame movement of the face centre: (pixels, degrees)


def prepare(frame: np.ndarray, landmarks: np.ndarray, resolution: int, face_type: str) -> FaceCrop:
    mat = face_matrix(landmarks, resolution, face_type)
    dst = np.clip(cv2.warpAffine(frame, mat, (resolution, resolution), flags=cv2.INTER_CUBIC), 0, 1)
    return FaceCrop(np.asarray(landmarks, np.float64), mat, dst, face_type)


def _roi(mats: list[tuple[np.ndarray, int]], shape: tuple[int, ...], pad: int = 4) -> tuple[int, int, int, int]:
    """Bounding box (x0, y0, x1, y1) in the frame of every crop square given as (matrix, size)."""
    pts = np.vstack([transform_points(np.array([[0, 0], [s, 0], [s, s], [0, s]], float), m, invert=True) for m, s in mats])
    x0, y0 = np.floor(pts.min(0)).astype(int) - pad
    x1, y1 = np.ceil(pts.max(0)).astype(int) + pad
    h, w = shape[:2]
    return max(0, x0), max(0, y0), min(w, x1), min(h, y1)


def _shift(mat: np.ndarray, x0: int, y0: int) -> np.ndarray:
    """The same frame-to-crop matrix for coordinates relative to (x0, y0)."""
    out = np.asarray(mat, np.float64).copy()
    out[:, 2] += out[:, :2] @ np.array([x0, y0], np.float64)
    return out


def _paste(img: np.ndarray, mat: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Inverse-warp a crop into a frame region (cubic), zeros outside it."""
    return cv2.warpAffine(img, mat, size, flags=cv2.WARP_INVERSE_MAP | cv2.INTER_CUBIC, borderMode=cv2.BORDER_CONSTANT)


@dataclass
class Context:
    """What a blend mode works with; all frame-space arrays are the region (x0, y0, x1, y1) of the frame."""

    region: np.ndarray        # the frame region, float32 BGR
    predicted: np.ndarray     # R x R x 3 prediction (colour-transferred for non-seamless modes)
    dst: np.ndarray           # R x R x 3 dst crop
    area: np.ndarray          # R x R x 1 binary face area
    frame_mask: np.ndarray    # region mask, H x W x 1
    out_mat: np.ndarray       # region -> R crop, with output_face_scale
    opts: MergeOptions

    @property
    def size(self) -> tuple[int, int]:
        return self.region.shape[1], self.region.shape[0]

    def overlay(self, face: np.ndarray) -> np.ndarray:
        pasted = np.clip(_paste(face, self.out_mat, self.size), 0, 1)
        return self.region * (1 - self.frame_mask) + pasted * self.frame_mask


BLEND_MODES: Registry[Callable[[Context], np.ndarray]] = Registry("blend mode")
BLEND_MODES.register("original")(lambda c: c.region)
BLEND_MODES.register("overlay")(lambda c: c.overlay(c.predicted))


@BLEND_MODES.register("hist-match")
def _hist_match(c: Context) -> np.ndarray:
    area = c.area if c.opts.masked_hist_match else None
    return c.overlay(post.masked_hist_match(c.predicted, c.dst, area, c.opts.hist_match_threshold))


@BLEND_MODES.register("seamless", "seamless-hist-match")
def _seamless(c: Context) -> np.ndarray:
    """Poisson clone centred on the mask's bounding rect (the centre seamlessClone itself would pick, fixed so the
    face does not jitter), then alpha-blended with the soft mask."""
    pasted = np.clip(_paste(c.predicted, c.out_mat, c.size), 0, 1)
    binary = seamless_mask(c.frame_mask[..., 0])
    if binary is not None:
        x, y, w, h = cv2.boundingRect(binary)
        try:
            cloned = cv2.seamlessClone((pasted * 255).astype(np.uint8), (c.region * 255).astype(np.uint8), binary,
                                       (int(x + w / 2), int(y + h / 2)), cv2.NORMAL_CLONE)
            pasted = cloned.astype(np.float32) / 255
        except cv2.error:  # seamlessClone refuses masks touching the border: fall back to overlay
            pass
    return c.region * (1 - c.frame_mask) + pasted * c.frame_mask


@BLEND_MODES.register("raw-rgb")
def _raw_rgb(c: Context) -> np.ndarray:
    """The whole predicted square pasted back."""
    square = _paste(np.ones_like(c.predicted), c.out_mat, c.size)
    return c.region * (1 - square) + np.clip(_paste(c.predicted, c.out_mat, c.size), 0, 1) * square


def crop_hull(crop: FaceCrop, resolution: int) -> np.ndarray:
    """The landmark hull of the face in its R x R crop (the `dst` mask mode, and the area the occlusion report
    measures against)."""
    return hull_mask((resolution, resolution), transform_points(crop.landmarks, crop.mat))


def merge_face(frame: np.ndarray, crop: FaceCrop, predicted: tuple[np.ndarray, np.ndarray, np.ndarray], opts: MergeOptions,
               rng: np.random.Generator, xseg_prd: np.ndarray | None = None,
               xseg_dst: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray] | None:
    """(new frame, frame mask) with this face swapped in, or None when its mask is too small to paste (DFL skips
    it). `frame` is float32 BGR 0..1 and is not modified. raw-predict returns the prediction itself.
    `xseg_prd` / `xseg_dst` (R x R) are the segmenter's masks of the prediction and of the crop, for the XSeg modes."""
    prd_face, prd_mask, dst_mask = (np.clip(np.asarray(a, np.float32), 0, 1) for a in predicted)
    r = prd_face.shape[0]
    hull = crop_hull(crop, r)
    work = face_mask(opts.mask_mode, MaskInputs(hull, prd_mask[..., 0], dst_mask[..., 0], xseg_prd, xseg_dst))
    if opts.mode == "raw-predict":
        return prd_face, work[..., None]
    scale = 1.0 + 0.01 * opts.output_face_scale
    out_mat = face_matrix(crop.landmarks, r, crop.face_type, scale) if scale != 1 else crop.mat
    sub_mat = face_matrix(crop.landmarks, 4 * r, crop.face_type, scale)
    sub = cv2.resize(work, (4 * r, 4 * r), interpolation=cv2.INTER_CUBIC)
    if not opts.mode.startswith("raw"):
        sub = process_subres(sub, r, opts.erode_mask_modifier, opts.blur_mask_modifier)

    x0, y0, x1, y1 = _roi([(crop.mat, r), (out_mat, r)], frame.shape)
    if x1 - x0 < 2 or y1 - y0 < 2:
        return None
    region = frame[y0:y1, x0:x1]
    size = (x1 - x0, y1 - y0)
    frame_mask = np.clip(_paste(sub, _shift(sub_mat, x0, y0), size), 0, 1)
    frame_mask[frame_mask < 1 / 255] = 0
    if not big_enough(frame_mask):
        return None
    work = np.clip(cv2.resize(sub, (r, r), interpolation=cv2.INTER_CUBIC), 0, 1)[..., None]
    area = (work > 0).astype(np.float32)
    seamless = opts.mode.startswith("seamless")
    face = prd_face
    if not seamless and not opts.mode.startswith("raw"):
        face = post.transfer(opts.color_transfer_mode, face, crop.dst, area, rng)
    ctx = Context(region, face, crop.dst, area, frame_mask[..., None], _shift(out_mat, x0, y0), opts)
    out = BLEND_MODES.get(opts.mode)(ctx)

    new_frame = frame.copy()
    needs_post = ((seamless and opts.color_transfer_mode != "none") or opts.mode == "seamless-hist-match"
                  or opts.motion_blur_power or opts.blursharpen_amount or opts.image_denoise_power or opts.bicubic_degrade_power)
    if needs_post and opts.mode != "original" and not opts.mode.startswith("raw"):
        face_mat = _shift(crop.mat, x0, y0)
        again = np.clip(cv2.warpAffine(out, face_mat, (r, r), flags=cv2.INTER_CUBIC), 0, 1)
        if seamless and opts.color_transfer_mode != "none":
            again = post.transfer(opts.color_transfer_mode, again, crop.dst, area, rng)
        if opts.mode == "seamless-hist-match":
            again = post.hist_match(again, crop.dst, opts.hist_match_threshold)
        k = post.motion_kernel_size(crop.motion[0], opts.motion_blur_power)
        if k:
            again = post.motion_blur(again, k, crop.motion[1])
        again = post.blursharpen(again, opts.sharpen_mode, opts.blursharpen_amount)
        base = post.bicubic_degrade(post.denoise(frame, opts.image_denoise_power), opts.bicubic_degrade_power)
        new_frame = base.copy()
        region = base[y0:y1, x0:x1]
        pasted = np.clip(_paste(again, face_mat, size), 0, 1)
        out = region * (1 - frame_mask[..., None]) + pasted * frame_mask[..., None]
    if opts.color_degrade_power:
        out = post.color_degrade(out, opts.color_degrade_power)
    new_frame[y0:y1, x0:x1] = np.clip(out, 0, 1)
    full_mask = np.zeros(frame.shape[:2] + (1,), np.float32)
    full_mask[y0:y1, x0:x1, 0] = frame_mask
    return new_frame, full_mask
