"""One frame through the whole swap, for the UI's interactive preview (DFL's interactive merger): the very
function the swap job uses per frame (`frame.py`), with no smoothing (a single frame has no history). The
preview can also return the merge mask, so a user can see what each mask mode keeps before a whole swap."""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np

from .compose import MergeOptions
from .config import SwapConfig
from .frame import FaceFinder, check_model, open_segmenter, swap_frame
from .media import open_source
from .predict import Predictor, load_predictor


@lru_cache(maxsize=2)
def _predictor(path: str, stamp: int, device: str, morph: float) -> Predictor:
    return load_predictor(path, device, morph)


@lru_cache(maxsize=2)
def _segmenter(path: str, stamp: int, device: str) -> Any:
    from ..xseg.model import XSegPredictor

    return XSegPredictor(path, device)


def _cached_segmenter(path: str, device: str) -> Any:
    """The segmenter, loaded again only when its file changes (a preview per slider move must not reload it)."""
    return _segmenter(path, Path(path).stat().st_mtime_ns, device)


@dataclass
class Preview:
    original: np.ndarray        # the frame, RGB uint8
    output: np.ndarray          # what `face swap` writes for it, RGB uint8
    faces: int                  # faces swapped
    mask: np.ndarray            # the merge mask as grey uint8 (frame size; raw-predict: R x R)
    occluded: list[float]       # per face with --xseg_model: the share of the face XSeg-dst calls covered


def preview(cfg: SwapConfig, index: int) -> Preview:
    """Frame `index` of the input through the swap. The output is what `face swap` writes for that frame: the
    swapped, labelled frame, or in raw-predict mode the model's aligned prediction (R x R)."""
    source = open_source(cfg.input, cfg.fps)
    index = int(np.clip(index, 0, max(source.count - 1, 0)))
    got = next(iter(source.frames(index, index + 1)), None)
    if got is None:  # a video's frame count is an estimate: its last frames may not exist
        got = next(iter(source.frames(0, 1)))
    index, rgb = got
    if cfg.swapper:
        from .swapper_predict import cached_swapper

        predictor = cached_swapper(cfg)
    else:
        predictor = _predictor(str(cfg.model), Path(cfg.model).stat().st_mtime_ns, cfg.device, cfg.morph_value)
    face_type = check_model(cfg, predictor)
    segmenter = open_segmenter(cfg, _cached_segmenter)
    out = swap_frame(index, rgb, FaceFinder(cfg, source), predictor, face_type, MergeOptions.of(cfg), cfg.visible_mark,
                     segmenter=segmenter, with_mask=True)
    assert out.mask is not None  # asked for with with_mask
    mask = (np.clip(out.mask, 0, 1) * 255 + 0.5).astype(np.uint8)
    return Preview(rgb, np.ascontiguousarray(out.bgr[..., ::-1]), out.faces, mask, out.occluded)


def preview_frame(cfg: SwapConfig, index: int) -> tuple[np.ndarray, np.ndarray, int]:
    """(the frame, the swap's output for it, faces swapped) as RGB uint8, for frame `index` of the input."""
    got = preview(cfg, index)
    return got.original, got.output, got.faces
