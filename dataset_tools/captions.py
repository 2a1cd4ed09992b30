"""Caption files: where they are, how tags are split and joined, and what to do with an existing one."""
from __future__ import annotations

from pathlib import Path
from typing import Callable

from loratrain.common.registry import Registry

DEFAULT_SEPARATOR = ", "


def normalize_extension(extension: str) -> str:
    extension = extension.strip()
    if not extension:
        raise ValueError("caption_extension may not be empty")
    return extension if extension.startswith(".") else "." + extension


def caption_path(image: str | Path, extension: str) -> Path:
    """`<image minus extension><extension>`, the one file sd-scripts reads for this image."""
    image = Path(image)
    return image.with_name(image.stem + normalize_extension(extension))


def split_tags(text: str, separator: str = ",") -> list[str]:
    """Tags of a caption; new lines count as separators so multi-line captions are not glued together."""
    sep = separator.strip() or ","
    out = []
    for line in text.splitlines() or [""]:
        out.extend(t.strip() for t in line.split(sep))
    return [t for t in out if t]


def join_tags(tags: list[str], separator: str = DEFAULT_SEPARATOR) -> str:
    return separator.join(tags)


def dedupe(tags: list[str]) -> list[str]:
    seen: set[str] = set()
    return [t for t in tags if not (t in seen or seen.add(t))]


# What to do when an image already has a caption: (existing tags or None, new tags) -> tags to write,
# or None to leave the file alone.
CaptionPolicy = Callable[[list[str] | None, list[str]], list[str] | None]
CAPTION_POLICIES: Registry[CaptionPolicy] = Registry("existing-caption policy")


@CAPTION_POLICIES.register("skip", "ignore")
def _skip(existing: list[str] | None, new: list[str]) -> list[str] | None:
    return new if existing is None else None


@CAPTION_POLICIES.register("overwrite")
def _overwrite(existing: list[str] | None, new: list[str]) -> list[str] | None:
    return new


@CAPTION_POLICIES.register("append")
def _append(existing: list[str] | None, new: list[str]) -> list[str] | None:
    return dedupe((existing or []) + new)


@CAPTION_POLICIES.register("prepend")
def _prepend(existing: list[str] | None, new: list[str]) -> list[str] | None:
    return dedupe(new + (existing or []))
