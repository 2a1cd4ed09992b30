"""Reading a saved face model whose header cannot be trusted (a teacher, an --init_from source, a resumed or exported
model: any of them may be a planted or damaged file).

The header's `model` entry says how big a model to build. Built as is, a tiny file whose header says ae_dims 8192
would allocate gigabytes before the weights fail to fit. So the header is checked first (types, sane ranges), the
model it describes is built on PyTorch's `meta` device (shapes only, no memory), and every tensor name and shape in
the file is compared with it, read from the safetensors header without loading any weights. Only a file that
matches is loaded and built for real; its size then bounds the memory it can make us spend. Every refusal is a
ConfigError naming the file.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from loratrain.core.errors import ConfigError

from ..models.archi import FaceAutoencoder, FaceModelConfig, build_model
from .state import CONFIG_KEY

MAX_RESOLUTION = 4096  # far above any face model trained here; keeps the meta build and the error text sane
MAX_DIMS = 8192
MAX_HEADER_CHARS = 1 << 20  # the JSON header of a face model is a few hundred bytes


def _int(value: Any, lo: int, hi: int) -> int | None:
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        return None
    return value


def header_config(info: Any, path: str | Path) -> FaceModelConfig:
    """The FaceModelConfig a face-model header describes, or a ConfigError naming the file and the bad field."""
    if not isinstance(info, dict) or not isinstance(info.get("model"), dict):
        raise ConfigError(f"{path}: a training state or foreign file, not a face model (no model entry in its header)")
    m = info["model"]
    unknown = sorted(set(m) - set(FaceModelConfig.__dataclass_fields__))
    if unknown:
        raise ConfigError(f"{path}: unknown field {unknown[0]!r} in the model header")
    archi = m.get("archi", FaceModelConfig.archi)
    if not isinstance(archi, str) or len(archi) > 40:
        raise ConfigError(f"{path}: the model header's archi is not an architecture name")
    kw: dict[str, Any] = {"archi": archi}
    bounds = {"resolution": (16, MAX_RESOLUTION), "ae_dims": (1, MAX_DIMS), "e_dims": (2, MAX_DIMS),
              "d_dims": (2, MAX_DIMS), "d_mask_dims": (2, MAX_DIMS)}
    for name, (lo, hi) in bounds.items():
        if name not in m:
            continue
        value = _int(m[name], lo, hi)
        if value is None:
            raise ConfigError(f"{path}: the model header's {name} is {str(m[name])[:40]!r}, not a whole number in "
                              f"{lo}..{hi}")
        kw[name] = value
    for name in ("options", "watchers"):
        if name in info and not isinstance(info[name], dict):
            raise ConfigError(f"{path}: the header's {name!r} entry is not a table")
    if "iteration" in info and _int(info["iteration"], 0, 2 ** 62) is None:
        raise ConfigError(f"{path}: the header's iteration is not a whole number in 0..2**62")
    return FaceModelConfig(**kw)


def _meta_model(cfg: FaceModelConfig, path: str | Path) -> FaceAutoencoder:
    try:
        with torch.device("meta"):
            return build_model(cfg)
    except (ValueError, KeyError, TypeError, RuntimeError) as e:
        raise ConfigError(f"{path}: the model header describes no buildable model ({e})") from None


def read_header(path: str | Path) -> tuple[dict, dict[str, tuple[int, ...]]]:
    """(face-model header, {tensor name: shape}) without loading a weight; ConfigError if unreadable."""
    try:
        with safe_open(str(path), framework="pt") as f:
            raw = (f.metadata() or {}).get(CONFIG_KEY)
            shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    except Exception as e:  # a truncated, foreign or missing file
        raise ConfigError(f"{path}: unreadable model file ({str(e)[:200]})") from None
    if raw is None:
        raise ConfigError(f"{path}: not a loratrain face model (no face-model header)")
    if len(raw) > MAX_HEADER_CHARS:
        raise ConfigError(f"{path}: the face-model header is implausibly large ({len(raw)} characters)")
    try:
        info = json.loads(raw)
    except (ValueError, RecursionError):
        raise ConfigError(f"{path}: the face-model header is not valid JSON") from None
    if not isinstance(info, dict):
        raise ConfigError(f"{path}: the face-model header is not a table")
    return info, shapes


def check_model_file(path: str | Path) -> tuple[dict, FaceModelConfig]:
    """Validate a face model file against the architecture its header names, reading only headers.

    Returns (header, config); raises ConfigError naming the file when a field is out of range or a tensor is
    missing, extra or of another shape than that architecture has."""
    info, shapes = read_header(path)
    cfg = header_config(info, path)
    expected = {k: tuple(v.shape) for k, v in _meta_model(cfg, path).state_dict().items()}
    missing = sorted(set(expected) - set(shapes))
    extra = sorted(set(shapes) - set(expected))
    if missing or extra:
        what = f"no tensor {missing[0]}" if missing else f"an unexpected tensor {extra[0]}"
        raise ConfigError(f"{path}: the weights do not match the {cfg.archi} model its header describes ({what})")
    for k, shape in expected.items():
        if shapes[k] != shape:
            raise ConfigError(f"{path}: the weights do not match the {cfg.archi} model its header describes "
                              f"({k} is {list(shapes[k])}, expected {list(shape)})")
    return info, cfg


def load_model_file(path: str | Path) -> tuple[FaceAutoencoder, dict]:
    """(model on the CPU with the file's weights, header), after check_model_file; ConfigError naming the file."""
    info, cfg = check_model_file(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            weights = {k: f.get_tensor(k) for k in f.keys()}
        model = build_model(cfg)
        model.load_state_dict(weights)
    except Exception as e:  # shapes matched, so only a damaged file (bad dtype or data) gets here
        raise ConfigError(f"{path}: unreadable model weights ({str(e)[:200]})") from None
    return model, info
