"""Frames in and out of a swap: a video, a frame folder or one image in; a video (segment by segment, then
joined with the source's audio), a frame folder or one image out, each labelled; and the resume state.

A video is encoded in segments of `segment_frames` frames, each written to a temp file and renamed when
complete, into `.NAME.swap-parts/` beside the output. A stopped or killed swap keeps every finished segment
and the tracker state at its end; the next run with the same options starts at the first missing segment.
Only when every segment exists are they joined (stream copy, no re-encode) with the source's audio into a
temp file renamed over the output: the final path never holds a broken video.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from loratrain.core import paths
from loratrain.core.errors import ConfigError
from loratrain.core.images import ImageReadError, list_images, open_image, to_rgb_on_white
from loratrain.core.safe_io import atomic_path, atomic_write_json, temp_name
from loratrain.core.video import SAFE_INPUT, VIDEO_INPUT, read_video, video_input

from ..extract.config import VIDEO_EXTENSIONS
from .label import save_labelled_image, video_metadata_args

if TYPE_CHECKING:
    from .config import SwapConfig

MUXERS = {".mp4": "mp4", ".m4v": "mp4", ".mov": "mov", ".mkv": "matroska", ".avi": "avi"}


@dataclass
class Source:
    kind: str                    # video, frames or image
    path: Path
    fps: float
    size: tuple[int, int]        # (w, h)
    count: int                   # frames in the file or folder (estimate for a video)
    audio: bool = False
    files: list[Path] = field(default_factory=list)

    def frame_name(self, index: int) -> str:
        return self.files[index].stem if self.files else f"frame_{index:06d}"

    def source_name(self, index: int) -> str:
        """The name extraction recorded for this frame (to match a dst faceset)."""
        return self.files[index].name if self.files else f"{self.path.name}#{index:06d}"

    def frames(self, first: int, end: int) -> Iterator[tuple[int, np.ndarray]]:
        """(index, RGB uint8) from `first` up to (not including) `end` (0: to the last frame)."""
        if self.kind == "video":
            clip = read_video(self.path, start=first / self.fps if first else 0.0)
            for i, rgb in enumerate(clip.frames, start=first):
                if end and i >= end:
                    clip.frames.close()  # type: ignore[attr-defined]
                    break
                yield i, rgb
            return
        stop = min(end or len(self.files), len(self.files))
        for i in range(first, stop):
            try:
                with open_image(self.files[i]) as img:
                    rgb = np.asarray(to_rgb_on_white(img))
            except ImageReadError as e:
                raise ConfigError(f"frame {self.files[i]}: {e}") from None
            if (rgb.shape[1], rgb.shape[0]) != self.size:
                raise ConfigError(f"frame {self.files[i]} is {rgb.shape[1]}x{rgb.shape[0]}, the others {self.size[0]}x{self.size[1]}")
            yield i, rgb


def open_source(path: str | Path, fps: float = 0.0) -> Source:
    """Probe the input before any model loads: a video's size, rate and audio; a frame folder's common size."""
    path = Path(path)
    if path.is_file() and path.suffix.lower() in VIDEO_EXTENSIONS:
        clip = read_video(path)
        clip.frames.close()  # type: ignore[attr-defined]
        return Source("video", path, fps or clip.fps or 25.0, clip.size, clip.estimated_frames, bool(clip.audio_codec))
    files = [path] if path.is_file() else list_images(path)
    if not files:
        raise ConfigError(f"input {path}: no images or video found")
    from PIL import Image

    sizes = {}
    for f in files:
        try:
            with Image.open(f) as img:
                sizes[f] = img.size
        except OSError as e:
            raise ConfigError(f"frame {f}: cannot read it as an image ({e})") from None
    first = sizes[files[0]]
    odd = [f for f in files if sizes[f] != first]
    if odd:
        raise ConfigError(f"frame folder {path} mixes sizes: {files[0].name} is {first[0]}x{first[1]}, {odd[0].name} is "
                          f"{sizes[odd[0]][0]}x{sizes[odd[0]][1]} ({len(odd)} frame(s) differ); a swap keeps one frame size")
    return Source("image" if path.is_file() else "frames", path, fps or 25.0, first, len(files), False, files)


def fingerprint(cfg: SwapConfig, fields: dict) -> str:
    """What makes two runs the same swap: every option that changes a pixel, and the model's and input's identity."""
    data = dict(fields)
    for name, value in (("model", cfg.model_file), ("input", cfg.input)):  # the model: --model's file, or --swapper's
        p = Path(value)
        st = p.stat()
        data[f"{name}_id"] = [p.name, st.st_size, st.st_mtime_ns] if p.is_file() else [p.name, sorted(x.name for x in p.iterdir())]
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()[:16]


SEGMENT = re.compile(r"seg_\d{5}\.mp4")  # the names VideoSink gives its segments


class ResumeState:
    """`state.json` of a parts folder: which frames are done and the tracker state after them."""

    def __init__(self, folder: Path, key: str, name: str = "state.json") -> None:
        self.folder, self.key = folder, key
        self.path = folder / name
        self.next_frame: int | None = None
        self.smoother: dict = {}
        self.segments: list[str] = []

    def load(self, overwrite: bool, what: str) -> bool:
        """True when a stopped run of this same swap can be continued."""
        if not self.path.exists():
            return False
        try:
            data = json.loads(self.path.read_text())
        except ValueError:
            data = {}
        if data.get("key") != self.key:
            if not overwrite:
                raise ConfigError(f"{what} holds a stopped swap with other options, model or input; pass --overwrite "
                                  "to discard it and start again")
            return False
        segments = data.get("segments", [])
        bad = [s for s in segments if not isinstance(s, str) or not SEGMENT.fullmatch(s) or
               not paths.within(Path(os.path.realpath(self.folder / s)), Path(os.path.realpath(self.folder)))]
        if not isinstance(segments, list) or bad or not isinstance(data.get("next_frame"), int):
            # the state is input like any other file: it may name only the segments a swap writes, in its own folder
            raise ConfigError(f"{self.path}: not a swap's resume state (it names {str(bad[:1] or segments)[:80]}); delete "
                              f"{self.folder} to start again")
        self.next_frame, self.smoother, self.segments = data["next_frame"], data.get("smoother", {}), segments
        return True

    def save(self, next_frame: int, smoother: dict) -> None:
        self.next_frame, self.smoother = next_frame, smoother
        atomic_write_json(self.path, {"key": self.key, "next_frame": next_frame, "smoother": smoother, "segments": self.segments})


class VideoSink:
    """Segments into the parts folder, then one join with audio and the label tags."""

    def __init__(self, final: Path, parts: Path, fps: float, size: tuple[int, int], crf: int) -> None:
        self.final, self.parts, self.fps, self.size, self.crf = final, parts, fps, size, crf
        self.writer = None
        self.tmp: str | None = None  # the open segment's temp name in the parts folder
        self.segment = ""
        self.held: paths.HeldDir | None = None  # the parts folder, opened once: ffmpeg writes into it by fd

    def open(self, name: str) -> None:
        import imageio_ffmpeg

        if self.held is None:
            self.held = paths.HeldDir(self.parts, "swap segments folder")
        self.segment, self.tmp = name, temp_name(self.parts / name).name
        self.writer = imageio_ffmpeg.write_frames(
            self.held.path(self.tmp), self.size, fps=self.fps, codec="libx264", quality=None, macro_block_size=2,
            pix_fmt_in="bgr24", ffmpeg_log_level="error", output_params=["-crf", str(self.crf), "-f", "mp4"])
        self.writer.send(None)

    def write(self, bgr: np.ndarray) -> None:
        self.writer.send(np.ascontiguousarray(bgr))  # type: ignore[union-attr]

    def close(self) -> str:
        """Finish the open segment: fsync and rename it into place; returns its name."""
        self.writer.close()  # type: ignore[union-attr]
        self.writer = None
        self.held.fsync(self.tmp)  # type: ignore[union-attr, arg-type]
        self.held.replace(self.tmp, self.segment)  # type: ignore[union-attr, arg-type]
        self.tmp = None
        return self.segment

    def abort(self) -> None:
        if self.writer is not None:
            try:
                self.writer.close()
            except Exception:  # noqa: BLE001 - ffmpeg may already be gone
                pass
            self.writer = None
        if self.tmp is not None and self.held is not None:
            self.held.unlink(self.tmp)
        self.tmp = None
        if self.held is not None:
            self.held.close()
            self.held = None

    def join(self, segments: list[str], source: Source, first: int, frames: int, model: str, signer: object = None) -> None:
        """Stream-copy the segments, add the source's audio for the swapped range, tag the container."""
        import imageio_ffmpeg

        if not all(SEGMENT.fullmatch(s) for s in segments):
            raise ValueError(f"{self.parts}: unexpected segment names {segments[:3]}")
        parts = self.held or paths.HeldDir(self.parts, "swap segments folder")  # ffmpeg reads and writes by fd, never by a path
        parts.write_text("segments.txt", "".join(f"file '{s}'\n" for s in segments))  # names beside the list (safe mode)
        cmd = [imageio_ffmpeg.get_ffmpeg_exe(), "-hide_banner", "-loglevel", "error", "-y",
               *SAFE_INPUT, "-f", "concat", "-safe", "1", "-i", parts.path("segments.txt")]
        audio = source.kind == "video" and source.audio
        if audio:
            cmd += [*VIDEO_INPUT, "-ss", f"{first / source.fps:.6f}", "-t", f"{frames / source.fps:.6f}", "-i",
                    str(video_input(source.path))]
        cmd += ["-map", "0:v:0"] + (["-map", "1:a:0", "-c:a", "aac", "-b:a", "192k"] if audio else [])
        cmd += ["-c:v", "copy", *video_metadata_args(model), "-f", MUXERS.get(self.final.suffix.lower(), "mp4")]
        if MUXERS.get(self.final.suffix.lower(), "mp4") in ("mp4", "mov"):
            cmd += ["-movflags", "+faststart+use_metadata_tags"]
        out = paths.HeldDir(self.final.parent, "output folder")
        try:
            with atomic_path(self.final) as tmp:
                done = subprocess.run([*cmd, out.path(tmp.name)], capture_output=True, text=True)
                if done.returncode:
                    raise RuntimeError(f"ffmpeg could not join the segments into {self.final}: {done.stderr.strip()[-400:]}")
                _sign_in_place(tmp, self.final, signer)
        finally:
            out.close()
            parts.close()
            self.held = None
        shutil.rmtree(self.parts, ignore_errors=True)


def _sign_in_place(tmp: Path, final: Path, signer: object) -> None:
    """Replace the finished temp file by its C2PA-signed copy (when signing was asked for)."""
    if signer is None:
        return
    signed = temp_name(final)
    try:
        signer.sign(tmp, signed, final.suffix, final.name)  # type: ignore[attr-defined]
        os.replace(signed, tmp)
    finally:
        signed.unlink(missing_ok=True)


def write_frame_image(folder: Path, name: str, bgr: np.ndarray, model: str, signer: object = None) -> Path:
    """One labelled PNG frame, atomically."""
    target = folder / f"{name}.png"
    with atomic_path(target) as tmp:
        save_labelled_image(tmp, bgr, model, "PNG")
        _sign_in_place(tmp, target, signer)
    return target


def write_image(path: Path, bgr: np.ndarray, model: str, signer: object = None) -> None:
    with atomic_path(path) as tmp:
        save_labelled_image(tmp, bgr, model, "PNG" if path.suffix.lower() == ".png" else "JPEG")
        _sign_in_place(tmp, path, signer)
