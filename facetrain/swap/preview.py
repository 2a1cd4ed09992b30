"""One frame through the whole swap, for the UI's interactive preview (DFL's interactive merger): the same
options, the same functions, no smoothing (a single frame has no history)."""
from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import numpy as np

from .compose import MergeOptions, merge_face, prepare
from .config import SwapConfig
from .label import draw_mark
from .media import open_source
from .predict import Predictor, load_predictor


@lru_cache(maxsize=2)
def _predictor(path: str, stamp: int, device: str, morph: float) -> Predictor:
    return load_predictor(path, device, morph)


def preview_frame(cfg: SwapConfig, index: int) -> tuple[np.ndarray, np.ndarray, int]:
    """(the frame, the swapped and labelled frame, faces swapped) as RGB uint8, for frame `index` of the input."""
    from .run import FaceFinder, _model_checks

    source = open_source(cfg.input, cfg.fps)
    index = int(np.clip(index, 0, max(source.count - 1, 0)))
    got = next(iter(source.frames(index, index + 1)), None)
    if got is None:  # a video's frame count is an estimate: its last frames may not exist
        got = next(iter(source.frames(0, 1)))
    _, rgb = got
    predictor = _predictor(str(cfg.model), Path(cfg.model).stat().st_mtime_ns, cfg.device, cfg.morph_value)
    face_type = _model_checks(cfg, predictor)
    frame = rgb[..., ::-1].astype(np.float32) / 255
    opts, rng, done = MergeOptions.of(cfg), np.random.default_rng(0), 0
    for lm in FaceFinder(cfg, source)(index, rgb):
        crop = prepare(frame, lm, predictor.resolution, face_type)
        pred = [a[0] for a in predictor.predict(crop.dst[None])]
        merged = merge_face(frame, crop, (pred[0], pred[1], pred[2]), opts, rng)
        if merged is not None and cfg.mode != "raw-predict":
            frame, done = merged[0], done + 1
    bgr = (np.clip(frame, 0, 1) * 255 + 0.5).astype(np.uint8)
    if cfg.visible_mark:
        draw_mark(bgr)
    return rgb, np.ascontiguousarray(bgr[..., ::-1]), done
