"""File output that never leaves a half-written file (reading model files safely is in weights.py).

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
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

from .paths import confine

if TYPE_CHECKING:
    import torch

TEMP_TAG = "loratrain-tmp"
_HOST = re.sub(r"[^A-Za-z0-9-]", "-", socket.gethostname())[:40] or "host"
_STALE = re.compile(r"^\..+\." + TEMP_TAG + r"-(?P<host>[A-Za-z0-9-]+)-(?P<pid>\d+)-[0-9a-f]+\.tmp$")
_cleaned: set[Path] = set()


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
    path = confine(path, "output", write=True)
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
    path = confine(path, "output", write=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    clean_stale_temps(path.parent)
    tmp = temp_name(path)
    tmp.mkdir()
    try:
        yield tmp
        _new_modes(tmp)
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
        return 0o666 & ~_umask()


def _umask() -> int:
    """The process umask, read without changing it where the system tells (setting it, even briefly, would
    give another thread's new file mode 0666)."""
    try:
        with open("/proc/self/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    umask = os.umask(0o022)
    os.umask(umask)
    return umask


def _new_modes(folder: Path) -> None:
    """Everything in a freshly written folder gets the umask's modes: 0666 & ~umask for files, 0777 & ~umask for
    folders. Libraries that write through a private temp file (safetensors' save_file, transformers' save_pretrained)
    leave 0600 files, which other users and services of a shared model folder could not read."""
    umask = _umask()
    os.chmod(folder, 0o777 & ~umask)
    for root, dirs, files in os.walk(folder):
        for name in dirs:
            if not os.path.islink(os.path.join(root, name)):
                os.chmod(os.path.join(root, name), 0o777 & ~umask)
        for name in files:
            if not os.path.islink(os.path.join(root, name)):
                os.chmod(os.path.join(root, name), 0o666 & ~umask)


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
    from .errors import ConfigError

    path = Path(path)
    if path.exists() and not overwrite:
        raise ConfigError(f"{path} exists; pass --overwrite to replace it")
    for parent in path.parents:
        if parent.exists():
            if not parent.is_dir():
                raise ConfigError(f"{what} {path}: {parent} is a file, not a folder")
            break
    return path


#: the kinds of output `--overwrite` may replace, each only by an output of the same kind
OUTPUT_KINDS = {"safetensors": "a .safetensors file", "diffusers": "a diffusers folder (with model_index.json)",
                "onnx": "an .onnx / .dfm file"}


def _real(path: str | Path) -> Path:
    return Path(os.path.realpath(os.path.expanduser(str(path))))


def output_conflicts(output: str | Path, inputs: Iterable[str | Path]) -> list[str]:
    """Why `output` cannot be written by a job reading `inputs`: it is one of them, lies inside one (a diffusers
    folder) or contains one. Real paths are compared (symlinks followed; a hard link is the same file too)."""
    if not output:
        return []
    out_real, out = _real(output), []
    for inp in inputs:
        if not inp:
            continue
        in_real = _real(inp)
        same = out_real == in_real
        if not same and out_real.exists() and in_real.exists():
            try:
                same = os.path.samefile(out_real, in_real)
            except OSError:
                pass
        spelled = {os.path.abspath(os.path.expanduser(str(p))) for p in (output, inp)}
        via = f" (both are {in_real})" if len(spelled) > 1 else ""  # a symlink or another spelling of the same path
        if same and out_real != in_real:
            via = f" ({out_real} and {in_real} are hard links to one file)"
        if same:
            out.append(f"{output} is the input {inp}{via}; writing it would destroy the input: choose another output")
        elif in_real in out_real.parents:
            out.append(f"{output} lies inside the input {inp}; writing it would change the input: choose an output outside it")
        elif out_real in in_real.parents:
            out.append(f"{output} contains the input {inp}; replacing it would delete the input: choose another output")
    return out


def _looks_safetensors(path: Path) -> bool:
    """A safetensors header: 8 bytes of little-endian length, then a JSON object of that length within the file."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(9)
            size = os.fstat(fh.fileno()).st_size
    except OSError:
        return False
    return len(head) == 9 and int.from_bytes(head[:8], "little") <= size - 8 and head[8:9] == b"{"


def replaceable(output: str | Path, kind: str) -> str | None:
    """None when `output` does not exist, or is an output of `kind` that --overwrite may replace; else why not (an
    unrelated file or folder is never replaced)."""
    path = Path(os.path.expanduser(str(output)))
    if not path.exists() and not path.is_symlink():
        return None
    if kind == "diffusers":
        if path.is_dir() and (path / "model_index.json").is_file():
            return None
        found = "a folder without model_index.json" if path.is_dir() else "a file"
    elif kind == "safetensors":
        if path.is_file() and _looks_safetensors(path):
            return None
        found = "a folder" if path.is_dir() else "a file that is not safetensors"
    elif kind == "onnx":
        if path.is_file() and path.suffix.lower() in (".onnx", ".dfm"):
            return None
        found = "a folder" if path.is_dir() else "a file that is not .onnx / .dfm"
    else:
        raise ValueError(f"unknown output kind {kind!r}; one of {', '.join(OUTPUT_KINDS)}")
    return (f"{output} exists and is {found}; --overwrite replaces only {OUTPUT_KINDS[kind]}: "
            "move it away or choose another output")


def output_problems(field: str, output: str | Path, inputs: Iterable[str | Path], kind: str,
                    overwrite: bool) -> list[tuple[str, str]]:
    """The (field, message) problems of writing `output` (of `kind`) from `inputs`, found before any work: an output
    that is, lies inside or contains an input; an existing one without --overwrite; one --overwrite may not replace."""
    if not output:
        return []
    out = [(field, m) for m in output_conflicts(output, inputs)]
    if out:
        return out
    path = Path(os.path.expanduser(str(output)))
    if path.exists() or path.is_symlink():
        if not overwrite:
            out.append((field, f"{output} exists; pass --overwrite to replace it"))
        elif (why := replaceable(path, kind)) is not None:
            out.append((field, why))
    return out


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
    meta = {k: str(v) for k, v in (metadata or {}).items()}
    if not tensors:  # the safetensors writer emits an unreadable header for no tensors with metadata: write ours
        import json
        import struct

        head = json.dumps({"__metadata__": meta} if meta else {}, separators=(",", ":")).encode()
        head += b" " * (-len(head) % 8)
        atomic_write_bytes(path, struct.pack("<Q", len(head)) + head)
        return
    atomic_write_bytes(path, st_save(tensors, metadata=meta))
