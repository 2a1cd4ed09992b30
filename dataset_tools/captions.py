"""Caption files: where they are, how tags are split and joined, and what to do with an existing one."""
from __future__ import annotations

from typing import Callable

from loratrain.common.registry import Registry
from loratrain.data.captions import caption_path, normalize_extension  # noqa: F401  (re-exported: one definition)

DEFAULT_SEPARATOR = ", "


def split_tags(text: str, separator: str = ",") -> list[str]:
    """Tags of a caption; new lines count as separators so multi-line captions are not glued together."""
    sep = separator.strip() or ","
    out = []
    for line in text.splitlines() or [""]:
        out.extend(t.strip() for t in line.split(sep))
    return [t for t in out if t]


def join_tags(tags: list[str], separator: str = DEFAULT_SEPARATOR) -> str:
    return separator.join(tags)


def caption_bytes(tags: list[str], separator: str = DEFAULT_SEPARATOR) -> bytes:
    """What a caption file holds: the tags on one line, newline-terminated, UTF-8 (as sd-scripts' tagger writes)."""
    return (join_tags(tags, separator) + "\n").encode("utf-8")


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
