"""An ArcFace-style face recogniser the user provides as an ONNX file: the identity every swapper of the family reads.

Identity-injection swappers (inswapper, SimSwap, HyperSwap, ...) take the source person as an embedding from such
a recogniser, and the same embedding tells whether two faces are one person far better than dlib's 128-d one.
The contract is insightface's (and FaceFusion's, which follows it for w600k_r50): one input N x 3 x 112 x 112
(N may be fixed at 1), one output N x D (D is 512 for the common models); the face is cropped on the
`arcface_112_v2` template at 112 px from its 5 points, fed as RGB, scaled by (x - 127.5) / 127.5, NCHW.
FaceFusion's frames are BGR and it flips them to RGB before this step; ours are RGB already.

Nothing is downloaded: the model is the user's file, confined like every path a job opens. A file that is not
such a model is refused at load with the shapes it has, so a wrong file (a detector, a swapper) is a clear
error rather than nonsense distances.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from loratrain.core.errors import ConfigError
from loratrain.core.paths import confine

from .align import align_crop, five_points
from .onnx_file import ort_session

SIZE = 112
TEMPLATE = "arcface_112_v2"
#: crops per run for a model whose batch dimension is free (keeps memory flat on long facesets)
CHUNK = 64
#: the largest fixed batch a file may declare (every crop run pads up to it)
MAX_BATCH = 256


def normed(v: np.ndarray, eps: float = 1e-12) -> np.ndarray:
    """`v` scaled to unit L2 length along its last axis (a zero vector stays zero)."""
    v = np.asarray(v, np.float32)
    return v / np.maximum(np.linalg.norm(v, axis=-1, keepdims=True), eps)


def _shape(arg: object) -> str:
    return "x".join(str(d) if isinstance(d, int) else "N" for d in getattr(arg, "shape", []) or []) or "scalar"


class Recognizer:
    """The user's ONNX face recogniser: aligned 112 px RGB crops -> raw (unnormalised) N x D embeddings."""

    def __init__(self, path: str | Path, what: str = "recognizer") -> None:
        self.path = confine(path, what)
        if not self.path.is_file():
            raise ConfigError(f"{what}: recogniser file not found: {path}")
        self.session = ort_session(self.path, what)  # a file that is no (valid) ONNX model: a ConfigError naming it
        inputs, outputs = self.session.get_inputs(), self.session.get_outputs()
        found = (f"inputs {', '.join(f'{a.name} {_shape(a)}' for a in inputs) or 'none'}; "
                 f"outputs {', '.join(f'{a.name} {_shape(a)}' for a in outputs) or 'none'}")
        expected = (f"{what} {path}: expected an ArcFace-style face recogniser with one input N x 3 x {SIZE} x {SIZE} "
                    f"and one output N x D; found {found}")
        if len(inputs) != 1 or len(outputs) != 1:
            raise ConfigError(expected)
        shape = list(inputs[0].shape or [])
        fixed = [d if isinstance(d, int) else None for d in shape]
        if len(shape) != 4 or fixed[1] not in (3, None) or any(d not in (SIZE, None) for d in fixed[2:]):
            raise ConfigError(expected)
        if inputs[0].type not in ("tensor(float)", "tensor(float16)"):
            raise ConfigError(f"{expected} (input type {inputs[0].type}, not float)")
        self.input = inputs[0].name
        self.dtype = np.float16 if inputs[0].type == "tensor(float16)" else np.float32
        self.batch = fixed[0]  # None: any batch size; an int (usually 1): exactly that many crops per run
        if self.batch is not None and self.batch > MAX_BATCH:
            raise ConfigError(f"{expected} (a fixed batch of {self.batch}: at most {MAX_BATCH})")
        n = self.batch or 2  # two different faces when the batch is free: one embedding per face, not per batch
        try:
            grey = np.linspace(0, 255, n).astype(np.uint8)[:, None, None, None]
            probe = self._run(np.broadcast_to(grey, (n, SIZE, SIZE, 3)))
        except Exception as exc:  # a graph whose declared shapes lie fails only when it runs
            raise ConfigError(f"{expected}; running it on blank faces failed: "
                              f"{str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__}") from exc
        if probe.ndim != 2 or probe.shape[0] != n or probe.shape[1] < 1:
            raise ConfigError(f"{expected}; its output for {n} face(s) has shape {'x'.join(map(str, probe.shape))}, "
                              "not one embedding per face")
        if not np.isfinite(probe).all():
            raise ConfigError(f"{what} {path}: its embeddings hold NaN or inf (its weights do?)")
        self.dim = int(probe.shape[1])

    def _run(self, crops: np.ndarray) -> np.ndarray:
        x = ((crops.astype(np.float32) - 127.5) / 127.5).transpose(0, 3, 1, 2)
        return np.asarray(self.session.run(None, {self.input: np.ascontiguousarray(x.astype(self.dtype))})[0], np.float32)

    def embed_crops(self, crops: np.ndarray) -> np.ndarray:
        """N x D raw embeddings of N aligned RGB uint8 crops (N x 112 x 112 x 3), in model-sized batches."""
        crops = np.asarray(crops)
        if crops.ndim != 4 or crops.shape[1:] != (SIZE, SIZE, 3):
            raise ValueError(f"crops: expected N x {SIZE} x {SIZE} x 3 RGB faces aligned on {TEMPLATE}, got {crops.shape}")
        step = self.batch or CHUNK
        out = []
        for i in range(0, len(crops), step):
            part = crops[i:i + step]
            if self.batch and len(part) < self.batch:  # a fixed batch larger than what is left: pad, drop after
                part = np.concatenate([part, np.repeat(part[-1:], self.batch - len(part), 0)])
            out.append(self._run(part)[: len(crops) - i])
        return np.concatenate(out) if out else np.zeros((0, self.dim), np.float32)

    def crop(self, rgb: np.ndarray, landmarks: np.ndarray) -> np.ndarray:
        """The 112 px `arcface_112_v2` crop of the face with these landmarks (68 dlib/DFL points or 5)."""
        return align_crop(rgb, five_points(landmarks), TEMPLATE, SIZE)[0]

    def embed(self, rgb: np.ndarray, landmarks: np.ndarray) -> np.ndarray:
        """(D,) raw embedding of the face at `landmarks` in an RGB uint8 image."""
        return self.embed_crops(self.crop(rgb, landmarks)[None])[0]


class RecognizerIdentity:
    """The identity encoder over a recogniser (what `--recognizer` selects): L2-normalised embeddings compared by
    cosine distance 1 - cos. FaceFusion's reference-face filter uses the same distance with 0.6 by default (same
    person above a cosine similarity of 0.4), which is our default too."""

    default_threshold = 0.6

    def __init__(self, path: str | Path, what: str = "recognizer") -> None:
        self.recognizer = Recognizer(path, what)

    def __call__(self, rgb: np.ndarray, landmarks: np.ndarray) -> np.ndarray:
        return normed(self.recognizer.embed(rgb, landmarks))

    @staticmethod
    def distance(a: np.ndarray, b: np.ndarray) -> np.ndarray | float:
        """1 - cosine similarity over the last axis; both sides are renormalised, since a mean of unit embeddings
        (a reference person) is shorter than one."""
        d = 1.0 - (normed(a) * normed(b)).sum(-1)
        return float(d) if np.ndim(d) == 0 else d
