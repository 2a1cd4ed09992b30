"""Training samples: re-crop to the model's face type, colour transfer, HSV, warp + affine, masks.

Each sample gives the warped network input, the unwarped target, the face hull mask and the
eyes+mouth mask, all sharing one affine/flip (docs/face-model.md#augmentation). Faces are decoded lazily in DataLoader
workers; yaw for uniform sampling comes from the metadata alone.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

from ..augment import apply_warp, random_hsv, warp_params
from ..color import COLOR_TRANSFERS, color_transfer
from ..faceset import FaceMeta, list_faces, load_face, read_meta
from ..landmarks import estimate_yaw_pitch, eyes_mouth_mask, face_matrix, hull_mask, transform_points

#: what ct_mode `random` draws from, per sample: every registered mode
CT_RANDOM_MODES = tuple(COLOR_TRANSFERS.names())


@dataclass
class AugmentOptions:
    random_warp: bool = True
    flip: bool = False
    hsv_power: float = 0.0
    ct_mode: str = "none"
    ct_power: float = 1.0  # the recoloured sample mixed with the original (0 = no transfer, 1 = the mode's output)


def crop_to_model(img: np.ndarray, meta: FaceMeta, resolution: int, face_type: str) -> tuple[np.ndarray, np.ndarray]:
    """(BGR float 0-1 image, landmarks) at the model's resolution and face type."""
    lm = meta.landmarks_array()
    if meta.face_type == face_type:
        scale = resolution / img.shape[0]
        out = cv2.resize(img, (resolution, resolution), interpolation=cv2.INTER_AREA if scale < 1 else cv2.INTER_CUBIC)
        lm = lm * scale
    else:
        mat = face_matrix(lm, resolution, face_type)
        out = cv2.warpAffine(img, mat, (resolution, resolution), flags=cv2.INTER_CUBIC)
        lm = transform_points(lm, mat)
    return out.astype(np.float32) / 255.0, lm


def training_mask(meta: FaceMeta, side: int, lm: np.ndarray, resolution: int, face_type: str) -> np.ndarray:
    """The training mask at the model's crop: the face's XSeg mask when it has one (DFL trains on XSeg masks
    when they exist), else the landmark hull. `side` is the stored face image's size, `lm` the model-crop
    landmarks."""
    xseg = meta.xseg_mask(resolution if meta.face_type == face_type else side)
    if xseg is None:
        return hull_mask((resolution, resolution), lm, meta.eyebrows_expand_mod)
    if meta.face_type == face_type:
        return xseg
    mat = face_matrix(meta.landmarks_array(), resolution, face_type)
    return cv2.warpAffine(xseg, mat, (resolution, resolution), flags=cv2.INTER_LINEAR)


class FaceSamples(Dataset):
    """One faceset; `ct_reference` (the dst set) supplies colours when ct_mode is on."""

    def __init__(self, folder: str | Path, resolution: int, face_type: str, options: AugmentOptions,
                 ct_reference: "FaceSamples | None" = None) -> None:
        self.paths = list_faces(folder)
        if not self.paths:
            raise FileNotFoundError(f"{folder}: no aligned faces (.jpg/.png from `loratrain face extract`)")
        self.metas = [read_meta(p) for p in self.paths]
        self.resolution, self.face_type, self.options = resolution, face_type, options
        self.ct_reference = ct_reference
        self.yaws = np.array([estimate_yaw_pitch(m.landmarks_array())[0] for m in self.metas])

    def __len__(self) -> int:
        return len(self.paths)

    def face(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        img, meta = load_face(self.paths[index])
        return crop_to_model(img, meta, self.resolution, self.face_type)

    def face_and_mask(self, index: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        img, meta = load_face(self.paths[index])
        face, lm = crop_to_model(img, meta, self.resolution, self.face_type)
        return face, lm, training_mask(meta, img.shape[0], lm, self.resolution, self.face_type)

    def sample(self, index: int, rng: np.random.Generator, augment: bool = True) -> dict[str, np.ndarray]:
        img, lm, mask = self.face_and_mask(index)
        r = self.resolution
        mask = mask[..., None]
        em = eyes_mouth_mask((r, r), lm)[..., None]
        o = self.options
        if o.ct_mode != "none" and self.ct_reference is not None and augment and o.ct_power > 0:
            img = self._recolour(img, rng)
        if not augment:
            return {"input": img, "target": img, "mask": mask, "em": em, "landmarks": lm}
        inp = random_hsv(img, o.hsv_power, rng)
        p = warp_params(r, rng, flip=o.flip)
        return {"input": np.clip(apply_warp(inp, p, o.random_warp), 0, 1), "target": np.clip(apply_warp(img, p, False), 0, 1),
                "mask": np.clip(apply_warp(mask, p, False, is_mask=True), 0, 1),
                "em": np.clip(apply_warp(em, p, False, is_mask=True), 0, 1)}

    def _recolour(self, img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """Colour transfer toward a random reference face at `ct_power`; mode `random` draws one of the modes
        uniformly per sample from the sample's own seeded generator (docs/face-model.md#finer-control)."""
        o = self.options
        ref, _ = self.ct_reference.face(int(rng.integers(len(self.ct_reference))))
        mode = CT_RANDOM_MODES[int(rng.integers(len(CT_RANDOM_MODES)))] if o.ct_mode == "random" else o.ct_mode
        moved = color_transfer(mode, img, ref, rng=rng)
        if o.ct_power >= 1:
            return moved
        return (img + np.float32(o.ct_power) * (moved - img)).astype(np.float32)

    def subset(self, indices: list[int]) -> "FaceSamples":
        """The same faceset restricted to `indices` (held-out validation faces are split off this way, so no
        sampler can draw them: a sampler only knows the indices of the samples it is given)."""
        out = object.__new__(type(self))
        out.__dict__.update(self.__dict__)
        out.paths = [self.paths[i] for i in indices]
        out.metas = [self.metas[i] for i in indices]
        out.yaws = self.yaws[np.asarray(indices, dtype=np.int64)]
        return out

    def __getitem__(self, key: tuple[int, int]) -> dict[str, torch.Tensor]:
        index, seed = key
        s = self.sample(index, np.random.default_rng(seed))
        out = {k: torch.from_numpy(np.ascontiguousarray(v.transpose(2, 0, 1))) for k, v in s.items() if k != "landmarks"}
        out["index"] = torch.tensor(index)  # which face: per-face losses are booked by it
        return out


def xseg_coverage(samples: FaceSamples, name: str) -> str:
    """How many faces of a faceset train on an XSeg mask: the rest fall back to the landmark hull (training_mask),
    which a user who labelled or applied masks should hear about before hours of training, not after."""
    total = len(samples.metas)
    n = sum(bool(m.extra.get("xseg_mask")) for m in samples.metas)
    rest = "" if n == total else " (the rest train on the landmark hull)" if n else " (all train on the landmark hull)"
    return f"{name} faceset: {n} of {total} faces have XSeg masks{rest}"


class RandomFaceSampler(Sampler):
    """Endless (index, seed) pairs; with uniform_yaw, the 128 yaw bins are drawn evenly first."""

    def __init__(self, samples: FaceSamples, uniform_yaw: bool, seed: int) -> None:
        self.n, self.seed = len(samples), seed
        self.bins: list[np.ndarray] | None = None
        if uniform_yaw:
            edges = np.linspace(-1.2, 1.2, 129)
            which = np.clip(np.digitize(samples.yaws, edges) - 1, 0, 127)
            self.bins = [np.flatnonzero(which == b) for b in range(128) if (which == b).any()]

    def __iter__(self):  # noqa: ANN204
        rng = np.random.default_rng(self.seed)
        while True:
            if self.bins is not None:
                group = self.bins[int(rng.integers(len(self.bins)))]
                index = int(group[int(rng.integers(len(group)))])
            else:
                index = int(rng.integers(self.n))
            yield index, int(rng.integers(2 ** 31))


def loader(samples: FaceSamples, batch_size: int, uniform_yaw: bool, workers: int, seed: int,
           sampler: Sampler | None = None) -> torch.utils.data.DataLoader:
    """`sampler` replaces the plain one (the hard-sample sampler of train/diagnosis.py)."""
    sampler = sampler if sampler is not None else RandomFaceSampler(samples, uniform_yaw, seed)
    return torch.utils.data.DataLoader(samples, batch_size=batch_size, sampler=sampler,
                                       num_workers=workers, persistent_workers=workers > 0, drop_last=True,
                                       prefetch_factor=4 if workers > 0 else None)
