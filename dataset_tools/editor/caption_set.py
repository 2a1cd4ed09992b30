"""All captions of a dataset in memory, filters over them, and journalled saves."""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from loratrain.core.captions import CaptionError, CaptionText, caption_path, normalize_extension, read_caption_file
from loratrain.core.errors import ConfigError
from loratrain.core.images import list_images

from ..captions import DEFAULT_SEPARATOR, caption_bytes, join_tags, split_tags
from ..journal import Journal


@dataclass
class Entry:
    image: Path
    caption_file: Path
    tags: list[str]
    saved: list[str] | None  # the tags on disk; None while the image has no caption file
    kept: CaptionText | None = None  # the file as read: its later lines are written back unchanged

    def changed(self) -> bool:
        return self.tags != (self.saved or [])


@dataclass
class CaptionSet:
    """Captions keyed by image; edits stay in memory until `save`, which journals them for undo."""

    root: Path
    extension: str
    separator: str = DEFAULT_SEPARATOR
    entries: list[Entry] = field(default_factory=list)

    @classmethod
    def load(cls, root: str | Path, extension: str = ".txt", recursive: bool = False,
             separator: str = DEFAULT_SEPARATOR) -> "CaptionSet":
        root = Path(root)
        extension = normalize_extension(extension)
        out = cls(root=root, extension=extension, separator=separator)
        bad = []
        for image in list_images(root, recursive):
            cap = caption_path(image, extension)
            try:
                text = read_caption_file(cap)  # the trainer's rule: tags are the first line
            except CaptionError as e:
                bad.append(str(e))
                continue
            tags = split_tags(text.first, separator) if text is not None else []
            out.entries.append(Entry(image, cap, tags, list(tags) if text is not None else None, text))
        if bad:
            raise ConfigError(f"{len(bad)} caption(s) cannot be edited safely: " + "; ".join(bad[:5]))
        return out

    def select(self, all_of: list[str] = (), any_of: list[str] = (), none_of: list[str] = ()) -> list[Entry]:
        """Images whose caption has all of `all_of`, at least one of `any_of`, and none of `none_of`."""
        out = []
        for e in self.entries:
            tags = set(e.tags)
            if all_of and not all(t in tags for t in all_of):
                continue
            if any_of and not any(t in tags for t in any_of):
                continue
            if none_of and any(t in tags for t in none_of):
                continue
            out.append(e)
        return out

    def entry(self, image: str | Path) -> Entry:
        target = Path(image).resolve()
        for e in self.entries:
            if e.image.resolve() == target or e.caption_file.resolve() == target:
                return e
        raise ConfigError(f"{image}: not an image of {self.root}")

    @staticmethod
    def frequency(entries: list[Entry]) -> Counter:
        c: Counter = Counter()
        for e in entries:
            c.update(set(e.tags))
        return c

    def text(self, entry: Entry) -> str:
        return join_tags(entry.tags, self.separator)

    def set_caption(self, image: str | Path, text: str) -> tuple[str, str, str]:
        """Replace one image's caption (in memory); returns (image, before, after) like `apply_edit`."""
        entry = self.entry(image)
        before = self.text(entry)
        entry.tags = split_tags(text, self.separator)
        return str(entry.image), before, self.text(entry)

    def pending(self) -> dict[Path, bytes]:
        """Caption files whose tags differ from what is on disk."""
        return {e.caption_file: caption_bytes(e.tags, self.separator, e.kept) for e in self.entries if e.changed()}

    def save(self, op_name: str, description: str) -> int:
        """Write every changed caption through one journal operation; returns how many files changed."""
        changes = self.pending()
        if not changes:
            return 0
        op = Journal(self.root).begin(op_name, description)
        try:
            written = op.write(changes)
        finally:
            op.finish()
        for e in self.entries:
            if e.caption_file in changes:
                e.saved = list(e.tags)
        return written
