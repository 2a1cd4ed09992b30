"""One frame through the whole swap, for the UI's interactive preview (DFL's interactive merger): the very
function the swap job uses per frame (`frame.py`), with no smoothing (a single frame has no history)."""
from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import numpy as np

from .compose import MergeOptions
from .config import SwapConfig
from .frame import FaceFinder, check_model, swap_frame
from .media import open_source
from .predict import Predictor, load_predictor


@lru_cache(maxsize=2)
def _predictor(path: str, stamp: int, device: str, morph: float) -> Predictor:
    return load_predictor(path, device, morph)


def preview_frame(cfg: SwapConfig, index: int) -> tuple[np.ndarray, np.ndarray, int]:
    """(the frame, the swap's output for it, faces swapped) as RGB uint8, for frame `index` of the input. The
    output is what `face swap` writes for that frame: the swapped, labelled frame, or in raw-predict mode the
    model's aligned prediction (R x R)."""
    source = open_source(cfg.input, cfg.fps)
    index = int(np.clip(index, 0, max(source.count - 1, 0)))
    got = next(iter(source.frames(index, index + 1)), None)
    if got is None:  # a video's frame count is an estimate: its last frames may not exist
        got = next(iter(source.frames(0, 1)))
    index, rgb = got
    predictor = _predictor(str(cfg.model), Path(cfg.model).stat().st_mtime_ns, cfg.device, cfg.morph_value)
    face_type = check_model(cfg, predictor)
    out = swap_frame(index, rgb, FaceFinder(cfg, source), predictor, face_type, MergeOptions.of(cfg), cfg.visible_mark)
    return rgb, np.ascontiguousarray(out.bgr[..., ::-1]), out.faces
