"""Options of `loratrain face extract` and `face sort`; no OpenCV or dlib here, so the CLI parser stays light."""
from __future__ import annotations

from pathlib import Path

from loratrain.core.config import JobConfig, opt
from loratrain.core.errors import Problem

from ..face_types import FACE_TYPES

VIDEO_EXTENSIONS = {".mp4", ".mkv", ".mov", ".avi", ".webm", ".m4v"}
SORT_NAMES = ("yaw", "pitch", "blur", "hist", "identity")
PLUGINS = "loratrain.facetrain.extract.plugins"


class ExtractConfig(JobConfig):
    input: str = opt("", "folder of images, or a video file", positional=True, path="any")
    output_dir: str = opt("", "where aligned faces are written (default: <input>_aligned)", path="output")
    detector: str = opt("dlib", "face detector plugin: dlib (HOG), dlib_cnn, or scrfd with --detector_model",
                        registry=f"{PLUGINS}:DETECTORS")
    detector_model: str = opt("", "ONNX file for an ONNX detector (SCRFD)", path="file")
    landmarker: str = opt("dlib68", "landmark plugin: dlib68, or 2dfan4 with --landmarker_model", registry=f"{PLUGINS}:LANDMARKERS")
    landmarker_model: str = opt("", "ONNX file for an ONNX landmarker", path="file")
    face_type: str = opt("wf", "crop: h, mf, f, wf (whole face) or head", choices=list(FACE_TYPES))
    image_size: int = opt(512, "side of the aligned face images", ge=32)
    max_faces: int = opt(0, "keep at most this many faces per frame, largest first (0 = all)")
    min_face: int = opt(40, "ignore detections smaller than this many pixels")
    min_score: float = opt(0.5, "ignore detections scoring below this (dlib HOG margins: false positives score ~0.1)")
    upsample: int = opt(1, "detector upsampling (finds smaller faces, slower)")
    fps: float = opt(0.0, "video: frames per second to extract (0 = every frame)")
    format: str = opt("jpg", "jpg or png", choices=["jpg", "png"])
    jpeg_quality: int = opt(95, "JPEG quality of the faces", ge=1, le=100)
    overwrite: bool = opt(False, "add to a folder that already has faces (existing faces are never replaced)")
    quiet: bool = opt(False, "no progress bar")

    @property
    def faces_dir(self) -> Path:
        if self.output_dir:
            return Path(self.output_dir)
        p = Path(self.input)
        return p.with_name((p.stem if p.is_file() else p.name) + "_aligned")

    def requirements(self) -> list[Problem]:
        if not self.input:
            return [("input", "is required")]
        if not Path(self.input).exists():
            return [("input", f"input not found: {self.input}")]
        return []


class SortConfig(JobConfig):
    faceset: str = opt("", "folder of aligned faces", positional=True, path="dir")
    by: str = opt("yaw", "yaw, pitch, blur, hist or identity", choices=SORT_NAMES)
    reference: list[str] = opt([], "identity: face files of the wanted person (default: the whole set's median)", path="file")
    recognizer: str = opt("", "identity: an ArcFace-style face recogniser (ONNX file, input N x 3 x 112 x 112) to compare "
                          "faces by cosine distance instead of dlib's embedding", path="file")
    identity_threshold: float = opt(0.0, "identity: faces farther than this from the reference move to _other/ (0 = the "
                                    "encoder's default: 0.6, dlib's Euclidean or the recogniser's cosine distance)", ge=0)
    descending: bool = opt(False, "largest first")
    dry_run: bool = opt(False, "print the order without renaming or moving")

    def requirements(self) -> list[Problem]:
        out: list[Problem] = [("faceset", "is required")] if not self.faceset else []
        if self.recognizer and not Path(self.recognizer).is_file():
            out.append(("recognizer", f"recogniser file not found: {self.recognizer}"))
        return out
