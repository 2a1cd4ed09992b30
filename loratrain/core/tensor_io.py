"""Lazy safetensors reading and streaming safetensors writing, with plain file I/O.

Why not `safe_open`: it memory-maps the file, and every page a merge touches then counts in the
process's resident memory until the end, so a "streaming" merge of two 2 GB files would still show
4 GB of RSS. Here tensors (or slices of them) are read with `preadv` into a reused buffer, and the
output is written front to back: a safetensors header only needs names, dtypes and shapes, all
known from the inputs before the first byte of data is computed.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import struct
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Iterator

import torch

from .precision import dtype_of
from .safe_io import PICKLE_SUFFIXES, UnsafeFileError, atomic_path

DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool,
}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}
MAX_HEADER = 100 * 1024 * 1024
RING_SLOTS = 4
WRITE_QUEUE = 2  # chunks in flight on the writer thread; must stay below RING_SLOTS
RING_BYTES = 16 * 1024 * 1024  # 4M float32 elements: the merge's chunk size


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


class SequentialHash:
    """SHA-256 of a whole file, computed on a worker thread from the bytes the merge reads anyway.

    Reads that continue where hashing stands are hashed from the caller's buffer (no second pass over
    the file). Bytes the merge skips or reads out of order are read by the worker itself, through one
    reused buffer; bytes behind the hash position are ignored. At most MAX_PENDING blocks wait for the
    worker, so memory stays at a few buffers whatever order the merge reads in.
    """

    MAX_PENDING = 4
    GAP_BLOCK = 4 << 20

    def __init__(self, fd: int, size: int) -> None:
        self.fd, self.size = fd, size
        self.sha = hashlib.sha256()
        self.pos = 0  # bytes handed to the worker so far, in file order
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sha256")
        self._pending: deque[Future] = deque()
        self._scratch = bytearray(self.GAP_BLOCK)  # used only on the worker thread

    def _submit(self, fn: Any, *args: Any) -> Future:
        while len(self._pending) >= self.MAX_PENDING:
            self._pending.popleft().result()
        fut = self._pool.submit(fn, *args)
        self._pending.append(fut)
        return fut

    def _read_gap(self, start: int, end: int) -> None:
        view = memoryview(self._scratch)
        while start < end:
            n = os.preadv(self.fd, [view[:min(len(view), end - start)]], start)
            if n <= 0:
                raise ValueError("file shrank while it was being hashed")
            self.sha.update(view[:n])
            start += n

    def offer(self, offset: int, data: memoryview) -> Future | None:
        """Bytes just read at `offset`; the caller keeps them unchanged until the returned future is done."""
        end = offset + len(data)
        if end <= self.pos:
            return None
        if offset > self.pos:
            self._submit(self._read_gap, self.pos, offset)
            self.pos = offset
        fut = self._submit(self.sha.update, data[self.pos - offset:])
        self.pos = end
        return fut

    def finish(self) -> str:
        if self.pos < self.size:
            self._submit(self._read_gap, self.pos, self.size)
            self.pos = self.size
        while self._pending:
            self._pending.popleft().result()
        self._pool.shutdown(wait=True)
        return self.sha.hexdigest()

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)


class LazySafetensors:
    """The header of a .safetensors file, and reads of whole tensors or element ranges on demand."""

    def __init__(self, path: str | Path, what: str = "model") -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"{what} file not found: {self.path}")
        suffix = self.path.suffix.lower()
        if suffix in PICKLE_SUFFIXES:
            raise UnsafeFileError(f"{self.path}: pickled checkpoints can run code when loaded and are never merged; "
                                  "convert it first with `loratrain convert --allow_pickle IN OUT.safetensors`")
        if suffix != ".safetensors":
            raise ValueError(f"{self.path}: unknown model file type {suffix!r} (expected .safetensors)")
        self.size = self.path.stat().st_size
        self._hasher: SequentialHash | None = None
        self._ring: list[torch.Tensor | None] = [None] * RING_SLOTS
        self._ring_hash: list[Future | None] = [None] * RING_SLOTS
        self._ring_next = 0
        self.data_start = 0
        self._fd = os.open(self.path, os.O_RDONLY)
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

    def start_hash(self) -> None:
        """Hash the file while it is read: see `SequentialHash`. Finish with `finish_hash`."""
        self._hasher = SequentialHash(self._fd, self.size)

    def finish_hash(self) -> str:
        assert self._hasher is not None, "start_hash() was not called"
        return self._hasher.finish()

    def keys(self) -> list[str]:
        """Keys in file order, so reads go front to back."""
        return sorted(self.tensors, key=lambda k: self.tensors[k].start)

    def __contains__(self, key: str) -> bool:
        return key in self.tensors

    def read(self, key: str, start: int = 0, count: int | None = None) -> torch.Tensor:
        """Elements [start, start+count) of a tensor, flat (the whole tensor, shaped, when no range is given).

        Ranged reads land in a small ring of reused buffers, so the result is only valid until a few
        more reads of this file: use it (write it out) before reading on.
        """
        info = self.tensors[key]
        whole = count is None and start == 0
        count = info.numel - start if count is None else count
        itemsize = info.dtype.itemsize
        nbytes = count * itemsize
        if whole or nbytes > RING_BYTES:
            slot, buf = None, torch.empty(nbytes, dtype=torch.uint8)
        else:
            slot = self._ring_next
            self._ring_next = (slot + 1) % RING_SLOTS
            if self._ring_hash[slot] is not None:
                self._ring_hash[slot].result()  # hashing of the old contents must finish first
                self._ring_hash[slot] = None
            if self._ring[slot] is None:
                self._ring[slot] = torch.empty(RING_BYTES, dtype=torch.uint8)
            buf = self._ring[slot][:nbytes]
        view = memoryview(buf.numpy())
        offset = info.start + start * itemsize
        got = os.preadv(self._fd, [view], offset) if nbytes else 0
        if got != nbytes:
            raise ValueError(f"{self.path}: short read in tensor {key!r} (file truncated?)")
        pending = self._hasher.offer(offset, view) if self._hasher is not None else None
        if slot is not None:
            self._ring_hash[slot] = pending
        flat = buf.view(info.dtype)
        return flat.reshape(info.shape) if whole else flat

    def close(self) -> None:
        if self._hasher is not None:
            self._hasher.close()
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


class StreamingWriter:
    """Writes a .safetensors file tensor by tensor in the planned order, atomically.

    The header is written first from the plan; each `write` appends bytes of the current tensor and
    the writer checks that every tensor gets exactly its planned size, so a bug can't produce a file
    that loads with shifted data.
    """

    def __init__(self, path: str | Path, plan: list[OutputTensor], metadata: dict[str, str] | None = None) -> None:
        self.path = Path(path)
        self.plan = plan
        self._header = self._encode_header(metadata)
        self.total_bytes = len(self._header) + sum(t.nbytes for t in plan)
        self._index = 0
        self._written = 0
        self._fh: BinaryIO | None = None
        self._ctx = None
        self._out_ring: list[torch.Tensor | None] = [None] * RING_SLOTS
        self._out_next = 0

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
        assert self._fh is not None
        header = self._encode_header(metadata)
        if len(header) != len(self._header):
            raise ValueError("metadata rewrite changed the header size")
        os.pwrite(self._fh.fileno(), header, 0)
        self._header = header

    def __enter__(self) -> "StreamingWriter":
        self._ctx = atomic_path(self.path)
        tmp = self._ctx.__enter__()
        self._fh = open(tmp, "wb", buffering=0)
        self._fh.write(self._header)
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="writer")
        self._pending: list[Future] = []
        return self

    def write(self, data: torch.Tensor) -> None:
        """Append (part of) the current tensor; `data` must already have the planned dtype.

        The bytes go out on a writer thread so the next chunk is read and computed meanwhile; at
        most WRITE_QUEUE chunks are in flight, which the readers' buffer rings allow for.
        """
        assert self._fh is not None
        entry = self.plan[self._index]
        if data.dtype != entry.dtype:
            raise TypeError(f"{entry.name}: got {data.dtype}, planned {entry.dtype}")
        raw = data.detach().contiguous().reshape(-1).view(torch.uint8)
        if self._written + raw.numel() > entry.nbytes:
            raise ValueError(f"{entry.name}: more data than its shape {entry.shape} holds")
        while len(self._pending) >= WRITE_QUEUE:
            self._pending.pop(0).result()
        self._pending.append(self._pool.submit(self._fh.write, memoryview(raw.numpy())))
        self._written += raw.numel()
        if self._written == entry.nbytes:
            self._index += 1
            self._written = 0

    def buffer(self, numel: int, dtype: torch.dtype) -> torch.Tensor:
        """A reusable output buffer that no queued write still refers to."""
        nbytes = numel * dtype.itemsize
        if nbytes > RING_BYTES:
            return torch.empty(numel, dtype=dtype)
        slot = self._out_next
        self._out_next = (slot + 1) % RING_SLOTS
        if self._out_ring[slot] is None:
            self._out_ring[slot] = torch.empty(RING_BYTES, dtype=torch.uint8)
        return self._out_ring[slot][:nbytes].view(dtype)

    def _drain(self) -> None:
        for fut in self._pending:
            fut.result()
        self._pending.clear()
        self._pool.shutdown(wait=True)

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        assert self._fh is not None and self._ctx is not None
        try:
            self._drain()
            if exc_type is None and (self._index != len(self.plan) or self._written):
                raise ValueError(f"{self.path}: only {self._index} of {len(self.plan)} tensors were written")
            if exc_type is None:
                os.fsync(self._fh.fileno())
        except BaseException as err:
            self._fh.close()
            self._ctx.__exit__(type(err), err, err.__traceback__)  # removes the temp file
            raise
        self._fh.close()
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

