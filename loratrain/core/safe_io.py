"""File I/O that never leaves a half-written file and never unpickles by accident.

Every output is written to a temp file (or folder) beside its final path and renamed over it only
when complete and fsynced. Temp names carry a recognisable tag with the host and process id, so a
later run that writes into the same folder can remove what a killed run left behind, and only that.
"""
from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

PICKLE_SUFFIXES = {".ckpt", ".pt", ".pth", ".bin"}
TEMP_TAG = "loratrain-tmp"
_HOST = re.sub(r"[^A-Za-z0-9-]", "-", socket.gethostname())[:40] or "host"
_STALE = re.compile(r"^\..+\." + TEMP_TAG + r"-(?P<host>[A-Za-z0-9-]+)-(?P<pid>\d+)-[0-9a-f]+\.tmp$")
_cleaned: set[Path] = set()


class UnsafeFileError(ValueError):
    """A pickled file was given without the user allowing pickle."""


def temp_name(path: Path) -> Path:
    """`.NAME.loratrain-tmp-HOST-PID-RANDOM.tmp` beside `path`."""
    return path.with_name(f".{path.name}.{TEMP_TAG}-{_HOST}-{os.getpid()}-{secrets.token_hex(4)}.tmp")


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # exists but belongs to someone else
        return True
    return True


def clean_stale_temps(directory: str | Path, force: bool = False) -> list[Path]:
    """Remove temp files/folders of ours in `directory` whose writer (same host) no longer runs.

    Done once per folder per process before the first write into it; returns what was removed.
    """
    directory = Path(directory)
    key = directory.resolve() if directory.exists() else directory
    if key in _cleaned and not force:
        return []
    _cleaned.add(key)
    removed = []
    try:
        entries = list(directory.iterdir())
    except OSError:
        return removed
    for entry in entries:
        m = _STALE.match(entry.name)
        if not m or m.group("host") != _HOST or _alive(int(m.group("pid"))):
            continue
        try:
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry)
            else:
                entry.unlink()
            removed.append(entry)
        except OSError:
            pass  # someone else cleaned it, or it is not ours to remove after all
    return removed


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temp path beside `path`; on success fsync and rename it over `path`; on any error remove it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    clean_stale_temps(path.parent)
    tmp_path = temp_name(path)
    mode = _mode_for(path)
    os.close(os.open(tmp_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode))
    os.chmod(tmp_path, mode)  # exactly the replaced file's mode, whatever the umask
    try:
        try:
            yield tmp_path
            with open(tmp_path, "rb") as fh:
                os.fsync(fh.fileno())
            os.replace(tmp_path, path)
            _fsync_dir(path.parent)
        except OSError as e:
            if e.filename is None and e.errno is not None:  # a failed write names no file: name the one being written
                raise type(e)(e.errno, e.strerror, str(path)) from e
            raise
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


@contextmanager
def atomic_dir(path: str | Path, replace: bool = False) -> Iterator[Path]:
    """A temp folder beside `path`, renamed to `path` when the block succeeds (an existing one replaced if asked)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    clean_stale_temps(path.parent)
    tmp = temp_name(path)
    tmp.mkdir()
    try:
        yield tmp
        if path.exists():
            if not replace:
                raise FileExistsError(f"{path} exists")
            old = temp_name(path)
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
        _fsync_dir(path.parent)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


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


def new_output(path: str | Path, overwrite: bool, what: str = "output") -> Path:
    """The output path of a job, refusing to replace an existing file unless the user said so."""
    from .config import ConfigError

    path = Path(path)
    if path.exists() and not overwrite:
        raise ConfigError(f"{path} exists; pass --overwrite to replace it")
    for parent in path.parents:
        if parent.exists():
            if not parent.is_dir():
                raise ConfigError(f"{what} {path}: {parent} is a file, not a folder")
            break
    return path


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | Path, obj: object) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True))


def save_safetensors(tensors: dict[str, torch.Tensor], path: str | Path, metadata: dict[str, str] | None = None) -> None:
    from safetensors.torch import save as st_save

    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    atomic_write_bytes(path, st_save(tensors, metadata={k: str(v) for k, v in (metadata or {}).items()}))


def read_safetensors_metadata(path: str | Path) -> dict[str, str]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
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

    path = Path(path)
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
