"""One frame of a swap, the single path that both `loratrain face swap` and the UI's one-frame preview take.

A frame goes through three stages: find its faces and crop them (`find_crops`), predict the crops
(`predict_crops`), then merge, round and label (`compose_frame`). The swap job spreads the stages over
threads (the finder thread, batched prediction across frames in the caller, the writer thread); the preview
runs them back to back through `swap_frame`. Either way the pixels come from these functions, so a mode or an
option cannot mean one thing in the preview and another in the output (they once did: the preview showed
the unchanged frame in raw-predict mode while the job wrote the prediction).

Randomness (the sot / idt colour transfers) is seeded per frame from the frame's index, so a frame comes out
the same whether it is previewed alone, swapped in a whole run, or swapped again when a stopped run resumes.

With an XSeg segmenter (`--xseg_model`), prediction also runs it: on the dst crops (XSeg-dst, always, since the
occlusion report reads it) and on the predicted faces (XSeg-prd, only for the mask modes that use it), each
as one batch per prediction batch, so a resumed run segments exactly the same crops together again.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import cv2
import numpy as np

from loratrain.core.errors import ConfigError

from ..extract.plugins import DETECTORS, LANDMARKERS, find_faces, identity_encoder, identity_threshold
from ..extract.sort import reference_embedding
from ..faceset import list_faces, read_meta
from ..landmarks import transform_points
from .compose import FaceCrop, MergeOptions, crop_hull, merge_face, prepare
from .config import SwapConfig
from .label import draw_mark
from .masks import occluded_share, xseg_needs
from .media import Source
from .predict import Predictor
from .smooth import Smoother


class Prediction(NamedTuple):
    """One crop's prediction: the face in src's likeness, its mask and the dst mask (R x R x C), and the
    segmenter's R x R masks of the predicted face and of the crop when the swap runs one (else None)."""

    face: np.ndarray
    mask: np.ndarray
    dst_mask: np.ndarray
    xseg_prd: np.ndarray | None = None
    xseg_dst: np.ndarray | None = None


@dataclass
class Segmenter:
    """A swap's XSeg segmenter (N x S x S x 3 BGR 0..1 -> N x S x S masks) and which of its masks the swap reads."""

    masks: Callable[[np.ndarray], np.ndarray]
    on_prd: bool          # XSeg-prd: only the modes that read it
    on_dst: bool = True   # XSeg-dst: every swap with a segmenter (the occlusion report)


def open_segmenter(cfg: SwapConfig, load: Callable[[str, str], Callable[[np.ndarray], np.ndarray]] | None = None
                   ) -> Segmenter | None:
    """The segmenter of `--xseg_model` (None without one); `load(path, device)` lets the preview cache it.
    A wrong or damaged file is a named ConfigError here, before any frame is read."""
    if not cfg.xseg_model:
        return None
    from loratrain.core.devices import pick_device

    from ..xseg.model import XSegPredictor

    device = str(pick_device(cfg.device))
    masks = load(cfg.xseg_model, device) if load is not None else XSegPredictor(cfg.xseg_model, device)
    return Segmenter(masks, xseg_needs(cfg.mask_mode)[0])


class FaceFinder:
    """Landmarks of the faces to swap in one frame: from a dst faceset, or detected; identity-filtered."""

    def __init__(self, cfg: SwapConfig, source: Source, tools: list | None = None) -> None:
        """`tools`: [detector, landmarker] the run already built for these options (the swapper's source faces), or
        empty / None to build them here."""
        self.cfg, self.source = cfg, source
        self.table: dict[str, list[np.ndarray]] | None = None
        if cfg.dst_faceset:
            self.table = {}
            for p in list_faces(cfg.dst_faceset):
                meta = read_meta(p)
                file, sep, frame = meta.source_filename.partition("#")  # `clip.mp4#000012` for a video's frame
                self.table.setdefault(Path(file).name + sep + frame, []).append(np.asarray(meta.source_landmarks, np.float64))
        elif tools:
            self.detect, self.landmark = tools[0], tools[1]
        else:
            self.detect = DETECTORS.get(cfg.detector)(upsample=cfg.upsample, model_path=cfg.detector_model)
            self.landmark = LANDMARKERS.get(cfg.landmarker)(model_path=cfg.landmarker_model)
        self.reference = reference_embedding(cfg.reference, cfg.recognizer) if cfg.reference else None
        self.encoder = identity_encoder(cfg.recognizer) if cfg.reference else None
        self.threshold = identity_threshold(self.encoder, cfg.identity_threshold) if self.encoder else 0.0
        self.other_people = 0

    def __call__(self, index: int, rgb: np.ndarray) -> list[np.ndarray]:
        cfg = self.cfg
        if self.table is not None:  # largest first, as detection gives them
            faces = sorted(self.table.get(self.source.source_name(index), []), key=lambda lm: -np.ptp(lm[:, 0]) * np.ptp(lm[:, 1]))
        else:
            faces = [lm for _, lm in find_faces(rgb, self.detect, self.landmark, cfg.min_face, cfg.min_score)]
        if self.reference is not None:
            kept = [lm for lm in faces if self.encoder.distance(self.encoder(rgb, lm), self.reference) <= self.threshold]
            self.other_people += len(faces) - len(kept)
            faces = kept
        return faces[:cfg.max_faces] if cfg.max_faces else faces


def check_model(cfg: SwapConfig, predictor: Predictor) -> str:
    """The face type to crop with, after checking the model against a dst faceset (named errors, before any work)."""
    face_type = cfg.face_type or predictor.face_type or "wf"
    if cfg.dst_faceset:
        faces = list_faces(cfg.dst_faceset)
        if not faces:
            raise ConfigError(f"dst_faceset {cfg.dst_faceset}: no aligned faces")
        meta = read_meta(faces[0])
        if predictor.face_type and meta.face_type != predictor.face_type and not cfg.face_type:
            raise ConfigError(f"dst_faceset {cfg.dst_faceset} holds face type {meta.face_type!r}, the model {predictor.name} was "
                              f"trained on {predictor.face_type!r}: pass --face_type to crop anyway, or use the faceset it was trained with")
        side = cv2.imread(str(faces[0])).shape[0]
        if side < predictor.resolution:
            raise ConfigError(f"dst_faceset {cfg.dst_faceset}: faces are {side} px, the model {predictor.name} works at "
                              f"{predictor.resolution} px; extract at --image_size {predictor.resolution} or more")
    return face_type


def output_size(mode: str, frame_size: tuple[int, int], resolution: int) -> tuple[int, int]:
    """(w, h) of every output frame: raw-predict writes the model's aligned prediction (DFL), the rest the frame."""
    return (resolution, resolution) if mode == "raw-predict" else frame_size


def to_work(rgb: np.ndarray) -> np.ndarray:
    """The merger's working frame: float32 BGR 0..1."""
    return rgb[..., ::-1].astype(np.float32) / 255


def find_crops(frame: np.ndarray, rgb: np.ndarray, index: int, finder: FaceFinder, resolution: int, face_type: str,
               smoother: Smoother | None = None) -> list[FaceCrop]:
    """The aligned crops of the faces to swap. `smoother` (a run's tracker) smooths the landmarks and gives each
    crop its motion; None (the preview: one frame has no history) takes the landmarks as found, motionless."""
    faces = finder(index, rgb)
    tracked = smoother(index, faces) if smoother is not None else [(lm, (0.0, 0.0)) for lm in faces]
    crops = []
    for lm, motion in tracked:
        crop = prepare(frame, lm, resolution, face_type)
        crop.motion = motion
        crops.append(crop)
    return crops


def predict_crops(predictor: Predictor, crops: list[FaceCrop], segmenter: Segmenter | None = None) -> list[Prediction]:
    """The prediction of every crop, as one batch (a run batches several frames the same way); with a segmenter,
    its masks of the predicted faces and of the crops, one batch each, where the swap reads them."""
    if not crops:
        return []
    dst = np.stack([c.dst for c in crops])
    if predictor.needs_landmarks:  # a swapper aligns each crop on its own template from the face's points
        pred = predictor.predict(dst, [transform_points(c.landmarks, c.mat) for c in crops])
    else:
        pred = predictor.predict(dst)
    none: list[np.ndarray | None] = [None] * len(crops)
    on_prd = segmenter is not None and segmenter.on_prd
    on_dst = segmenter is not None and segmenter.on_dst
    xseg_prd = list(segmenter.masks(np.clip(np.asarray(pred[0], np.float32), 0, 1))) if on_prd else none
    xseg_dst = list(segmenter.masks(dst)) if on_dst else none
    return [Prediction(pred[0][k], pred[1][k], pred[2][k], xseg_prd[k], xseg_dst[k]) for k in range(len(crops))]


@dataclass
class FrameOut:
    bgr: np.ndarray   # the output frame, uint8 BGR, labelled
    faces: int        # faces merged into it
    skipped: int      # faces whose mask was too small to paste
    occluded: list[float] = field(default_factory=list)  # per face: share of its landmark hull XSeg-dst calls not face
    mask: np.ndarray | None = None  # with_mask: the merge mask (frame size; raw-predict: R x R), float 0..1


def compose_frame(index: int, frame: np.ndarray, crops: list[FaceCrop], predicted: list[Prediction], opts: MergeOptions,
                  visible_mark: bool, resolution: int, with_mask: bool = False) -> FrameOut:
    """Merge every predicted face into `frame` (float32 BGR 0..1, not modified), one after another with its mask,
    then round to uint8 and draw the visible mark. raw-predict gives the first (largest) face's aligned prediction
    instead of a frame, black when the frame has no face, so every output frame has the same size. With XSeg-dst
    masks, each face's occluded share is measured too; `with_mask` keeps the masks (the preview shows them)."""
    rng = np.random.default_rng(index)
    faces = skipped = 0
    out = frame
    shape = (resolution, resolution) if opts.mode == "raw-predict" else frame.shape[:2]
    mask = np.zeros(shape, np.float32) if with_mask else None
    occluded = [occluded_share(p.xseg_dst, crop_hull(c, resolution)) for c, p in zip(crops, predicted) if p.xseg_dst is not None]
    if opts.mode == "raw-predict":
        out = np.zeros((resolution, resolution, 3), np.float32)
        if crops:
            pred = predicted[0]
            out, work = merge_face(frame, crops[0], pred[:3], opts, rng, pred.xseg_prd, pred.xseg_dst)
            faces = 1
            if mask is not None:
                mask = work[..., 0]
    else:
        for crop, pred in zip(crops, predicted):
            merged = merge_face(out, crop, pred[:3], opts, rng, pred.xseg_prd, pred.xseg_dst)
            if merged is None:
                skipped += 1
                continue
            out, faces = merged[0], faces + 1
            if mask is not None:
                np.maximum(mask, merged[1][..., 0], out=mask)
    bgr = np.ascontiguousarray((np.clip(out, 0, 1) * 255 + 0.5).astype(np.uint8))  # a prediction can be a strided view
    if visible_mark:
        draw_mark(bgr)
    return FrameOut(bgr, faces, skipped, occluded, mask)


def swap_frame(index: int, rgb: np.ndarray, finder: FaceFinder, predictor: Predictor, face_type: str, opts: MergeOptions,
               visible_mark: bool, smoother: Smoother | None = None, segmenter: Segmenter | None = None,
               with_mask: bool = False) -> FrameOut:
    """Frame `index` (RGB uint8) through the whole swap: the three stages back to back."""
    frame = to_work(rgb)
    crops = find_crops(frame, rgb, index, finder, predictor.resolution, face_type, smoother)
    return compose_frame(index, frame, crops, predict_crops(predictor, crops, segmenter), opts, visible_mark,
                         predictor.resolution, with_mask)
