"""Lazy safetensors reading and streaming safetensors writing.

Why not `safe_open`: it maps the whole file and keeps it mapped, so every page a merge touches counts
in the process's resident memory until the end (a "streaming" merge of two 2 GB files would show
4 GB of RSS). Here reads go through a sliding map window: a tensor returned views the file's page
cache directly (no copy) and the window is unmapped once no tensor views it. Writes go front to back
from a few reused buffers on a writer thread: a safetensors header needs only names, dtypes and
shapes, all known before the first byte of data is computed, so the output's size is claimed first.
"""
from __future__ import annotations

import errno
import json
import math
import mmap
import os
import struct
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .errors import UnsafeFileError
from .paths import confine
from .precision import dtype_of
from .safe_io import atomic_path
from .weights import PICKLE_SUFFIXES

DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool,
}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}
MAX_HEADER = 100 * 1024 * 1024
PAGE = mmap.ALLOCATIONGRANULARITY


WINDOW = 32 << 20  # bytes mapped at a time: few maps (each map and unmap is costly), little resident memory


class MapWindow:
    """A sliding read-only memory map over one file: reads inside the current window reuse it.

    Mapping and unmapping are the costly part of memory-mapped I/O (an unmap interrupts every core),
    so a sequential pass maps one WINDOW at a time rather than one map per tensor. A window is
    unmapped as soon as no tensor views it any more, which keeps resident memory to a few windows.
    Maps are private (MAP_PRIVATE): a tensor on them may be written to without touching the file.
    """

    def __init__(self, fd: int, size: int) -> None:
        self.fd, self.size = fd, size
        self._map: mmap.mmap | None = None
        self._start = self._end = 0
        self.listener: Callable[[int, int], None] | None = None  # told of each new window, before it is read

    def get(self, offset: int, nbytes: int) -> tuple[mmap.mmap, int]:
        """The map holding bytes [offset, offset+nbytes) and where they start in it."""
        if self._map is None or not (self._start <= offset and offset + nbytes <= self._end):
            start = offset - offset % PAGE
            end = min(self.size, max(offset + nbytes, start + WINDOW))
            self._map = mmap.mmap(self.fd, end - start, offset=start, access=mmap.ACCESS_COPY)
            if hasattr(mmap, "MADV_WILLNEED"):
                try:
                    self._map.madvise(mmap.MADV_WILLNEED)  # read the window ahead in one go
                except OSError:
                    pass
            self._start, self._end = start, end
            if self.listener is not None:
                self.listener(start, end)
        return self._map, offset - self._start

    def release(self) -> None:
        self._map = None


def tensor_on(m: mmap.mmap, delta: int, nbytes: int, dtype: torch.dtype) -> torch.Tensor:
    """A flat tensor viewing `nbytes` of `m` from `delta`; it keeps the mapping alive for as long as it lives."""
    return torch.frombuffer(m, dtype=torch.uint8, count=nbytes, offset=delta).view(dtype)


@dataclass(frozen=True)
class TensorInfo:
    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int  # absolute byte offset in the file
    nbytes: int

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def is_float(self) -> bool:
        return self.dtype.is_floating_point


class LazySafetensors:
    """The header of a .safetensors file, and reads of whole tensors or element ranges on demand."""

    def __init__(self, path: str | Path, what: str = "model") -> None:
        self.path = confine(path, f"{what} file")
        if not self.path.is_file():
            raise FileNotFoundError(f"{what} file not found: {self.path}")
        suffix = self.path.suffix.lower()
        if suffix in PICKLE_SUFFIXES:
            raise UnsafeFileError(f"{self.path}: pickled checkpoints can run code when loaded and are never merged; "
                                  "convert it first with `loratrain convert --allow_pickle IN OUT.safetensors`")
        if suffix != ".safetensors":
            raise ValueError(f"{self.path}: unknown model file type {suffix!r} (expected .safetensors)")
        self.size = self.path.stat().st_size
        self.data_start = 0
        self._fd = os.open(self.path, os.O_RDONLY)
        self._window = MapWindow(self._fd, self.size)
        try:
            self.tensors, self.metadata = self._read_header()
        except Exception:
            os.close(self._fd)
            raise

    def _read_header(self) -> tuple[dict[str, TensorInfo], dict[str, str]]:
        head = os.pread(self._fd, 8, 0)
        if len(head) < 8:
            raise ValueError(f"{self.path}: file too short to be .safetensors")
        (n,) = struct.unpack("<Q", head)
        if n > MAX_HEADER or 8 + n > self.size:
            raise ValueError(f"{self.path}: not a readable .safetensors file (bad header length)")
        try:
            header = json.loads(os.pread(self._fd, n, 8))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ValueError(f"{self.path}: not a readable .safetensors file ({e})") from None
        meta = header.pop("__metadata__", None) or {}
        base = self.data_start = 8 + n
        out: dict[str, TensorInfo] = {}
        for name, entry in header.items():
            dtype = DTYPES.get(entry.get("dtype"))
            if dtype is None:
                raise ValueError(f"{self.path}: tensor {name!r} has unsupported dtype {entry.get('dtype')!r}")
            begin, end = entry["data_offsets"]
            if base + end > self.size:
                raise ValueError(f"{self.path}: tensor {name!r} lies past the end of the file (truncated download?)")
            out[name] = TensorInfo(name, dtype, tuple(entry["shape"]), base + begin, end - begin)
        return out, {str(k): str(v) for k, v in meta.items()}

    def fileno(self) -> int:
        return self._fd

    def on_map(self, listener: Callable[[int, int], None]) -> None:
        """Call `listener(start, end)` when a window of bytes [start, end) is mapped, before any read from it, so
        the reads before it are done: a whole-file hash follows the reads this way (core/read_along_hash.py).
        The listener may block (to hold the reader back)."""
        self._window.listener = listener

    def keys(self) -> list[str]:
        """Keys in file order, so reads go front to back."""
        return sorted(self.tensors, key=lambda k: self.tensors[k].start)

    def __contains__(self, key: str) -> bool:
        return key in self.tensors

    def read(self, key: str, start: int = 0, count: int | None = None) -> torch.Tensor:
        """Elements [start, start+count) of a tensor, flat (the whole tensor, shaped, when no range is given).

        The result views a memory map of just those bytes (zero copy); drop it when done, and the
        mapping goes with it. Bytes at an offset not aligned to the dtype are copied instead.
        """
        info = self.tensors[key]
        whole = count is None and start == 0
        count = info.numel - start if count is None else count
        itemsize = info.dtype.itemsize
        nbytes = count * itemsize
        offset = info.start + start * itemsize
        if nbytes == 0:
            flat = torch.empty(0, dtype=info.dtype)
        elif offset % itemsize:
            flat = self._copy(offset, nbytes).view(info.dtype)
        else:
            m, delta = self._window.get(offset, nbytes)
            flat = tensor_on(m, delta, nbytes, info.dtype)
        return flat.reshape(info.shape) if whole else flat

    def _copy(self, offset: int, nbytes: int) -> torch.Tensor:
        buf = torch.empty(nbytes, dtype=torch.uint8)
        view = memoryview(buf.numpy())
        if os.preadv(self._fd, [view], offset) != nbytes:
            raise ValueError(f"{self.path}: short read at byte {offset} (file truncated?)")
        return buf

    def close(self) -> None:
        self._window.release()
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __enter__(self) -> "LazySafetensors":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass


@dataclass(frozen=True)
class OutputTensor:
    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return self.dtype.itemsize * math.prod(self.shape)


class _BufferedSink:
    """Bytes appended through the page cache by `pwrite` on a writer thread (at most QUEUE in flight)."""

    QUEUE = 2

    def __init__(self, fd: int, pool: ThreadPoolExecutor) -> None:
        self.fd, self.pool = fd, pool
        self.pending: deque[Future] = deque()

    def append(self, data: memoryview, offset: int) -> None:
        """`data` must stay unchanged until QUEUE more appends have been made (the writer's buffer ring ensures it)."""
        while len(self.pending) >= self.QUEUE:
            self.pending.popleft().result()
        self.pending.append(self.pool.submit(_pwrite_all, self.fd, data, offset))

    def patch(self, data: bytes, offset: int) -> None:
        self.drain()
        _pwrite_all(self.fd, memoryview(data), offset)

    def drain(self) -> None:
        while self.pending:
            self.pending.popleft().result()

    def finish(self) -> None:
        self.drain()
        os.fdatasync(self.fd)


class _DirectSink:
    """Bytes appended with O_DIRECT in whole aligned blocks: no page cache to fill, nothing left to flush.

    In this project's measurements, allocating page-cache pages for a new multi-GB file was the slowest
    and noisiest part of a merge; direct writes go to disk at its own speed while the next block is
    computed. Bytes are copied into one of a few page-aligned staging blocks; a full block is written
    on the writer thread. The unaligned tail (and later header patches) go through the page cache.
    """

    BLOCK = 16 << 20
    SLOTS = 3
    ALIGN = 4096

    def __init__(self, dfd: int, fd: int, pool: ThreadPoolExecutor) -> None:
        self.dfd, self.fd, self.pool = dfd, fd, pool
        self.blocks = [mmap.mmap(-1, self.BLOCK) for _ in range(self.SLOTS)]  # anonymous maps are page-aligned
        self.busy: list[Future | None] = [None] * self.SLOTS
        self.slot = 0
        self.block_start = 0  # file offset of the block being filled
        self.fill = 0

    def append(self, data: memoryview, offset: int) -> None:
        assert offset == self.block_start + self.fill, "direct writes must be sequential"
        data = data.cast("B")
        while data:
            n = min(len(data), self.BLOCK - self.fill)
            memoryview(self.blocks[self.slot])[self.fill:self.fill + n] = data[:n]
            self.fill += n
            data = data[n:]
            if self.fill == self.BLOCK:
                self._submit(self.BLOCK)

    def _submit(self, nbytes: int) -> None:
        view = memoryview(self.blocks[self.slot])[:nbytes]
        self.busy[self.slot] = self.pool.submit(_pwrite_all, self.dfd, view, self.block_start)
        self.slot = (self.slot + 1) % self.SLOTS
        if self.busy[self.slot] is not None:
            self.busy[self.slot].result()  # that staging block is reused only once its write is done
            self.busy[self.slot] = None
        self.block_start += nbytes
        self.fill = 0

    def patch(self, data: bytes, offset: int) -> None:
        if offset >= self.block_start and offset + len(data) <= self.block_start + self.fill:
            at = offset - self.block_start  # still in the block being filled
            memoryview(self.blocks[self.slot])[at:at + len(data)] = data
            return
        self.drain()
        _pwrite_all(self.fd, memoryview(data), offset)

    def drain(self) -> None:
        for i, fut in enumerate(self.busy):
            if fut is not None:
                fut.result()
                self.busy[i] = None

    def finish(self) -> None:
        aligned = self.fill - self.fill % self.ALIGN
        tail = memoryview(self.blocks[self.slot])[aligned:self.fill]
        tail_at = self.block_start + aligned
        if aligned:
            self._submit(aligned)
        if len(tail):
            _pwrite_all(self.fd, tail, tail_at)
        self.drain()

    def close(self) -> None:
        for block in self.blocks:
            block.close()


def _pwrite_all(fd: int, data: memoryview, offset: int) -> None:
    while data:
        n = os.pwrite(fd, data, offset)
        data, offset = data[n:], offset + n


def _open_direct(path: Path) -> int | None:
    """An O_DIRECT descriptor, or None where the platform or file system has none (tmpfs, macOS)."""
    flag = getattr(os, "O_DIRECT", 0)
    if not flag:
        return None
    try:
        return os.open(path, os.O_WRONLY | flag)
    except OSError:
        return None


class StreamingWriter:
    """Writes a .safetensors file tensor by tensor in the planned order, atomically.

    The header goes first, from the plan; then `buffer()` lends one of a few reused buffers to compute
    the next chunk into and `write()` appends it, with direct I/O where the file system supports it
    (else through the page cache on a writer thread), so writing overlaps computing the next chunk.
    The file's whole size is claimed up front, so a disk too small fails before any work. The writer
    checks that every tensor gets exactly its planned size, so a bug can't produce a file that loads
    with shifted data.
    """

    RING = 4  # lent buffers; more than _BufferedSink.QUEUE, so a lent buffer is never still being written
    BUFFER_BYTES = 16 << 20

    def __init__(self, path: str | Path, plan: list[OutputTensor], metadata: dict[str, str] | None = None,
                 direct: bool = True) -> None:
        self.path = Path(path)
        self.plan = plan
        self.direct = direct
        self._header = self._encode_header(metadata)
        self.total_bytes = len(self._header) + sum(t.nbytes for t in plan)
        self._index = 0
        self._written = 0
        self._pos = len(self._header)
        self._fd = -1
        self._dfd: int | None = None
        self._ctx: Any = None
        self._ring: list[torch.Tensor | None] = [None] * self.RING
        self._next = 0
        self._pool: ThreadPoolExecutor | None = None
        self._sink: _BufferedSink | _DirectSink | None = None

    def _encode_header(self, metadata: dict[str, str] | None) -> bytes:
        header: dict[str, object] = {}
        if metadata:
            header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
        offset = 0
        for t in self.plan:
            header[t.name] = {"dtype": DTYPE_NAMES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + t.nbytes]}
            offset += t.nbytes
        raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
        raw += b" " * (-len(raw) % 8)
        return struct.pack("<Q", len(raw)) + raw

    def rewrite_metadata(self, metadata: dict[str, str]) -> None:
        """Replace the metadata with values known only at the end (hashes); the header size must not change."""
        assert self._sink is not None
        header = self._encode_header(metadata)
        if len(header) != len(self._header):
            raise ValueError("metadata rewrite changed the header size")
        self._sink.patch(header, 0)
        self._header = header

    def __enter__(self) -> "StreamingWriter":
        self._ctx = atomic_path(self.path)
        tmp = self._ctx.__enter__()
        self._fd = os.open(tmp, os.O_WRONLY)
        try:
            os.posix_fallocate(self._fd, 0, self.total_bytes)  # a disk too small fails now, before any work
        except AttributeError:  # no posix_fallocate on this platform
            pass
        except OSError as e:
            if e.errno not in (errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                self._abort(e)
                raise
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="writer")
        self._dfd = _open_direct(tmp) if self.direct else None
        self._sink = _DirectSink(self._dfd, self._fd, self._pool) if self._dfd is not None else _BufferedSink(self._fd, self._pool)
        self._sink.append(memoryview(self._header), 0)
        self._skip_empty()
        return self

    def _entry(self, nbytes: int, dtype: torch.dtype) -> OutputTensor:
        if self._index >= len(self.plan):
            raise ValueError(f"{self.path}: more data than the {len(self.plan)} planned tensors")
        entry = self.plan[self._index]
        if dtype != entry.dtype:
            raise TypeError(f"{entry.name}: got {dtype}, planned {entry.dtype}")
        if self._written + nbytes > entry.nbytes:
            raise ValueError(f"{entry.name}: more data than its shape {entry.shape} holds")
        return entry

    def buffer(self, numel: int, dtype: torch.dtype) -> torch.Tensor:
        """A reusable tensor for the next chunk (no pending write still refers to it): fill it, then `write` it."""
        nbytes = numel * dtype.itemsize
        if nbytes > self.BUFFER_BYTES:
            return torch.empty(numel, dtype=dtype)
        slot = self._next
        self._next = (slot + 1) % self.RING
        if self._ring[slot] is None:
            self._ring[slot] = torch.empty(self.BUFFER_BYTES, dtype=torch.uint8)
        return self._ring[slot][:nbytes].view(dtype)

    def write(self, data: torch.Tensor) -> None:
        """Append (part of) the current tensor; `data` must already have the planned dtype."""
        assert self._sink is not None
        data = data.detach().reshape(-1)
        nbytes = data.numel() * data.dtype.itemsize
        entry = self._entry(nbytes, data.dtype)
        if nbytes:
            self._sink.append(memoryview(data.contiguous().view(torch.uint8).numpy()), self._pos)
        self._pos += nbytes
        self._written += nbytes
        if self._written == entry.nbytes:
            self._index += 1
            self._written = 0
            self._skip_empty()

    def flush_async(self) -> None:
        """Start getting the data written so far to disk while the caller does something else."""
        if isinstance(self._sink, _BufferedSink):
            assert self._pool is not None
            self._sink.pending.append(self._pool.submit(os.fdatasync, self._fd))

    def _skip_empty(self) -> None:
        while self._index < len(self.plan) and self.plan[self._index].nbytes == 0:
            self._index += 1

    def _close_fds(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
        if isinstance(self._sink, _DirectSink):
            self._sink.close()
        for fd in (self._dfd, self._fd):
            if fd is not None and fd >= 0:
                os.close(fd)
        self._fd, self._dfd = -1, None

    def _abort(self, err: BaseException) -> None:
        self._close_fds()
        self._ctx.__exit__(type(err), err, err.__traceback__)  # removes the temp file (and names the path)

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        try:
            if exc_type is None:
                if self._index != len(self.plan) or self._written:
                    raise ValueError(f"{self.path}: only {self._index} of {len(self.plan)} tensors were written")
                assert self._sink is not None
                self._sink.finish()
                os.fsync(self._fd)
            elif self._sink is not None:
                try:
                    self._sink.drain()
                except Exception:
                    pass  # the error that brought us here is the one to report
        except BaseException as err:
            self._abort(err)
            raise
        self._close_fds()
        self._ctx.__exit__(exc_type, exc, tb)


def out_dtype(dtype: torch.dtype, precision: str) -> torch.dtype:
    """The output dtype of a tensor: `auto` keeps it, integer tensors are never cast."""
    if not dtype.is_floating_point or precision == "auto":
        return dtype
    return dtype_of(precision)


def chunks(numel: int, size: int) -> Iterator[tuple[int, int]]:
    """(start, count) ranges covering numel elements."""
    for start in range(0, numel, size):
        yield start, min(size, numel - start)

