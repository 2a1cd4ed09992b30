"""Finding, opening and measuring images the way the trainer, the taggers and the face tools expect."""
from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from .paths import confine

#: What sd-scripts (and our trainer) read as training images.
IMAGE_EXTENSIONS = {".png", ".jpg", ".jpeg", ".webp", ".bmp"}
#: Folder our tools keep their own state in (journal, backups); never part of the dataset.
STATE_DIR = ".loratrain"
#: Image-like files the trainer cannot use; reported instead of silently skipped.
UNSUPPORTED_IMAGE_EXTENSIONS = {".gif", ".tif", ".tiff", ".heic", ".avif", ".jxl"}


class ImageReadError(ValueError):
    """An image could not be decoded; the message names the file and the reason."""


def list_images(root: str | Path, recursive: bool = False, extensions: set[str] = IMAGE_EXTENSIONS) -> list[Path]:
    """Images under `root` sorted by path, skipping hidden folders and our own state folder."""
    root = confine(root, "dataset folder")
    if not root.is_dir():
        raise FileNotFoundError(f"dataset folder not found: {root}")
    pattern = root.rglob("*") if recursive else root.iterdir()
    out = []
    for p in pattern:
        rel = p.relative_to(root).parts
        if any(part.startswith(".") for part in rel[:-1]) or rel[-1].startswith("."):
            continue
        if p.is_file() and p.suffix.lower() in extensions:
            out.append(confine(p, "image"))  # a link out of the app's workspace is refused, not followed
    return sorted(out)


def open_image(path: str | Path) -> Image.Image:
    """Fully decoded image, so truncated files fail here and not later in a worker."""
    path = confine(path, "image")
    try:
        img = Image.open(path)
        img.load()
    except FileNotFoundError:
        raise
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise ImageReadError(f"{path}: cannot decode image ({e})") from None
    return img


def to_rgb_on_white(img: Image.Image) -> Image.Image:
    """RGB with any transparency flattened onto white, as the WD taggers were trained."""
    if img.mode == "RGB":
        return img
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        arr = np.asarray(img, dtype=np.float64)
        top = 65535.0 if arr.max() > 255 else 255.0
        img = Image.fromarray((arr * (255.0 / top)).round().clip(0, 255).astype(np.uint8), "L")
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA") or (img.mode != "RGB" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return img.convert("RGB")


def grayscale_array(img: Image.Image, max_side: int | None = None) -> np.ndarray:
    """float32 luma, optionally downscaled so measurements cost the same on huge and small images."""
    gray = to_rgb_on_white(img).convert("L")
    if max_side and max(gray.size) > max_side:
        scale = max_side / max(gray.size)
        gray = gray.resize((max(1, round(gray.width * scale)), max(1, round(gray.height * scale))), Image.Resampling.BOX)
    return np.asarray(gray, dtype=np.float32)


def laplacian_variance(gray: np.ndarray) -> float:
    """Variance of the 4-neighbour Laplacian: the usual sharpness measure (higher is sharper)."""
    if gray.shape[0] < 3 or gray.shape[1] < 3:
        return 0.0
    lap = gray[1:-1, :-2] + gray[1:-1, 2:] + gray[:-2, 1:-1] + gray[2:, 1:-1] - 4.0 * gray[1:-1, 1:-1]
    return float(lap.var())
