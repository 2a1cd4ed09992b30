"""`loratrain dataset frames`: frames at a chosen rate through the ffmpeg that imageio-ffmpeg ships.

Frames stream from ffmpeg as raw RGB (nothing is staged on disk); each one is compared with the last
kept frames by pHash and dropped when it is a near-duplicate or blurred, so a static shot yields one
frame rather than dozens.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

from loratrain.core.config import JobConfig, opt
from loratrain.core.errors import ConfigError, Problem
from loratrain.core.images import grayscale_array, laplacian_variance
from loratrain.core.jobs import JobResult, job
from loratrain.core.progress import Reporter, StopFlag
from loratrain.core.safe_io import atomic_path, atomic_write_json
from loratrain.core.video import read_video

from .quality.measure import BLUR_SIDE, phash

FRAME_FORMATS = {"png": "PNG", "jpg": "JPEG", "webp": "WEBP"}


class FramesConfig(JobConfig):
    video: str = opt("", "video file", positional=True, path="file")
    output_dir: str = opt("", "where frames go (default: <video name>_frames beside the video)", path="output")
    fps: float = opt(2.0, "frames per second to extract", gt=0)
    start: float = opt(0.0, "start at this many seconds", ge=0)
    duration: float = opt(0.0, "extract only this many seconds (0: to the end)", ge=0)
    blur_threshold: float = opt(50.0, "drop frames whose Laplacian variance is below this (0 keeps all)", ge=0)
    near_duplicate_distance: int = opt(6, "drop frames within this pHash distance of a recently kept frame (-1 keeps all)",
                                       ge=-1, le=64)
    compare_last: int = opt(8, "how many recently kept frames each frame is compared with", ge=1)
    format: str = opt("png", "png, jpg or webp", choices=list(FRAME_FORMATS))
    overwrite: bool = opt(False, "allow writing into a folder that already has frames of this video")
    quiet: bool = opt(False, "no progress bar")

    @property
    def frames_dir(self) -> Path:
        v = Path(self.video)
        return Path(self.output_dir) if self.output_dir else v.with_name(v.stem + "_frames")

    def requirements(self) -> list[Problem]:
        if not self.video:
            return [("video", "is required")]
        if not Path(self.video).is_file():
            return [("video", f"video not found: {self.video}")]
        return []


@dataclass
class FramesResult(JobResult):
    output_dir: str = ""
    extracted: int = 0
    kept: list[str] = field(default_factory=list)
    dropped_blurry: int = 0
    dropped_duplicate: int = 0

    def summary(self) -> list[str]:
        return [f"{self.extracted} frame(s) extracted, {len(self.kept)} kept in {self.output_dir}, "
                f"{self.dropped_duplicate} near-duplicate(s) and {self.dropped_blurry} blurred frame(s) dropped"
                + ("; stopped" if self.stopped else "")]


@job
def run_frames(cfg: FramesConfig, reporter: Reporter, stop: StopFlag) -> FramesResult:
    """Frames at `fps` through the imageio-ffmpeg ffmpeg, dropping blurred frames and near-duplicates.

    Each kept frame is written atomically; stop ends after the current frame and the manifest lists
    what was kept. Result: counts and the kept files.
    """
    video = Path(cfg.video)
    out = cfg.frames_dir
    prefix = video.stem
    if out.is_dir() and any(out.glob(f"{prefix}_*.{cfg.format}")) and not cfg.overwrite:
        raise ConfigError(f"{out} already has frames of {video.name}; pass --overwrite or choose another --output_dir")
    clip = read_video(video, cfg.fps, cfg.start, cfg.duration)
    reporter.start(clip.estimated_frames, f"frames of {video.name}", unit="frame")
    result = FramesResult(output_dir=str(out))
    recent: list[int] = []
    manifest = []
    try:
        for i, rgb in enumerate(clip.frames):
            if stop.is_set():
                result.stopped = True
                break
            frame = Image.fromarray(rgb, "RGB")
            result.extracted += 1
            reporter.advance()
            if cfg.blur_threshold > 0 and laplacian_variance(grayscale_array(frame, BLUR_SIDE)) < cfg.blur_threshold:
                result.dropped_blurry += 1
                continue
            hsh = phash(frame)
            if cfg.near_duplicate_distance >= 0 and any(bin(hsh ^ r).count("1") <= cfg.near_duplicate_distance for r in recent):
                result.dropped_duplicate += 1
                continue
            recent = (recent + [hsh])[-cfg.compare_last:]
            t = cfg.start + i / cfg.fps
            path = out / f"{prefix}_{round(t * 1000):08d}ms.{cfg.format}"
            with atomic_path(path) as tmp:
                frame.save(tmp, format=FRAME_FORMATS[cfg.format])
            result.kept.append(str(path))
            manifest.append({"file": path.name, "time": round(t, 3)})
    finally:
        clip.frames.close()
        reporter.done("")
    if manifest:
        atomic_write_json(out / f"{prefix}_frames.json", {"video": os.path.relpath(video.resolve(), out.resolve()), "fps": cfg.fps, "frames": manifest})
    return result
