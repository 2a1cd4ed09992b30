"""`loratrain face extract`: detect, landmark and align every face of an image folder or a video."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import cv2
import numpy as np

from dataset_tools.images import ImageReadError, list_images, open_image, to_rgb_on_white
from dataset_tools.video import read_video
from loratrain.common.config import ConfigError
from loratrain.common.progress import Reporter, StopFlag

from ..faceset import make_meta, save_face
from ..landmarks import align_face, transform_points
from .config import VIDEO_EXTENSIONS, ExtractConfig
from .plugins import DETECTORS, LANDMARKERS



@dataclass
class ExtractResult:
    frames: int = 0
    faces: list[str] = field(default_factory=list)
    no_face: list[str] = field(default_factory=list)
    unreadable: list[str] = field(default_factory=list)


def _frames(cfg: ExtractConfig, result: ExtractResult) -> tuple[int, Iterator[tuple[str, np.ndarray | None]]]:
    """(count estimate, iterator of (source name, RGB frame or None when unreadable))."""
    src = Path(cfg.input)
    if src.is_file() and src.suffix.lower() in VIDEO_EXTENSIONS:
        clip = read_video(src, cfg.fps)
        return clip.estimated_frames, ((f"{src.name}#{i:06d}", rgb) for i, rgb in enumerate(clip.frames))
    if src.is_file():
        paths = [src]
    elif src.is_dir():
        paths = list_images(src)
    else:
        raise FileNotFoundError(f"input not found: {src}")

    def images() -> Iterator[tuple[str, np.ndarray | None]]:
        for p in paths:
            try:
                with open_image(p) as img:
                    yield str(p), np.asarray(to_rgb_on_white(img))
            except ImageReadError as e:
                result.unreadable.append(str(e))
                yield str(p), None

    return len(paths), images()


def extract_faces(cfg: ExtractConfig, reporter: Reporter, stop: StopFlag | None = None) -> ExtractResult:
    out = Path(cfg.output_dir)
    if out.is_dir() and any(out.iterdir()) and not cfg.overwrite:
        raise ConfigError(f"{out} is not empty; pass --overwrite or choose another --output_dir")
    detect = DETECTORS.get(cfg.detector)(upsample=cfg.upsample, model_path=cfg.detector_model)
    landmark = LANDMARKERS.get(cfg.landmarker)(model_path=cfg.landmarker_model)
    result = ExtractResult()
    total, frames = _frames(cfg, result)
    reporter.start(total, "extracting faces", unit="frame")
    try:
        for name, rgb in frames:
            reporter.advance()
            if rgb is None:
                continue
            result.frames += 1
            boxes = [b for b in detect(rgb) if min(b[2] - b[0], b[3] - b[1]) >= cfg.min_face and b[4] >= cfg.min_score]
            boxes.sort(key=lambda b: -(b[2] - b[0]) * (b[3] - b[1]))
            if cfg.max_faces:
                boxes = boxes[:cfg.max_faces]
            if not boxes:
                result.no_face.append(name)
            bgr = cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR)
            for k, box in enumerate(boxes):
                lm = landmark(rgb, box[:4])
                face, mat = align_face(bgr, lm, cfg.image_size, cfg.face_type)
                meta = make_meta(cfg.face_type, transform_points(lm, mat), name, box[:4], lm, mat)
                base, _, frame_no = name.partition("#")
                stem = Path(base).stem + (f"_{frame_no}" if frame_no else "")
                target = out / f"{stem}_{k}.{cfg.format}"
                n = 1
                while target.exists():  # a.jpg and a.png, or a second run with --overwrite: never replace a face
                    target, n = out / f"{stem}_{k}.{n}.{cfg.format}", n + 1
                result.faces.append(str(save_face(target, face, meta, cfg.jpeg_quality)))
            if stop is not None and stop.is_set():
                break
    finally:
        reporter.done("")
    return result
