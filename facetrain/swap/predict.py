"""Face predictors: our `face.safetensors` through torch, or an exported `.onnx` / DeepFaceLab `.dfm` through
onnxruntime (the contract DeepFaceLive and FaceFusion's deep swapper use). One registry entry per kind.

Every predictor takes a batch of aligned dst crops (N x R x R x 3, BGR float 0..1) and returns the face in
src's likeness, its mask and the dst mask, all N x R x R x C float32 in 0..1.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np

from loratrain.core.errors import ConfigError
from loratrain.core.registry import Registry


class Predict(Protocol):
    def __call__(self, faces: np.ndarray, landmarks: list[np.ndarray] | None = None
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray]: ...


@dataclass
class Predictor:
    predict: Predict
    resolution: int
    face_type: str  # "" when the file does not say
    name: str
    #: the predictor also takes each crop's landmarks in crop coordinates (a swapper aligns on its own template)
    needs_landmarks: bool = False


PREDICTORS: Registry = Registry("face model kind")


@PREDICTORS.register("torch")
def torch_predictor(path: Path, device: str = "auto", morph_value: float = 1.0, **_: object) -> Predictor:
    import torch

    from loratrain.core.devices import pick_device

    from ..export import load_face_model

    try:
        model, info = load_face_model(path)
    except ValueError as e:
        raise ConfigError(f"model: {e}") from None
    dev = pick_device(device)
    model = model.to(dev)
    if hasattr(model, "morph_value"):  # AMP: the swap's mix of its two codes, as the .dfm's morph_value input
        model.morph_value = morph_value

    def predict(faces: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        with torch.inference_mode():
            x = torch.from_numpy(np.ascontiguousarray(faces.transpose(0, 3, 1, 2))).to(dev, torch.float32)
            return tuple(t.permute(0, 2, 3, 1).float().cpu().numpy() for t in model.swap(x))  # type: ignore[return-value]

    return Predictor(predict, model.cfg.resolution, str(info.get("options", {}).get("face_type", "")), path.name)


@PREDICTORS.register("onnx")
def onnx_predictor(path: Path, morph_value: float = 1.0, **_: object) -> Predictor:
    """An .onnx / .dfm file: input NHWC (`in_face:0`), outputs (face, face mask, dst mask) in DFL's order."""
    try:
        import onnxruntime as ort
    except ImportError:
        raise ImportError("running .onnx / .dfm models needs onnxruntime: pip install 'loratrain[tagger]'") from None
    try:
        session = ort.InferenceSession(str(path), providers=ort.get_available_providers())
    except Exception as e:  # onnxruntime raises its own exception types for a bad file
        raise ConfigError(f"model {path}: onnxruntime cannot load it ({str(e).splitlines()[0][:200]})") from None
    inputs = session.get_inputs()
    face_in = [i for i in inputs if "morph" not in i.name]
    morph_in = [i for i in inputs if "morph" in i.name]
    shape = face_in[0].shape if len(face_in) == 1 else []
    if len(face_in) != 1 or len(shape) != 4 or shape[3] != 3 or not isinstance(shape[1], int) or shape[1] != shape[2]:
        got = ", ".join(f"{i.name} {i.shape}" for i in inputs)
        raise ConfigError(f"model {path}: expected one face input of shape [N, R, R, 3] (a DeepFaceLab .dfm or "
                          f"`loratrain face export`), got {got}")
    if len(session.get_outputs()) < 3:
        raise ConfigError(f"model {path}: expected 3 outputs (face, face mask, dst mask), got {len(session.get_outputs())}")
    res = int(shape[1])
    fixed_batch = shape[0] if isinstance(shape[0], int) else 0
    meta = session.get_modelmeta().custom_metadata_map or {}
    name = face_in[0].name

    def predict(faces: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        chunks = [faces[i:i + 1] for i in range(len(faces))] if fixed_batch == 1 else [faces]
        outs = []
        for chunk in chunks:
            feed = {name: chunk.astype(np.float32)}
            for m in morph_in:
                feed[m.name] = np.array([morph_value], np.float32).reshape([d if isinstance(d, int) else 1 for d in m.shape] or [])
            outs.append(session.run(None, feed)[:3])
        face, fmask, dmask = (np.concatenate([o[k] for o in outs]) for k in range(3))
        return tuple(np.clip(np.asarray(a, np.float32).reshape(len(faces), res, res, -1), 0, 1) for a in (face, fmask, dmask))  # type: ignore[return-value]

    return Predictor(predict, res, meta.get("face_type", ""), path.name)


def load_predictor(path: str | Path, device: str = "auto", morph_value: float = 1.0) -> Predictor:
    path = Path(path)
    kind = "torch" if path.suffix.lower() == ".safetensors" else "onnx"
    return PREDICTORS.get(kind)(path, device=device, morph_value=morph_value)


def open_predictor(cfg: object, tools: list | None = None) -> Predictor:
    """The predictor of a swap's options: `--swapper` (swapper_predict.py: an identity-injection swapper with its
    source person) or `--model`. `tools`: the run's [detector, landmarker], shared with its frame finder."""
    if getattr(cfg, "swapper", ""):
        from .swapper_predict import load_swapper

        return load_swapper(cfg, tools)
    return load_predictor(cfg.model, cfg.device, cfg.morph_value)  # type: ignore[attr-defined]
