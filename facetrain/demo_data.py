"""Offline face photos for tests and `loratrain demo face`: scikit-image's astronaut, augmented.

Only one real face ships with scikit-image, so src and dst are the same person in different looks
(dst is re-coloured and re-framed): enough to exercise extraction, alignment and training for real.
"""
from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np


def astronaut_bgr() -> np.ndarray:
    try:
        from skimage import data
    except ImportError:
        raise ImportError("the bundled demo photos come from scikit-image: pip install 'loratrain[face]'") from None
    return cv2.cvtColor(data.astronaut(), cv2.COLOR_RGB2BGR)


def make_photos(folder: str | Path, n: int, seed: int, look: str = "src") -> list[Path]:
    """`n` photos: small rotations, zooms, shifts and exposure changes; `dst` photos are also re-coloured."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    base = astronaut_bgr()[:300, 60:420]  # head and shoulders
    rng = np.random.default_rng(seed)
    h, w = base.shape[:2]
    out = []
    for i in range(n):
        angle, zoom = rng.uniform(-12, 12), rng.uniform(0.9, 1.15)
        mat = cv2.getRotationMatrix2D((w / 2 + rng.uniform(-15, 15), h / 3), angle, zoom)
        mat[:, 2] += rng.uniform(-20, 20, 2)
        img = cv2.warpAffine(base, mat, (w, h), flags=cv2.INTER_CUBIC, borderMode=cv2.BORDER_REFLECT)
        img = img.astype(np.float32) * rng.uniform(0.85, 1.15)
        if look == "dst":
            img = img * np.array([0.75, 0.95, 1.25], np.float32) + 10  # warmer light
            img = img[:, ::-1] if i % 2 else img
        path = folder / f"{look}_{i:03d}.png"
        cv2.imwrite(str(path), np.clip(img, 0, 255).astype(np.uint8))
        out.append(path)
    return out


def make_clip(path: str | Path, frames: int = 24, fps: float = 12.0, size: int = 256, motion: float = 0.0,
              noise: float = 3.0, seed: int = 1, tone_hz: float = 440.0) -> Path:
    """A dst clip for the swap path: the re-coloured photo on a still camera (motion 0) or panning `motion` px per
    frame, with per-frame sensor noise (what makes landmarks jitter) and a sine tone as its audio track."""
    import tempfile
    import wave

    import imageio_ffmpeg

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    base = astronaut_bgr()[:300, 60:420].astype(np.float32) * np.array([0.75, 0.95, 1.25], np.float32) + 10
    base = cv2.resize(np.clip(base, 0, 255), (int(size * 360 / 300), size), interpolation=cv2.INTER_AREA)
    with tempfile.TemporaryDirectory() as tmp:
        audio = None
        if tone_hz:
            rate = 16000
            t = np.arange(int(rate * frames / fps)) / rate
            audio = Path(tmp) / "tone.wav"
            with wave.open(str(audio), "wb") as w:
                w.setnchannels(1)
                w.setsampwidth(2)
                w.setframerate(rate)
                w.writeframes((0.3 * np.sin(2 * np.pi * tone_hz * t) * 32767).astype(np.int16).tobytes())
        writer = imageio_ffmpeg.write_frames(str(path), (size, size), fps=fps, pix_fmt_in="bgr24", ffmpeg_log_level="error",
                                             quality=9, macro_block_size=16, audio_path=str(audio) if audio else None,
                                             audio_codec="aac" if audio else None)
        writer.send(None)
        for i in range(frames):
            x = int(round((base.shape[1] - size) / 2 + motion * (i - frames / 2)))
            x = int(np.clip(x, 0, base.shape[1] - size))
            frame = base[:, x:x + size] + rng.normal(0, noise, (size, size, 3)).astype(np.float32)
            writer.send(np.ascontiguousarray(np.clip(frame, 0, 255).astype(np.uint8)))
        writer.close()
    return path
