"""`loratrain dataset frames`: frames at a chosen rate through the ffmpeg that imageio-ffmpeg ships.

Frames stream from ffmpeg as raw RGB (nothing is staged on disk); each one is compared with the last
kept frames by pHash and dropped when it is a near-duplicate or blurred, so a static shot yields one
frame rather than dozens.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

from loratrain.common.config import CommandConfig, ConfigError, opt
from loratrain.common.progress import Reporter, StopFlag
from loratrain.common.safe_io import atomic_path, atomic_write_json

from .images import grayscale_array
from .quality.measure import BLUR_SIDE, laplacian_variance, phash
from .video import read_video

FRAME_FORMATS = {"png": "PNG", "jpg": "JPEG", "webp": "WEBP"}


@dataclass
class FramesConfig(CommandConfig):
    video: str = opt("", "video file", metadata={"positional": True})
    output_dir: str = opt("", "where frames go (default: <video name>_frames beside the video)")
    fps: float = opt(2.0, "frames per second to extract")
    start: float = opt(0.0, "start at this many seconds")
    duration: float = opt(0.0, "extract only this many seconds (0: to the end)")
    blur_threshold: float = opt(50.0, "drop frames whose Laplacian variance is below this (0 keeps all)")
    near_duplicate_distance: int = opt(6, "drop frames within this pHash distance of a recently kept frame (-1 keeps all)")
    compare_last: int = opt(8, "how many recently kept frames each frame is compared with")
    format: str = opt("png", "png, jpg or webp", metadata={"choices": list(FRAME_FORMATS)})
    overwrite: bool = opt(False, "allow writing into a folder that already has frames of this video")
    quiet: bool = opt(False, "no progress bar")

    def validate(self) -> None:
        if not self.video:
            raise ConfigError("video is required")
        if self.fps <= 0:
            raise ConfigError("fps must be positive")
        if not self.output_dir:
            v = Path(self.video)
            self.output_dir = str(v.with_name(v.stem + "_frames"))


@dataclass
class FramesResult:
    extracted: int = 0
    kept: list[str] = field(default_factory=list)
    dropped_blurry: int = 0
    dropped_duplicate: int = 0


def extract_frames(cfg: FramesConfig, reporter: Reporter, stop: StopFlag | None = None) -> FramesResult:
    video = Path(cfg.video)
    if not video.is_file():
        raise FileNotFoundError(f"video not found: {video}")  # before looking at the output folder
    out = Path(cfg.output_dir)
    prefix = video.stem
    if out.is_dir() and any(out.glob(f"{prefix}_*.{cfg.format}")) and not cfg.overwrite:
        raise ConfigError(f"{out} already has frames of {video.name}; pass --overwrite or choose another --output_dir")
    clip = read_video(video, cfg.fps, cfg.start, cfg.duration)
    reporter.start(clip.estimated_frames, f"frames of {video.name}", unit="frame")
    result = FramesResult()
    recent: list[int] = []
    manifest = []
    try:
        for i, rgb in enumerate(clip.frames):
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
            if stop is not None and stop.is_set():
                break
    finally:
        clip.frames.close()
        reporter.done("")
    if manifest:
        atomic_write_json(out / f"{prefix}_frames.json", {"video": str(video.resolve()), "fps": cfg.fps, "frames": manifest})
    return result
