"""Caption files and the sd-scripts caption processing order."""
from __future__ import annotations

import random
from pathlib import Path

from ..common.config import ConfigError
from .subsets import DatasetError, Subset


def normalize_extension(extension: str) -> str:
    """`txt` and `.txt` both mean `.txt`; an empty extension is a config error."""
    extension = extension.strip()
    if not extension:
        raise ConfigError("caption_extension may not be empty")
    return extension if extension.startswith(".") else "." + extension


def caption_path(image: str | Path, extension: str) -> Path:
    """`<image minus extension><extension>`, the one file sd-scripts (and our trainer) read for this image."""
    image = Path(image)
    return image.with_name(image.stem + normalize_extension(extension))


def read_caption(image: Path, extension: str) -> str | None:
    """First line of `<image stem><extension>`, or None when there is no caption file."""
    cap = caption_path(image, extension)
    if not cap.is_file():
        return None
    try:
        text = cap.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise DatasetError(f"{cap}: caption is not UTF-8") from None
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    return lines[0] if lines else ""


def process_caption(caption: str, subset: Subset, rng: random.Random, epoch: int = 0) -> str:
    """prefix/suffix -> caption dropout -> keep_tokens + shuffle -> tag dropout."""
    if subset.caption_prefix:
        caption = subset.caption_prefix + " " + caption
    if subset.caption_suffix:
        caption = caption + " " + subset.caption_suffix
    if subset.caption_dropout_rate > 0 and rng.random() < subset.caption_dropout_rate:
        return ""
    if subset.caption_dropout_every_n_epochs > 0 and epoch > 0 and epoch % subset.caption_dropout_every_n_epochs == 0:
        return ""
    sep = subset.caption_separator
    if not (subset.shuffle_caption or subset.caption_tag_dropout_rate > 0 or subset.keep_tokens_separator):
        return caption
    if subset.keep_tokens_separator and subset.keep_tokens_separator in caption:
        fixed_text, rest_text = caption.split(subset.keep_tokens_separator, 1)
        fixed = [t.strip() for t in fixed_text.split(sep) if t.strip()]
        rest = [t.strip() for t in rest_text.split(sep) if t.strip()]
    else:
        tags = [t.strip() for t in caption.split(sep) if t.strip()]
        fixed, rest = tags[: subset.keep_tokens], tags[subset.keep_tokens:]
    if subset.shuffle_caption:
        rng.shuffle(rest)
    if subset.caption_tag_dropout_rate > 0:
        rest = [t for t in rest if rng.random() >= subset.caption_tag_dropout_rate]
    return (sep + " ").join(fixed + rest)
