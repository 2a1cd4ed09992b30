"""XSeg training samples: the labelled faces, their polygon masks, and the augmentations that make a segmenter
generalise from a few dozen labels (docs/face-swap.md#xseg-training).

Image and mask of one sample share every geometric change (grid warp, rotation, scale, shift, flip), so the
label stays on the pixels it describes. Colour and blur change only the image. Occluders are pieces of other
labelled faces pasted over the face, with the target mask cleared under them: that is what teaches the
segmenter to leave hands, hair and microphones out of the face, which no amount of clean faces would.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from ..augment import apply_warp, random_hsv, warp_params
from ..faceset import FaceMeta, list_faces, load_face, read_meta
from ..landmarks import face_matrix
from .polys import face_polys, is_labelled, polys_mask


@dataclass
class XSegAugment:
    warp: bool = True
    flip: bool = True
    color: bool = True
    blur: bool = True
    occluders: bool = True


def same_type(meta: FaceMeta, face_type: str) -> bool:
    return not face_type or meta.face_type == face_type


def crop_face(img: np.ndarray, meta: FaceMeta, resolution: int, face_type: str) -> np.ndarray:
    """The stored face (image or mask) at the segmenter's crop: a resize when the face already has the
    segmenter's face type, else DFL's re-crop from the landmarks."""
    if same_type(meta, face_type):
        interp = cv2.INTER_AREA if img.shape[0] > resolution else cv2.INTER_LINEAR
        return cv2.resize(img, (resolution, resolution), interpolation=interp)
    mat = face_matrix(meta.landmarks_array(), resolution, face_type)
    return cv2.warpAffine(img, mat, (resolution, resolution), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT)


def uncrop_mask(mask: np.ndarray, meta: FaceMeta, side: int, face_type: str) -> np.ndarray:
    """A crop-space mask back to the stored face's `side` x `side` pixels (what `face xseg apply` stores)."""
    if same_type(meta, face_type):
        return cv2.resize(mask, (side, side), interpolation=cv2.INTER_LINEAR)
    mat = face_matrix(meta.landmarks_array(), mask.shape[0], face_type)
    return cv2.warpAffine(mask, mat, (side, side), flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP,
                          borderMode=cv2.BORDER_CONSTANT)


def labelled_faces(*folders: str | Path) -> tuple[list[Path], list[Path]]:
    """(labelled, unlabelled) faces over the given facesets, in name order per folder."""
    labelled, other = [], []
    for folder in folders:
        if not folder:
            continue
        for p in list_faces(folder):
            (labelled if is_labelled(read_meta(p)) else other).append(p)
    return labelled, other


class XSegSamples:
    """Labelled faces decoded once into memory at the segmenter's crop (uint8: 192 KB a face at 256 px), so a step
    costs augmentation only; a labelled set is tens to a few thousand faces."""

    def __init__(self, paths: list[Path], resolution: int, face_type: str, augment: XSegAugment) -> None:
        self.resolution, self.augment = resolution, augment
        self.images, self.masks, self.paths = [], [], list(paths)
        for p in paths:
            img, meta = load_face(p)
            target = polys_mask(face_polys(meta, str(p)), img.shape[0])
            self.images.append(crop_face(img, meta, resolution, face_type))
            self.masks.append((crop_face(target, meta, resolution, face_type) > 0.5).astype(np.uint8))

    def __len__(self) -> int:
        return len(self.images)

    def clean(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """(BGR float 0..1, mask float 0..1) without augmentation: held-out IoU and previews."""
        return self.images[index].astype(np.float32) / 255, self.masks[index].astype(np.float32)

    def sample(self, index: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        img, mask = self.clean(index)
        a, r = self.augment, self.resolution
        if a.occluders and len(self) > 1 and rng.random() < 0.5:
            img, mask = self._occlude(img, mask, index, rng)
        p = warp_params(r, rng, flip=a.flip, rotation=(-20, 20), scale=(-0.2, 0.2), shift=(-0.1, 0.1)) \
            if (a.warp or a.flip) else None
        if p is not None:
            if not a.warp:  # flips only
                p.affine = np.array([[1, 0, 0], [0, 1, 0]], np.float64)
            img = apply_warp(img, p, a.warp)
            mask = apply_warp(mask, p, a.warp, is_mask=True)
        if a.color:
            img = random_hsv(img, 0.15, rng)
            c = rng.uniform(0.7, 1.3)
            img = np.clip((img - img.mean()) * c + img.mean() + rng.uniform(-0.1, 0.1), 0, 1)
        if a.blur and rng.random() < 0.25:
            img = _blur(img, rng)
        return np.ascontiguousarray(img, np.float32), np.ascontiguousarray(mask > 0.5, np.float32)

    def _occlude(self, img: np.ndarray, mask: np.ndarray, index: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        """Paste a shape cut from another labelled face (shifted, scaled) over this one; the target loses it."""
        r = self.resolution
        other = int(rng.integers(len(self) - 1))
        other += other >= index
        src = self.images[other].astype(np.float32) / 255
        shape = np.zeros((r, r), np.float32)
        kind = rng.integers(3)
        cx, cy = rng.uniform(0.15, 0.85, 2) * r
        if kind == 0:  # a disc
            cv2.circle(shape, (int(cx), int(cy)), int(rng.uniform(0.08, 0.25) * r), 1.0, -1)
        elif kind == 1:  # a bar at any angle
            w, h = rng.uniform(0.1, 0.3) * r, rng.uniform(0.4, 1.2) * r
            box = cv2.boxPoints(((cx, cy), (w, h), rng.uniform(0, 180))).astype(np.int32)
            cv2.fillPoly(shape, [box], 1.0)
        else:  # the other face's own mask, moved: a face-shaped occluder (another head in front)
            m = self.masks[other].astype(np.float32)
            mat = cv2.getRotationMatrix2D((r / 2, r / 2), rng.uniform(-30, 30), rng.uniform(0.4, 0.8))
            mat[:, 2] += (cx - r / 2, cy - r / 2)
            shape = cv2.warpAffine(m, mat, (r, r))
            src = cv2.warpAffine(src, mat, (r, r), borderMode=cv2.BORDER_REFLECT)
        shape = (shape > 0.5).astype(np.float32)
        out = img * (1 - shape[..., None]) + src * shape[..., None]
        return out, mask * (1 - shape)


def _blur(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    if rng.random() < 0.5:
        k = int(rng.integers(1, 4)) * 2 + 1
        return cv2.GaussianBlur(img, (k, k), 0)
    k = int(rng.integers(3, 9))
    kernel = np.zeros((k, k), np.float32)
    kernel[k // 2] = 1.0 / k
    kernel = cv2.warpAffine(kernel, cv2.getRotationMatrix2D((k / 2 - 0.5, k / 2 - 0.5), rng.uniform(0, 180), 1.0), (k, k))
    return cv2.filter2D(img, -1, kernel / max(kernel.sum(), 1e-6))


def iou(pred: np.ndarray, truth: np.ndarray) -> float:
    """Intersection over union of two masks cut at 0.5; two empty masks agree (1.0)."""
    a, b = pred > 0.5, truth > 0.5
    union = np.logical_or(a, b).sum()
    return float(np.logical_and(a, b).sum() / union) if union else 1.0
