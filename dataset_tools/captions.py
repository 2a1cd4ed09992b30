"""Tags in a caption: how they are split and joined, and what to do with an existing caption.

Where a caption lives and which of its lines the trainer reads is defined once, in
`loratrain.core.captions`: tags always come from the first line, and later lines are written back
unchanged.
"""
from __future__ import annotations

from collections.abc import Callable

from loratrain.core.captions import CaptionText
from loratrain.core.registry import Registry

DEFAULT_SEPARATOR = ", "


def split_tags(text: str, separator: str = ",") -> list[str]:
    """Tags of a caption line; in text typed by a user, new lines count as separators too."""
    sep = separator.strip() or ","
    out = []
    for line in text.splitlines() or [""]:
        out.extend(t.strip() for t in line.split(sep))
    return [t for t in out if t]


def join_tags(tags: list[str], separator: str = DEFAULT_SEPARATOR) -> str:
    return separator.join(tags)


def caption_bytes(tags: list[str], separator: str = DEFAULT_SEPARATOR, keep: CaptionText | None = None) -> bytes:
    """What a caption file holds: the tags as its first line, newline-terminated, UTF-8 (as sd-scripts' tagger
    writes); the later lines of `keep` (the file as it was) follow unchanged."""
    line = join_tags(tags, separator)
    if keep is not None and keep.rest:
        return keep.join(line).encode("utf-8")
    return (line + "\n").encode("utf-8")


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
