"""Reading a user's ONNX file safely, without importing torch (the swap path runs swappers in onnxruntime only).

A file's weights may live in side files it names (ONNX external data): a name read from a file is untrusted,
so only plain files directly beside the model are read, never a path that climbs out or a link.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from loratrain.core.errors import ConfigError


def ort_source(path: str | Path, what: str = "model") -> str | bytes:
    """What to hand onnxruntime for a user's file: its path, or, when its weights live in side files, the model as
    our loader checked and completed it (so onnxruntime never follows a side-file name itself)."""
    model, external = _load(path, what)
    return model.SerializeToString() if external else str(path)


def load_onnx(path: str | Path, what: str = "model") -> Any:
    """The ModelProto of a user's file (side files of weights confined and read in), or a ConfigError naming it."""
    return _load(path, what)[0]


def _load(path: str | Path, what: str) -> tuple[Any, bool]:
    """The ModelProto of a user's file, or a ConfigError naming it (never a protobuf traceback)."""
    import onnx
    from onnx.external_data_helper import ExternalDataInfo, uses_external_data

    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as e:  # protobuf's DecodeError and OSError alike
        raise ConfigError(f"{what} {path}: not a readable ONNX file ({str(e).splitlines()[0][:160] if str(e) else type(e).__name__})") from None
    if not len(model.graph.node):
        raise ConfigError(f"{what} {path}: the ONNX graph is empty")
    external = [t for t in model.graph.initializer if uses_external_data(t)]
    if external:
        # weights in side files: each must be a plain file beside the model (a name inside a file is untrusted)
        from loratrain.core.paths import confine

        folder = Path(path).resolve().parent
        for t in external:
            loc = ExternalDataInfo(t).location
            if not loc or Path(loc).name != loc or loc in (".", ".."):
                raise ConfigError(f"{what} {path}: weight {t.name} names the side file {loc!r}; only a file beside the "
                                  "model is read")
            side = confine(folder / loc, f"{what} weights file")
            if side.is_symlink() or not side.is_file() or side.resolve().parent != folder:
                raise ConfigError(f"{what} {path}: side file {loc!r} of weight {t.name} is missing or not a plain file "
                                  "beside the model")
        onnx.load_external_data_for_model(model, str(folder))
    return model, bool(external)
