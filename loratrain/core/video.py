"""Reading video frames through the ffmpeg that the imageio-ffmpeg wheel ships (no system install)."""
from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .paths import confine


@dataclass
class VideoFrames:
    """An open video: its frame count estimate and an iterator of HxWx3 uint8 RGB frames (closes ffmpeg when done)."""

    path: Path
    size: tuple[int, int]
    estimated_frames: int
    frames: Iterator[np.ndarray]
    fps: float = 0.0
    audio_codec: str = ""  # "" when the file has no audio stream


#: given before `-i`: ffmpeg reads plain files only (no URLs, no nested protocols)
SAFE_INPUT = ["-protocol_whitelist", "file"]
#: the container demuxers a user's video may use (mp4/mov/m4v, mkv/webm, avi, ts, mpg, flv, wmv, ogg, gif, raw h264/hevc);
#: never a playlist (hls, concat, dash, image2...) that makes ffmpeg open the files it names, whatever the file is called
VIDEO_INPUT = [*SAFE_INPUT, "-format_whitelist", "mov,matroska,avi,mpegts,mpeg,flv,asf,ogg,gif,h264,hevc"]


def video_input(path: str | Path) -> Path:
    """`path` when ffmpeg may be handed it: checked like any file the job opens, and never a text file. ffmpeg's playlist
    demuxers (ffconcat, m3u8/HLS, DASH manifests) open the files a text file names, out of our sight."""
    path = confine(path, "video")
    if not path.is_file():
        raise FileNotFoundError(f"video not found: {path}")
    with open(path, "rb") as fh:
        head = fh.read(4096)
    try:
        head.decode("utf-8")
        text = b"\x00" not in head and bool(head.strip())  # video containers are binary from their first bytes
    except UnicodeDecodeError as e:  # text, unless the bad byte is no character cut at the end of the sample
        text = e.start >= len(head) - 3 and b"\x00" not in head
    if text:
        raise ValueError(f"{path}: is a text file, not a video (a playlist such as ffconcat or m3u8 would make ffmpeg open "
                         "the files it names)")
    return path


def read_video(path: str | Path, fps: float = 0.0, start: float = 0.0, duration: float = 0.0) -> VideoFrames:
    """Frames at `fps` (0: every frame), from `start` seconds, for `duration` seconds (0: to the end)."""
    path = video_input(path)  # ffmpeg opens it itself: checked here, where it is handed over
    try:
        import imageio_ffmpeg
    except ImportError:
        raise ImportError("reading video needs imageio-ffmpeg: pip install imageio-ffmpeg") from None
    input_params = VIDEO_INPUT + (["-ss", str(start)] if start else [])
    output_params = (["-vf", f"fps={fps}"] if fps else []) + (["-t", str(duration)] if duration else [])
    try:
        reader = imageio_ffmpeg.read_frames(str(path), input_params=input_params, output_params=output_params)
        meta = next(reader)
    except (RuntimeError, OSError, StopIteration) as e:
        last = str(e).strip().splitlines()[-1] if str(e).strip() else repr(e)
        raise ValueError(f"{path}: ffmpeg cannot read it as a video ({last})") from None
    w, h = meta["size"]
    seconds = duration or max(0.0, float(meta.get("duration") or 0) - start)
    estimate = max(1, round(seconds * (fps or float(meta.get("fps") or 1))))

    def frames() -> Iterator[np.ndarray]:
        try:
            for raw in reader:
                yield np.frombuffer(raw, np.uint8).reshape(h, w, 3)
        finally:
            reader.close()

    return VideoFrames(path, (w, h), estimate, frames(), float(fps or meta.get("fps") or 0), str(meta.get("audio_codec") or ""))
