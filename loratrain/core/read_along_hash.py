"""Whole-file SHA-256 of a model hashed beside the merge that reads it (A1111 / civitai model hashes).

A merge reads (nearly) every byte of its inputs, and a whole-file hash must see every byte once, in
order. A hash pass of its own, racing the merge over the same files, made a first merge of new
files take more than twice its I/O time. Here a thread per file hashes it from the page cache: the
bytes the reader (`LazySafetensors`) has already read, which it reports window by window, and
beyond them whatever the page cache already holds (a warm cache: the file was just downloaded or
merged before), read with RWF_NOWAIT so the thread never waits for the disk ahead of the reader.
Nothing is read from disk twice, and the SHA-256 runs on other cores while the merge computes.

The thread copies 1 MiB at a time into one buffer (`pread`) rather than hashing the reader's memory
map: measured on a 2 GB file, hashing from a map cost 1.6x the CPU time of copying into a buffer
that stays in the CPU cache (page-table and TLB work), and CPU time is what a first merge on a small
machine is short of.

Whatever the reader does, the digest is that of the whole file: bytes it never reads (the header,
dropped keys) or reads out of order are read by the hash thread itself, and so is any stretch the
reader leaves alone for IDLE seconds (a file a block merge hardly reads), so the hash is not left to
run alone at the end. The reader waits when the hash falls LAG bytes behind it, so the bytes to
hash are still in the page cache even on a machine with little memory.
"""
from __future__ import annotations

import hashlib
import os
import threading
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .tensor_io import LazySafetensors


class HashCancelled(Exception):
    """The hash was cancelled before it was complete (a stopped or failed merge)."""


class ReadAlongHash:
    """SHA-256 of one whole file, following a LazySafetensors' reads; `result()` once the reads are done."""

    BLOCK = 1 << 20  # own reads go through one buffer this size (kept in the CPU cache between copy and hash)
    STEP = 16 << 20  # bytes hashed between looks at the reader's position (and at a cancel)
    LAG = 256 << 20  # the reader waits while the hash is this far behind it
    IDLE = 2.0  # seconds without a new window before the thread reads on without the reader (slow disks: > a window)
    NOWAIT = getattr(os, "RWF_NOWAIT", 0)  # read flag: only what the page cache holds (Linux), 0 where there is none

    def __init__(self, f: LazySafetensors, follow: bool = True) -> None:
        """follow=False: the caller will not read this file; the thread hashes it by its own reads from the start."""
        self.path: Path = f.path
        self.size = f.size
        self._fd = os.dup(f.fileno())  # the same file whatever happens to its path; the thread closes it
        self._cv = threading.Condition()
        self._frontier = 0  # bytes before it have been read by the reader (they are in the page cache)
        self._hashed = 0
        self._alone = not follow  # hash on without waiting for the reader
        self._no_more = False  # the reader is done: hash through to the end
        self._cancelled = False
        self._finished = False
        self._digest: str | None = None
        self._error: BaseException | None = None
        if follow:
            f.on_map(self._feed)
        self._thread = threading.Thread(target=self._run, name=f"sha256 {self.path.name}", daemon=True)
        self._thread.start()

    # ---- the reader's side ---------------------------------------------------------------------
    def _feed(self, start: int, end: int) -> None:
        """The reader mapped bytes [start, end) to read them, so it is done with what lies before them."""
        with self._cv:
            self._alone = False
            if start > self._frontier:
                self._frontier = start
                self._cv.notify_all()
            while self._frontier - self._hashed > self.LAG and not (self._finished or self._cancelled):
                self._cv.wait()

    def result(self) -> str:
        """The hex digest, once the caller has done all its reads (what it skipped is read here)."""
        with self._cv:
            self._no_more = True
            self._cv.notify_all()
        self._thread.join()
        if self._error is not None:
            raise self._error
        assert self._digest is not None
        return self._digest

    def cancel(self) -> None:
        with self._cv:
            self._cancelled = True
            self._cv.notify_all()
        self._thread.join()

    # ---- the hash thread -----------------------------------------------------------------------
    def _limit(self) -> int:
        return self.size if (self._alone or self._no_more) else self._frontier

    def _run(self) -> None:
        sha = hashlib.sha256()
        buf = memoryview(bytearray(self.BLOCK))
        pos = 0  # bytes [0, pos) are hashed
        try:
            while True:
                with self._cv:
                    self._hashed = pos
                    self._cv.notify_all()
                    if self._cancelled:
                        raise HashCancelled(f"{self.path}: hashing was cancelled")
                    if pos >= self.size:
                        break
                    limit = self._limit()
                if pos < limit:  # read by the reader (or to be read by us): in the page cache, or worth the wait
                    pos = self._read(sha, buf, pos, min(limit, pos + self.STEP))
                    continue
                ahead = self._read_cached(sha, buf, pos, min(self.size, pos + self.STEP))
                if ahead > pos:  # ahead of the reader, but the bytes are in memory already (a warm cache)
                    pos = ahead
                    continue
                with self._cv:  # caught up: wait for the reader, or go on alone if it stays away
                    if pos >= self._limit() and not (self._cancelled or self._no_more):
                        if not self._cv.wait(self.IDLE) and pos >= self._limit():
                            self._alone = True
            self._digest = sha.hexdigest()
        except BaseException as err:  # handed to result(); a cancel is expected and reported there only
            self._error = err
        finally:
            os.close(self._fd)
            with self._cv:
                self._finished = True
                self._cv.notify_all()

    def _read_cached(self, sha: hashlib._Hash, buf: memoryview, pos: int, stop: int) -> int:
        """Hash what of bytes [pos, stop) the page cache holds, without waiting for the disk; returns the new pos."""
        while pos < stop and self.NOWAIT:
            try:
                n = os.preadv(self._fd, [buf[:min(len(buf), stop - pos)]], pos, self.NOWAIT)
            except BlockingIOError:
                break  # not in memory: the reader brings it in
            except OSError:
                self.NOWAIT = 0  # this file system cannot tell: only follow the reader
                break
            if n <= 0:
                break
            sha.update(buf[:n])
            pos += n
        return pos

    def _read(self, sha: hashlib._Hash, buf: memoryview, pos: int, stop: int) -> int:
        """Hash bytes [pos, stop) of the file; returns `stop`."""
        while pos < stop:
            try:
                n = os.preadv(self._fd, [buf[:min(len(buf), stop - pos)]], pos)
            except OSError as e:
                raise OSError(e.errno, f"reading it to hash it failed: {e.strerror}", str(self.path)) from None
            if n <= 0:
                raise OSError(f"{self.path}: the file ended at byte {pos} while it was hashed (changed during the merge?)")
            sha.update(buf[:n])  # hashlib releases the GIL on updates this large
            pos += n
        return pos
