"""`face swap --swapper`: an identity-injection swapper (inswapper / SimSwap family) as one more predictor kind.

The swap pipeline crops every dst face DFL-style and asks a predictor for (face, face mask, dst mask) in that
crop; everything after it (mask modes, colour transfer, blends, smoothing, labels, resumable video) is shared.
A swapper works on a different crop: a 5-point similarity onto its own template (inswapper: `arcface_128` at
128 px). So this predictor takes the crop's landmarks too (`needs_landmarks`), warps the crop onto the
swapper's template, runs the swapper with the source person's embedding, and warps the result back into the
crop, where it is pasted over the dst crop. Both masks are the swapper's square warped back: the face mask a
soft box (its margin faded by a blur, as FaceFusion's default box mask does, so no square edge shows), the
dst mask the square itself; `learned-prd*learned-dst` (the default) is therefore the soft box.

Face type and resolution: the crop is `wf` at twice the swapper's size. Measured on the demo faces, the
`arcface_128` square covers about 88 % of a whole-face crop (6-16 px margins at 256) and a 256 px crop holds
about 1.75x the swapper's 128 px, so the warp into the swapper only shrinks (no detail is invented before the
model sees it) and the paste back is not blurred by an upscale from the frame. `f` would cut the square's top
and bottom off; a bigger crop would only cost merge time (the mask is processed at 4x the crop).

The source person is one embedding: the mean of the recogniser's raw embeddings of the largest face in each
`--source` image (an aligned face from `face extract` uses its stored landmarks, any other image is detected
with the swap's detector). An optional restoration model (GFPGAN / CodeFormer-style) runs on each swapped
face in the crop, aligned on `ffhq_512`, and is blended in by `--restore_blend`.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from loratrain.core.errors import ConfigError
from loratrain.core.paths import confine

from ..faceset import FACE_EXTENSIONS
from ..swapper.align import align_crop, five_points
from ..swapper.onnx_file import ort_session, read_onnx
from .predict import PREDICTORS, Predictor

#: the crop the swap cuts for a swapper: whole face, at CROP_SCALE x the swapper's size (module docstring), capped
SWAPPER_FACE_TYPE, CROP_SCALE, MAX_CROP = "wf", 2, 1024
#: the restoration models' crop (GFPGAN, CodeFormer, GPEN 512, RestoreFormer all use it) and a dynamic size's default
RESTORE_TEMPLATE, RESTORE_DEFAULT_SIZE = "ffhq_512", 512


def _reason(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:200] if text else type(exc).__name__


def _batched(run: Any, x: np.ndarray, batch: int | None, *extra: np.ndarray) -> np.ndarray:
    """`run(chunk, *extra_chunks)` over x in the model's batch: all at once when the batch is free, else chunks of
    the fixed size (the last padded by repeating its last row, the padding dropped after)."""
    if not batch:
        return run(x, *extra)
    out = []
    for i in range(0, len(x), batch):
        parts = [a[i:i + batch] for a in (x, *extra)]
        n = len(parts[0])
        if n < batch:
            parts = [np.concatenate([p, np.repeat(p[-1:], batch - n, 0)]) for p in parts]
        out.append(run(*parts)[:n])
    return np.concatenate(out)


def soft_box(size: int) -> np.ndarray:
    """The swapper's square as a mask that fades to zero at its edge: ones inside a margin of three blur sigmas
    (sigma 4 % of the side), blurred, so the value at the border is under the merger's 1/255 noise floor."""
    sigma = 0.04 * size
    margin = int(np.ceil(3 * sigma))
    box = np.zeros((size, size), np.float32)
    box[margin:size - margin, margin:size - margin] = 1
    return cv2.GaussianBlur(box, (0, 0), sigma)


def _back(img: np.ndarray, mat: np.ndarray, r: int, border: int = cv2.BORDER_CONSTANT) -> np.ndarray:
    """Inverse-warp a model crop (S x S) into the R x R swap crop by its crop->model matrix."""
    return cv2.warpAffine(img, mat, (r, r), flags=cv2.WARP_INVERSE_MAP | cv2.INTER_LINEAR, borderMode=border)


# ---- the source person ---------------------------------------------------------------------------------------
def source_images(sources: list[str]) -> list[Path]:
    """The image files `--source` names: the files given, or the images of the one folder given (sorted)."""
    files = [confine(s, "source") for s in sources]  # checked before anything looks at them
    if len(files) == 1 and files[0].is_dir():
        folder = files[0]
        files = sorted(confine(p, "source") for p in folder.iterdir()
                       if p.suffix.lower() in FACE_EXTENSIONS and not p.name.startswith(".") and p.is_file())
        if not files:
            raise ConfigError(f"source {sources[0]}: no .png / .jpg images in the folder")
        return files
    for f in files:
        if not f.is_file():
            raise ConfigError(f"source: image not found: {f}")
    return files


def _source_landmarks(path: Path, rgb: np.ndarray, finder: Any) -> np.ndarray:
    """An aligned face's stored landmarks, else the largest detected face's."""
    from ..faceset import read_meta

    try:
        lm = np.asarray(read_meta(path).landmarks, np.float64)
        if lm.shape == (68, 2):
            return lm
    except (ValueError, OSError):  # not one of our aligned faces: detect
        pass
    faces = finder(rgb)
    if not faces:
        raise ConfigError(f"source {path}: no face found (try --upsample 1 or a lower --min_face, or give an aligned "
                          "face from `face extract`)")
    return faces[0][1]


def source_embedding(cfg: Any, recognizer: Any, tools: list[Any] | None = None) -> np.ndarray:
    """The mean raw recogniser embedding of the largest face in each `--source` image (D,). `tools` (the run's
    [detector, landmarker], filled here when empty) lets the frame finder reuse what was built for the sources:
    dlib's models take most of a second to load each."""
    from ..extract.plugins import DETECTORS, LANDMARKERS, find_faces

    tools = tools if tools is not None else []

    def finder(rgb: np.ndarray) -> list:
        if not tools:  # built only when some source image is not an aligned face
            tools.extend([DETECTORS.get(cfg.detector)(upsample=cfg.upsample, model_path=cfg.detector_model),
                          LANDMARKERS.get(cfg.landmarker)(model_path=cfg.landmarker_model)])
        return find_faces(rgb, tools[0], tools[1], cfg.min_face, cfg.min_score, 1)

    embeddings = []
    for path in source_images(list(cfg.source)):
        bgr = cv2.imdecode(np.fromfile(str(path), np.uint8), cv2.IMREAD_COLOR)
        if bgr is None:
            raise ConfigError(f"source {path}: cannot decode the image")
        rgb = np.ascontiguousarray(bgr[..., ::-1])
        embeddings.append(recognizer.embed(rgb, _source_landmarks(path, rgb, finder)))
    return np.mean(embeddings, axis=0)


# ---- the optional restoration model -------------------------------------------------------------------------
class Restorer:
    """A GFPGAN / CodeFormer-style face restorer: N x 3 x S x S RGB at -1..1 in, the same out, FFHQ-aligned;
    CodeFormer's second input (`weight`, a scalar) gets `fidelity`."""

    def __init__(self, path: str, fidelity: float) -> None:
        self.path = confine(path, "restore_model")
        if not self.path.is_file():
            raise ConfigError(f"restore_model: file not found: {path}")
        self.session = ort_session(self.path, "restore_model")
        inputs, outputs = self.session.get_inputs(), self.session.get_outputs()
        images = [i for i in inputs if len(i.shape or []) == 4]
        others = [i for i in inputs if len(i.shape or []) != 4]
        shape = list(images[0].shape) if len(images) == 1 else [None] * 4
        sizes = [d for d in shape[2:] if isinstance(d, int)]
        fits = shape[1] == 3 or not isinstance(shape[1], int)
        if len(images) != 1 or len(others) > 1 or not outputs or not fits or (len(sizes) == 2 and sizes[0] != sizes[1]):
            got = ", ".join(f"{i.name} {i.shape}" for i in inputs)
            raise ConfigError(f"restore_model {path}: expected a face restorer with one image input N x 3 x S x S (and "
                              f"optionally CodeFormer's scalar weight); it has inputs {got}")
        self.input = images[0].name
        self.size = sizes[0] if sizes else RESTORE_DEFAULT_SIZE
        self.batch = shape[0] if isinstance(shape[0], int) and shape[0] > 0 else None
        if not 16 <= self.size <= 2048 or (self.batch or 1) > 256:  # every buffer is sized from these
            raise ConfigError(f"restore_model {path}: a crop of {self.size} px and a fixed batch of {self.batch}; a face "
                              "restorer has 16 to 2048 px and a batch of at most 256")
        self.extra: dict[str, np.ndarray] = {}
        for i in others:
            dtype = np.float64 if i.type == "tensor(double)" else np.float32
            self.extra[i.name] = np.full([d if isinstance(d, int) else 1 for d in (i.shape or [])], fidelity, dtype)
        try:
            probe = self(np.zeros((1, self.size, self.size, 3), np.float32))
        except Exception as e:  # a graph whose declared shapes lie fails only when it runs
            raise ConfigError(f"restore_model {path}: running it on one blank face failed ({_reason(e)})") from None
        if probe.shape != (1, self.size, self.size, 3):
            raise ConfigError(f"restore_model {path}: expected an output N x 3 x {self.size} x {self.size}, got one of "
                              f"shape {probe.shape[0]} x {probe.shape[3]} x {probe.shape[1]} x {probe.shape[2]}")
        if not np.isfinite(probe).all():
            raise ConfigError(f"restore_model {path}: its output for a blank face holds NaN or inf (its weights do?)")

    def _run(self, x: np.ndarray) -> np.ndarray:
        y = self.session.run(None, {self.input: x, **self.extra})[0]
        return np.asarray(y, np.float32)

    def __call__(self, rgb01: np.ndarray) -> np.ndarray:
        """N x S x S x 3 RGB 0..1 -> restored, the same."""
        x = np.ascontiguousarray(rgb01.transpose(0, 3, 1, 2), np.float32) * 2 - 1
        y = _batched(self._run, x, self.batch)
        if y.ndim != 4 or y.shape[1] != 3:
            return y.reshape(len(x), -1, 1, 1)  # caught by the probe's shape check
        return np.clip((y.transpose(0, 2, 3, 1) + 1) / 2, 0, 1)


# ---- the predictor ------------------------------------------------------------------------------------------
@dataclass
class SwapperSetup:
    contract: Any                 # the file's SwapperContract (swapper/contract.py)
    runtime: str | bytes          # what onnxruntime loads: read_onnx's (the path, or the file as read and checked)
    source: np.ndarray            # the swapper's `source` input (1 x D), from the mean embedding
    restorer: Restorer | None
    restore_blend: float


@PREDICTORS.register("swapper")
def swapper_predictor(path: Path, *, setup: SwapperSetup | None = None, **_: object) -> Predictor:
    """The swapper file as a predictor: crops -> (face, soft box, square) in the crop, taking the crops' landmarks."""
    if setup is None:
        raise ConfigError("swapper: needs --source and --recognizer (the person to put in)")
    contract = setup.contract
    session = ort_session(path, "swapper", setup.runtime)
    s = contract.size
    r = min(int(round(CROP_SCALE * s)), MAX_CROP)
    box, square = soft_box(s)[..., None], np.ones((s, s, 1), np.float32)
    source = setup.source

    def run(target: np.ndarray, src: np.ndarray) -> np.ndarray:
        return np.asarray(session.run([contract.output], {contract.target: target, contract.source: src})[0], np.float32)

    restorer, blend = setup.restorer, setup.restore_blend  # not `setup`: it may hold the whole file's bytes
    restore_box = soft_box(restorer.size)[..., None] if restorer is not None else None

    def predict(faces: np.ndarray, landmarks: list[np.ndarray] | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        if landmarks is None or len(landmarks) != len(faces):
            raise ValueError("a swapper predicts from the crops' landmarks: pass one landmark set per crop")
        n, res = len(faces), faces.shape[1]
        points = [five_points(lm) for lm in landmarks]
        aligned = [align_crop(np.ascontiguousarray(f[..., ::-1]), p, contract.template, s) for f, p in zip(faces, points)]
        target = contract.to_input(np.stack([a[0] for a in aligned]))
        swapped = contract.from_output(_batched(run, target, contract.batch, np.repeat(source, n, 0)))
        out = np.empty((n, res, res, 3), np.float32)
        fmask = np.empty((n, res, res, 1), np.float32)
        dmask = np.empty((n, res, res, 1), np.float32)
        for k, (_, mat) in enumerate(aligned):
            hard = _back(square, mat, res)[..., None]
            face = _back(np.ascontiguousarray(swapped[k][..., ::-1]), mat, res, cv2.BORDER_REPLICATE)
            out[k] = faces[k] * (1 - hard) + face * hard
            fmask[k] = _back(box, mat, res)[..., None]
            dmask[k] = hard
        if restorer is not None and blend > 0:
            crops = [align_crop(np.ascontiguousarray(f[..., ::-1]), p, RESTORE_TEMPLATE, restorer.size) for f, p in zip(out, points)]
            restored = restorer(np.stack([c[0] for c in crops]))
            for k, (_, mat) in enumerate(crops):
                alpha = blend * _back(restore_box, mat, res)[..., None]
                back = _back(np.ascontiguousarray(restored[k][..., ::-1]), mat, res, cv2.BORDER_REPLICATE)
                out[k] = out[k] * (1 - alpha) + back * alpha
        return np.clip(out, 0, 1), np.clip(fmask, 0, 1), np.clip(dmask, 0, 1)

    try:  # one blank face through the whole path: a file whose shapes lie fails here, named, before any frame
        blank = np.zeros((1, r, r, 3), np.float32)
        c = r / 2
        face = predict(blank, [np.array([[c - r / 8, c - r / 12], [c + r / 8, c - r / 12], [c, c + r / 24],
                                         [c - r / 10, c + r / 8], [c + r / 10, c + r / 8]])])[0]
        if not np.isfinite(face).all():  # NaN in the weights: every frame would get a black square
            raise ConfigError(f"swapper {path}: its output for a blank face holds NaN or inf (its weights do?)")
    except ConfigError:
        raise
    except Exception as e:  # onnxruntime's own exception types
        raise ConfigError(f"swapper {path}: running it on one blank face failed ({_reason(e)})") from None
    return Predictor(predict, r, SWAPPER_FACE_TYPE, path.name, needs_landmarks=True)


def load_swapper(cfg: Any, tools: list[Any] | None = None) -> Predictor:
    """The predictor of `--swapper` with its source person (from `--source` through `--recognizer`) and optional
    restorer: every file confined and checked here, where it is opened, before any frame is read."""
    from ..extract.plugins import identity_encoder
    from ..swapper.contract import read_contract

    path = confine(cfg.swapper, "swapper")
    if not path.is_file():
        raise ConfigError(f"swapper: file not found: {cfg.swapper}")
    model, runtime = read_onnx(path, "swapper")  # parsed once: the contract is read from it, the session built from it
    contract = read_contract(model, f"swapper {path}")  # the contract first: the clearest error
    del model  # not held while onnxruntime builds its own copy
    recognizer = identity_encoder(cfg.recognizer).recognizer  # the --reference filter's too: one session of the file
    if recognizer.dim != contract.embed:
        raise ConfigError(f"recognizer {cfg.recognizer} gives {recognizer.dim}-d embeddings; the swapper {path.name} "
                          f"takes {contract.embed}-d ones (its `{contract.source}` input)")
    source = contract.latent(source_embedding(cfg, recognizer, tools))
    restorer = Restorer(cfg.restore_model, cfg.restore_fidelity) if cfg.restore_model else None
    setup = SwapperSetup(contract, runtime, source, restorer, cfg.restore_blend)
    return PREDICTORS.get("swapper")(path, setup=setup)


def file_ids(cfg: Any) -> dict[str, list]:
    """(name, size, mtime) of every file a swapper swap reads besides the input: part of the resume key, so a
    changed source photo, recogniser, swapper or restorer at the same path starts the swap over."""
    def ident(p: str | Path) -> list:
        st = Path(p).stat()
        return [Path(p).name, st.st_size, st.st_mtime_ns]

    out = {"swapper_id": ident(cfg.swapper), "source_ids": [ident(p) for p in source_images(list(cfg.source))]}
    if cfg.restore_model:
        out["restore_model_id"] = ident(cfg.restore_model)
    return out


_CACHE: dict[str, tuple[str, Predictor]] = {}


def cached_swapper(cfg: Any) -> Predictor:
    """`load_swapper`, loaded again only when a file or an option it reads changes (the UI's preview per slider move)."""
    import json

    key = json.dumps([file_ids(cfg), cfg.recognizer and [cfg.recognizer, Path(cfg.recognizer).stat().st_mtime_ns],
                      [getattr(cfg, k) for k in ("restore_blend", "restore_fidelity", "detector", "detector_model",
                                                 "landmarker", "landmarker_model", "upsample", "min_face", "min_score")]],
                     default=str)
    got = _CACHE.get("last")
    if got is None or got[0] != key:
        _CACHE["last"] = got = (key, load_swapper(cfg))
    return got[1]
