"""Options of `loratrain tags <op>`: which images (filters) and what to do to their tags."""
from __future__ import annotations

from dataclasses import dataclass

from loratrain.common.config import CommandConfig, ConfigError, opt

from ..captions import normalize_extension


@dataclass
class TagsConfig(CommandConfig):
    dataset_dir: str = opt("", "dataset folder", metadata={"positional": True})
    caption_extension: str = opt(".txt", "caption file extension")
    recursive: bool = opt(False, "include images in subfolders")
    all_of: list[str] = opt([], "only images whose caption has all of these tags")
    any_of: list[str] = opt([], "only images whose caption has at least one of these tags")
    none_of: list[str] = opt([], "only images whose caption has none of these tags")
    tags: list[str] = opt([], "the tags to add / remove / move to the front (comma or space separated; quote tags with spaces)")
    front: bool = opt(False, "add: put the new tags first")
    find: str = opt("", "replace: text or pattern to find")
    replace_with: str = opt("", "replace: replacement (regex groups as \\1)")
    regex: bool = opt(False, "replace / remove: treat find (or each tag to remove) as a regular expression")
    scope: str = opt("tag", "replace: per tag (whole tag must match) or caption (the joined caption text)",
                     metadata={"choices": ["tag", "caption"]})
    sort_by: str = opt("alphabetical", "sort: alphabetical, frequency (in the dataset), length or tokens",
                       metadata={"choices": ["alphabetical", "frequency", "length", "tokens"]})
    descending: bool = opt(False, "sort: largest first")
    keep_first: int = opt(0, "sort / truncate: never move or drop the first N tags (e.g. the trigger word)")
    max_tokens: int = opt(75, "truncate: CLIP token budget of the caption")
    image: str = opt("", "set: the image whose caption to set")
    caption: str = opt("", "set: the new caption")
    top: int = opt(50, "list: how many tags to print (0 = all)")
    json: bool = opt(False, "list / history: print JSON")
    force: bool = opt(False, "undo: even if captions changed since the edit (originals stay in .loratrain/backup)")
    dry_run: bool = opt(False, "show what would change without writing")
    separator: str = opt(", ", "separator written between tags")

    def validate(self) -> None:
        if not self.dataset_dir:
            raise ConfigError("dataset_dir is required")
        self.caption_extension = normalize_extension(self.caption_extension)
        # "long hair, blue eyes" given as one flag value means two tags
        for name in ("all_of", "any_of", "none_of", "tags"):
            setattr(self, name, [t.strip() for v in getattr(self, name) for t in v.split(",") if t.strip()])
        if self.max_tokens < 1:
            raise ConfigError("max_tokens must be at least 1")
