"""Where an image's caption lives and what of it the trainer reads: one definition for every tool.

sd-scripts reads `<image minus extension><caption_extension>` and uses its **first line** only
(stripped); later lines are never trained on. The tagger's append/prepend, the tag editor and the
quality checks all go through `read_caption_file`, so none of them sees tags the trainer never
sees, and the editor writes later lines back unchanged.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

from pydantic import AfterValidator

from .errors import ConfigError
from .paths import confine


class CaptionError(ConfigError):
    """A caption file cannot be used (not UTF-8, a folder); the message names it."""


def normalize_extension(extension: str) -> str:
    """`txt` and `.txt` both mean `.txt`; an empty extension is a config error."""
    extension = extension.strip()
    if not extension:
        raise ConfigError("caption_extension may not be empty")
    if any(c in extension for c in "/\\\x00") or extension.strip(".") == "":
        raise ConfigError(f"caption_extension {extension!r} must be a file extension such as .txt (no folder, no NUL)")
    return extension if extension.startswith(".") else "." + extension


def _normalized(value: str) -> str:
    try:
        return normalize_extension(value)
    except ConfigError as e:
        raise ValueError(str(e)) from None


#: A caption-extension option: `txt` and `.txt` both mean `.txt`, empty is refused.
CaptionExtension = Annotated[str, AfterValidator(_normalized)]


def caption_path(image: str | Path, extension: str) -> Path:
    """`<image minus extension><extension>`, the one file sd-scripts (and our trainer) read for this image."""
    image = Path(image)
    return image.with_name(image.stem + normalize_extension(extension))


@dataclass
class CaptionText:
    """A caption file split the trainer's way: the first line (what is trained on) and the rest, verbatim."""

    first: str          # the first line, stripped
    rest: str = ""      # everything after the first line break, byte for byte (decoded)
    newline: str = "\n"  # the first line's own line break, reused when the file is written back

    def join(self, first: str) -> str:
        """The file's new text with `first` as its first line and every later line unchanged."""
        return first + self.newline + self.rest


def split_first_line(text: str) -> CaptionText:
    for i, ch in enumerate(text):
        if ch in "\r\n":
            newline = "\r\n" if text[i:i + 2] == "\r\n" else ch
            return CaptionText(text[:i].strip(), text[i + len(newline):], newline)
    return CaptionText(text.strip())


def read_caption_file(path: str | Path) -> CaptionText | None:
    """The caption at `path` (None when there is none); a folder or non-UTF-8 file is a CaptionError."""
    path = confine(path, "caption")  # a caption linking out of the app's workspace is refused, not read
    if path.is_dir():
        raise CaptionError(f"{path} is a folder, not a caption file; rename or remove it")
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    except UnicodeDecodeError:
        raise CaptionError(f"{path}: caption is not UTF-8; re-save it as UTF-8") from None
    return split_first_line(text)


def read_caption(image: str | Path, extension: str) -> str | None:
    """The trainer's caption of `image`: the first line of its caption file, or None when there is no file."""
    cap = read_caption_file(caption_path(image, extension))
    return None if cap is None else cap.first
