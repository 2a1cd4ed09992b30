"""`loratrain face extract`: detect, landmark and align every face of an image folder or a video."""
from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np

from loratrain.core.errors import ConfigError
from loratrain.core.images import ImageReadError, list_images, open_image, to_rgb_on_white
from loratrain.core.jobs import JobResult, job
from loratrain.core.progress import Reporter, StopFlag
from loratrain.core.video import read_video

from ..faceset import make_meta, save_face
from ..landmarks import align_face, transform_points
from .config import VIDEO_EXTENSIONS, ExtractConfig
from .plugins import DETECTORS, LANDMARKERS, find_faces


@dataclass
class ExtractResult(JobResult):
    output_dir: str = ""
    frames: int = 0
    faces: list[str] = field(default_factory=list)
    no_face: list[str] = field(default_factory=list)
    unreadable: list[str] = field(default_factory=list)

    def summary(self) -> list[str]:
        lines = [f"{len(self.faces)} face(s) from {self.frames} frame(s) in {self.output_dir}; {len(self.no_face)} frame(s) "
                 f"without a face, {len(self.unreadable)} unreadable"]
        return lines + [f"  {line}" for line in self.unreadable[:10]]


class NoFaceError(ConfigError):
    """Not one face in the whole input: the user learns it now, not when training finds an empty faceset."""


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


@job
def run_face_extract(cfg: ExtractConfig, reporter: Reporter, stop: StopFlag) -> ExtractResult:
    """Detect, landmark and align every face of an image folder, an image or a video; each face written atomically.

    stop ends after the current frame. A run that finds no face at all is an error naming the input
    and the options that matter. Result: faces written, frames without a face, unreadable files.
    """
    out = cfg.faces_dir
    if out.is_dir() and any(out.iterdir()) and not cfg.overwrite:
        raise ConfigError(f"{out} is not empty; pass --overwrite or choose another --output_dir")
    detect = DETECTORS.get(cfg.detector)(upsample=cfg.upsample, model_path=cfg.detector_model)
    landmark = LANDMARKERS.get(cfg.landmarker)(model_path=cfg.landmarker_model)
    result = ExtractResult(output_dir=str(out))
    total, frames = _frames(cfg, result)
    reporter.start(total, "extracting faces", unit="frame")
    try:
        for name, rgb in frames:
            reporter.advance()
            if rgb is None:
                continue
            result.frames += 1
            found = find_faces(rgb, detect, landmark, cfg.min_face, cfg.min_score, cfg.max_faces)
            if not found:
                result.no_face.append(name)
            bgr = cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR)
            for k, (box, lm) in enumerate(found):
                face, mat = align_face(bgr, lm, cfg.image_size, cfg.face_type)
                meta = make_meta(cfg.face_type, transform_points(lm, mat), name, box[:4], lm, mat)
                base, _, frame_no = name.partition("#")
                stem = Path(base).stem + (f"_{frame_no}" if frame_no else "")
                target = out / f"{stem}_{k}.{cfg.format}"
                n = 1
                while target.exists():  # a.jpg and a.png, or a second run with --overwrite: never replace a face
                    target, n = out / f"{stem}_{k}.{n}.{cfg.format}", n + 1
                result.faces.append(str(save_face(target, face, meta, cfg.jpeg_quality)))
            if stop.is_set():
                result.stopped = True
                break
    finally:
        reporter.done("")
    if not result.faces and not result.stopped:
        what = f"any of the {result.frames} frame(s)" if result.frames else "the input (no readable image)"
        raise NoFaceError(f"{cfg.input}: no face found in {what}; try --upsample 2, a lower --min_score (now "
                          f"{cfg.min_score}) or --min_face (now {cfg.min_face}), or another --detector")
    return result
