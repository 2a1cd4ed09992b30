"""`loratrain face extract`: detect, landmark and align every face of an image folder or a video."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import cv2
import numpy as np

from dataset_tools.images import ImageReadError, list_images, open_image, to_rgb_on_white
from loratrain.common.config import CommandConfig, ConfigError, opt
from loratrain.common.progress import Reporter, StopFlag

from ..faceset import make_meta, save_face
from ..landmarks import FACE_TYPES, align_face, transform_points
from .plugins import DETECTORS, LANDMARKERS

VIDEO_EXTENSIONS = {".mp4", ".mkv", ".mov", ".avi", ".webm", ".m4v"}


@dataclass
class ExtractConfig(CommandConfig):
    input: str = opt("", "folder of images, or a video file", metadata={"positional": True})
    output_dir: str = opt("", "where aligned faces are written (default: <input>_aligned)")
    detector: str = opt("dlib", "face detector plugin: dlib (HOG), dlib_cnn, or scrfd with --detector_model")
    detector_model: str = opt("", "ONNX file for an ONNX detector (SCRFD)")
    landmarker: str = opt("dlib68", "landmark plugin: dlib68, or 2dfan4 with --landmarker_model")
    landmarker_model: str = opt("", "ONNX file for an ONNX landmarker")
    face_type: str = opt("wf", "crop: h, mf, f, wf (whole face) or head", metadata={"choices": list(FACE_TYPES)})
    image_size: int = opt(512, "side of the aligned face images")
    max_faces: int = opt(0, "keep at most this many faces per frame, largest first (0 = all)")
    min_face: int = opt(40, "ignore detections smaller than this many pixels")
    min_score: float = opt(0.5, "ignore detections scoring below this (dlib HOG margins: false positives score ~0.1)")
    upsample: int = opt(1, "detector upsampling (finds smaller faces, slower)")
    fps: float = opt(0.0, "video: frames per second to extract (0 = every frame)")
    format: str = opt("jpg", "jpg or png", metadata={"choices": ["jpg", "png"]})
    jpeg_quality: int = opt(95, "JPEG quality of the faces")
    overwrite: bool = opt(False, "add to a folder that already has faces (existing faces are never replaced)")
    quiet: bool = opt(False, "no progress bar")

    def validate(self) -> None:
        if not self.input:
            raise ConfigError("input is required")
        if self.detector not in DETECTORS:
            raise ConfigError(f"unknown detector {self.detector!r}; choose one of {', '.join(DETECTORS.names())}")
        if self.landmarker not in LANDMARKERS:
            raise ConfigError(f"unknown landmarker {self.landmarker!r}; choose one of {', '.join(LANDMARKERS.names())}")
        if self.image_size < 32:
            raise ConfigError("image_size must be at least 32")
        if not self.output_dir:
            p = Path(self.input)
            self.output_dir = str(p.with_name((p.stem if p.is_file() else p.name) + "_aligned"))


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
        import imageio_ffmpeg

        params = ["-vf", f"fps={cfg.fps}"] if cfg.fps else []
        try:
            reader = imageio_ffmpeg.read_frames(str(src), output_params=params)
            meta = next(reader)
        except (RuntimeError, OSError, StopIteration) as e:
            raise ValueError(f"{src}: ffmpeg cannot read it as a video ({e})") from None
        w, h = meta["size"]
        total = int((meta.get("duration") or 0) * (cfg.fps or meta.get("fps") or 1))

        def video() -> Iterator[tuple[str, np.ndarray | None]]:
            try:
                for i, raw in enumerate(reader):
                    yield f"{src.name}#{i:06d}", np.frombuffer(raw, np.uint8).reshape(h, w, 3)
            finally:
                reader.close()

        return total, video()
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
