"""Options of `loratrain face extract` and `face sort`; no OpenCV or dlib here, so the CLI parser stays light."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from loratrain.common.config import CommandConfig, ConfigError, opt

from ..face_types import FACE_TYPES
from .plugins import DETECTORS, LANDMARKERS

VIDEO_EXTENSIONS = {".mp4", ".mkv", ".mov", ".avi", ".webm", ".m4v"}
SORT_NAMES = ("yaw", "pitch", "blur", "hist", "identity")


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
class SortConfig(CommandConfig):
    faceset: str = opt("", "folder of aligned faces", metadata={"positional": True})
    by: str = opt("yaw", "yaw, pitch, blur, hist or identity", metadata={"choices": list(SORT_NAMES)})
    reference: list[str] = opt([], "identity: face files of the wanted person (default: the whole set's median)")
    identity_threshold: float = opt(0.6, "identity: faces farther than this from the reference move to _other/")
    descending: bool = opt(False, "largest first")
    dry_run: bool = opt(False, "print the order without renaming or moving")

    def validate(self) -> None:
        if not self.faceset:
            raise ConfigError("faceset is required")
        if self.by not in SORT_NAMES:
            raise ConfigError(f"unknown sort {self.by!r}; choose one of {', '.join(SORT_NAMES)}")
