"""Merge masks (DFL's mask modes) and their processing at 4x sub-resolution (docs/face-swap.md#mask-modes, docs/face-swap.md#mask-processing).

A mask mode picks the face-space mask from the landmark hull, the model's two learned masks and, for DFL's
modes 6-9, a separate segmenter's (XSeg's) masks of the predicted face and of the dst crop. Erosion and
blur then run on a zero-padded 4R copy, so a blur of N sub-pixels fades out inside the crop instead of being
cut at its edge, which is what lets DFL's blur values mean the same at every model resolution.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import cv2
import numpy as np

from loratrain.core.errors import ConfigError
from loratrain.core.registry import Registry

NOISE = 1.0 / 255.0


@dataclass
class MaskInputs:
    hull: np.ndarray        # R x R landmark hull of the dst face
    predicted: np.ndarray   # R x R mask of the predicted (src-likeness) face
    dst: np.ndarray         # R x R learned dst mask
    xseg_prd: np.ndarray | None = None  # R x R segmenter mask of the predicted face (modes XSeg-prd, 8, 9)
    xseg_dst: np.ndarray | None = None  # R x R segmenter mask of the dst crop (modes XSeg-dst, 8, 9)

    def xseg(self, which: str) -> np.ndarray:
        """`xseg_prd` or `xseg_dst`; missing means the swap was set up without the segmenter this mode needs."""
        mask = getattr(self, which)
        if mask is None:
            raise ConfigError(f"mask_mode: an XSeg mode needs the {which.replace('_', '-')} mask: pass --xseg_model")
        return mask


MASK_MODES: Registry[Callable[[MaskInputs], np.ndarray]] = Registry("mask mode")
MASK_MODES.register("full")(lambda m: np.ones_like(m.hull))
MASK_MODES.register("dst")(lambda m: m.hull)
MASK_MODES.register("learned-prd")(lambda m: m.predicted)
MASK_MODES.register("learned-dst")(lambda m: m.dst)
MASK_MODES.register("learned-prd*learned-dst")(lambda m: m.predicted * m.dst)
MASK_MODES.register("learned-prd+learned-dst")(lambda m: np.clip(m.predicted + m.dst, 0, 1))
# DFL's modes 6-9: the segmenter's masks, alone, multiplied, and multiplied with both learned masks
MASK_MODES.register("XSeg-prd")(lambda m: m.xseg("xseg_prd"))
MASK_MODES.register("XSeg-dst")(lambda m: m.xseg("xseg_dst"))
MASK_MODES.register("XSeg-prd*XSeg-dst")(lambda m: m.xseg("xseg_prd") * m.xseg("xseg_dst"))
MASK_MODES.register("learned-prd*learned-dst*XSeg-prd*XSeg-dst")(
    lambda m: m.predicted * m.dst * m.xseg("xseg_prd") * m.xseg("xseg_dst"))

#: which segmenter masks each XSeg mode reads: (of the predicted face, of the dst crop)
XSEG_NEEDS: dict[str, tuple[bool, bool]] = {
    "xseg-prd": (True, False), "xseg-dst": (False, True), "xseg-prd*xseg-dst": (True, True),
    "learned-prd*learned-dst*xseg-prd*xseg-dst": (True, True)}


def xseg_needs(mode: str) -> tuple[bool, bool]:
    """(needs XSeg-prd, needs XSeg-dst) for a mask mode: so the swap runs the segmenter only where it is read."""
    return XSEG_NEEDS.get(mode.lower(), (False, False))


def occluded_share(xseg_dst: np.ndarray, hull: np.ndarray) -> float:
    """The part of the face (its landmark hull) that the segmenter does not call face: something covers it
    (a hand, a microphone, hair), so the swapped face is cut there and the frame is worth a look."""
    area = float(hull.sum())
    if area <= 0:
        return 0.0
    return float(np.clip(1.0 - float((xseg_dst * hull).sum()) / area, 0.0, 1.0))


def face_mask(mode: str, inputs: MaskInputs) -> np.ndarray:
    """The R x R working mask of `mode`, with values under 1/255 set to 0 (they are noise)."""
    mask = np.clip(MASK_MODES.get(mode)(inputs), 0, 1).astype(np.float32)
    mask[mask < NOISE] = 0
    return mask


def process_subres(mask: np.ndarray, resolution: int, erode: int, blur: int) -> np.ndarray:
    """Erode (or dilate, erode < 0) and blur the 4R mask on a zero pad of R, then fade it to zero inside the crop."""
    r = resolution
    out = np.pad(mask, r)
    if erode > 0:
        out = cv2.erode(out, cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (erode, erode)))
    elif erode < 0:
        out = cv2.dilate(out, cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (-erode, -erode)))
    clip = r + blur // 2  # half the blur inside the crop, so the blur reaches zero at its edge
    out[:clip], out[-clip:], out[:, :clip], out[:, -clip:] = 0, 0, 0, 0
    if blur > 0:
        k = blur + (1 - blur % 2)
        out = cv2.GaussianBlur(out, (k, k), 0)
    return np.clip(out[r:-r, r:-r], 0, 1)


def big_enough(frame_mask: np.ndarray, min_side: int = 4) -> bool:
    """DFL's skip rule: some level i/10 (i = 1..9) of the frame mask spans at least `min_side` px on both axes."""
    for i in range(1, 10):
        ys, xs = np.nonzero(frame_mask > i / 10)
        if ys.size and min(xs.max() - xs.min(), ys.max() - ys.min()) >= min_side:
            return True
    return False


def seamless_mask(frame_mask: np.ndarray) -> np.ndarray | None:
    """The binary source mask of cv2.seamlessClone: the frame mask cut at the first level i/10 that holds pixels."""
    for i in range(1, 10):
        above = frame_mask > i / 10
        if above.any():
            return above.astype(np.uint8) * 255
    return None
