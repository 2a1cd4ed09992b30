"""Options of `loratrain tags <op>`: which images (filters) and what to do to their tags."""
from __future__ import annotations

import re

from pydantic import field_validator

from loratrain.core.captions import CaptionExtension
from loratrain.core.config import JobConfig, opt
from loratrain.core.errors import Problem

QUERIES = ("list", "set", "undo", "history")


class TagsConfig(JobConfig):
    op: str = opt("list", "what to do: list, set, undo, history, or an edit (add, remove, replace, move_front, dedupe, sort, "
                          "truncate)")
    dataset_dir: str = opt("", "dataset folder", positional=True, path="dir")
    caption_extension: CaptionExtension = opt(".txt", "caption file extension")
    recursive: bool = opt(False, "include images in subfolders")
    all_of: list[str] = opt([], "only images whose caption has all of these tags", group="Filters")
    any_of: list[str] = opt([], "only images whose caption has at least one of these tags", group="Filters")
    none_of: list[str] = opt([], "only images whose caption has none of these tags", group="Filters")
    tags: list[str] = opt([], "the tags to add / remove / move to the front (comma or space separated; quote tags with spaces)")
    front: bool = opt(False, "add: put the new tags first")
    find: str = opt("", "replace: text or pattern to find")
    replace_with: str = opt("", "replace: replacement (regex groups as \\1)")
    regex: bool = opt(False, "replace / remove: treat find (or each tag to remove) as a regular expression")
    scope: str = opt("tag", "replace: per tag (whole tag must match) or caption (the joined caption text)", choices=["tag", "caption"])
    sort_by: str = opt("alphabetical", "sort: alphabetical, frequency (in the dataset), length or tokens",
                       choices=["alphabetical", "frequency", "length", "tokens"])
    descending: bool = opt(False, "sort: largest first")
    keep_first: int = opt(0, "sort / truncate: never move or drop the first N tags (e.g. the trigger word)", ge=0)
    max_tokens: int = opt(75, "truncate: CLIP token budget of the caption", ge=1)
    image: str = opt("", "set: the image whose caption to set", path="file")
    caption: str = opt("", "set: the new caption")
    top: int = opt(50, "list: how many tags to print (0 = all)", ge=0)
    as_json: bool = opt(False, "list / history: print JSON", flag="json")
    force: bool = opt(False, "undo: even if captions changed since the edit (originals stay in .loratrain/backup)")
    dry_run: bool = opt(False, "show what would change without writing")
    separator: str = opt(", ", "separator written between tags")

    @field_validator("all_of", "any_of", "none_of", "tags")
    @classmethod
    def _comma_lists(cls, value: list[str]) -> list[str]:
        """`"long hair, blue eyes"` given as one value means two tags."""
        return [t.strip() for v in value for t in v.split(",") if t.strip()]

    def problems(self) -> list[Problem]:
        from .ops import EDIT_OPS

        out: list[Problem] = []
        if self.op not in QUERIES and self.op not in EDIT_OPS:
            out.append(("op", f"unknown operation {self.op!r}; choose one of: {', '.join([*QUERIES, *EDIT_OPS.names()])}"))
        if self.op == "set" and not self.image:
            out.append(("image", "tags set: give --image and --caption"))
        if self.op in ("add", "remove", "move_front") and not self.tags:
            out.append(("tags", f"tags {self.op}: give --tags"))
        if self.op == "replace" and not self.find:
            out.append(("find", "tags replace: give --find (and --replace_with; empty removes)"))
        if self.regex:
            patterns = [("find", self.find)] if self.op == "replace" else [("tags", t) for t in self.tags]
            for name, pattern in patterns:
                try:
                    re.compile(pattern)
                except re.error as e:
                    out.append((name, f"bad regular expression {pattern!r}: {e}"))
        return out

    def requirements(self) -> list[Problem]:
        return [("dataset_dir", "is required")] if not self.dataset_dir else []
