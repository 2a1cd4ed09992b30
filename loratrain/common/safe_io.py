"""File I/O that never leaves a half-written file and never unpickles by accident."""
from __future__ import annotations

import json
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import torch
from safetensors import safe_open
from safetensors.torch import save as st_save

PICKLE_SUFFIXES = {".ckpt", ".pt", ".pth", ".bin"}


class UnsafeFileError(ValueError):
    """A pickled file was given without the user allowing pickle."""


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temp path beside `path`; on success fsync and rename it over `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    os.chmod(tmp_path, _mode_for(path))  # mkstemp makes 0600; the result should look like any other file
    try:
        yield tmp_path
        with open(tmp_path, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp_path, path)
        _fsync_dir(path.parent)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def _mode_for(path: Path) -> int:
    """The replaced file's permissions, or the umask default for a new file."""
    try:
        return path.stat().st_mode & 0o7777
    except FileNotFoundError:
        umask = os.umask(0)
        os.umask(umask)
        return 0o666 & ~umask


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def new_output(path: str | Path, overwrite: bool) -> Path:
    """The output path of a job, refusing to replace an existing file unless the user said so."""
    from .config import ConfigError

    path = Path(path)
    if path.exists() and not overwrite:
        raise ConfigError(f"{path} exists; pass --overwrite to replace it")
    return path


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | Path, obj: object) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True))


def save_safetensors(tensors: dict[str, torch.Tensor], path: str | Path, metadata: dict[str, str] | None = None) -> None:
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    atomic_write_bytes(path, st_save(tensors, metadata={k: str(v) for k, v in (metadata or {}).items()}))


def read_safetensors_metadata(path: str | Path) -> dict[str, str]:
    with safe_open(str(path), framework="pt") as f:
        return dict(f.metadata() or {})


def load_state_dict(path: str | Path, allow_pickle: bool = False, device: str = "cpu") -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Load tensors and metadata; pickled files only when allowed, and then weights-only."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"model file not found: {path}")
    if path.suffix.lower() == ".safetensors":
        try:
            with safe_open(str(path), framework="pt", device=device) as f:
                meta = dict(f.metadata() or {})
                return {k: f.get_tensor(k) for k in f.keys()}, meta
        except Exception as e:  # safetensors raises several types for a bad header
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
        return {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}, {}
    raise ValueError(f"{path}: unknown model file type {path.suffix!r} (expected .safetensors)")
