"""Reading model weights: .safetensors lazily, pickled checkpoints only when the user allows them, and then
weights-only, because unpickling can run code. Writing is in safe_io.py."""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from .errors import UnsafeFileError
from .paths import confine

if TYPE_CHECKING:
    import torch

PICKLE_SUFFIXES = {".ckpt", ".pt", ".pth", ".bin"}


def read_safetensors_metadata(path: str | Path) -> dict[str, str]:
    from safetensors import safe_open

    with safe_open(str(confine(path, "model file")), framework="pt") as f:
        return dict(f.metadata() or {})


def load_state_dict(path: str | Path, allow_pickle: bool = False, device: str = "cpu", dtype: torch.dtype | None = None,
                    keep_fp32: tuple[str, ...] = ()) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Load tensors and metadata; pickled files only when allowed, and then weights-only.

    dtype: floating tensors are converted one at a time as they are read (keys starting with a
    `keep_fp32` prefix become float32 instead), so an fp16 file loaded for bf16 training never
    holds two copies of the model. A .safetensors file is read through a sliding map window
    (tensor_io.LazySafetensors), so its pages do not stay counted in this process's memory either.
    """
    import torch

    path = confine(path, "model file")
    if path.is_dir():
        raise ValueError(f"{path} is a folder; expected a .safetensors file")
    if not path.is_file():
        raise FileNotFoundError(f"model file not found: {path}")
    if path.suffix.lower() == ".safetensors":
        from .tensor_io import LazySafetensors

        try:
            with LazySafetensors(path) as f:
                out = {k: _converted(f.read(k), torch.float32 if keep_fp32 and k.startswith(keep_fp32) else dtype, device)
                       for k in f.keys()}
                return out, dict(f.metadata)
        except (ValueError, FileNotFoundError):
            raise
        except Exception as e:
            raise ValueError(f"{path}: not a readable .safetensors file ({e})") from None
    if path.suffix.lower() in PICKLE_SUFFIXES:
        if not allow_pickle:
            raise UnsafeFileError(
                f"{path}: pickled checkpoints can run code when loaded and are refused; convert it to "
                ".safetensors, or pass --allow_pickle to load it with torch.load(weights_only=True)"
            )
        try:
            obj = torch.load(path, map_location=device, weights_only=True)
        except Exception as e:
            raise ValueError(f"{path}: could not be loaded as plain weights ({e})") from None
        if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
            obj = obj["state_dict"]
        if not isinstance(obj, dict):
            raise ValueError(f"{path}: does not hold a state dict")
        return {k: _converted(v, torch.float32 if keep_fp32 and k.startswith(keep_fp32) else dtype, device, copy=False)
                for k, v in obj.items() if isinstance(v, torch.Tensor)}, {}
    raise ValueError(f"{path}: unknown model file type {path.suffix!r} (expected .safetensors)")


def _converted(t: torch.Tensor, dtype: torch.dtype | None, device: str, copy: bool = True) -> torch.Tensor:
    """A tensor the caller owns (not a view of a file map), in `dtype` when it is floating point."""
    if dtype is not None and t.is_floating_point() and t.dtype != dtype:
        return t.to(device=device, dtype=dtype)
    if device != "cpu":
        return t.to(device)
    return t.clone() if copy else t
