"""`run_tags`: every `loratrain tags` operation as one library job (the CLI and the UI's tag editor call it)."""
from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from loratrain.core.jobs import JobResult, job
from loratrain.core.progress import Reporter, StopFlag

from ..journal import Journal
from .caption_set import CaptionSet
from .config import TagsConfig
from .ops import apply_edit


@dataclass
class TagsResult(JobResult):
    op: str
    dataset_dir: str
    changes: list[tuple[str, str, str]] = field(default_factory=list)  # (image, before, after)
    written: int = 0
    dry_run: bool = False
    selected: int = 0
    images: int = 0
    frequency: list[tuple[str, int]] = field(default_factory=list)
    history: list[dict[str, Any]] = field(default_factory=list)
    undone: dict[str, Any] = field(default_factory=dict)
    as_json: bool = False

    def summary(self) -> list[str]:
        if self.op == "undo":
            u = self.undone
            return [f"undid '{u['description']}' ({u['time']}): {u['restored']} of {u['files']} file(s) restored"]
        if self.op == "history":
            if self.as_json:
                return [json.dumps(self.history, indent=2)]
            lines = [f"{h['id']}  {h['time']}  {h['op']:10s} {h['files']:5d} file(s)  {h['description']}" for h in self.history]
            return lines or ["no edits to undo"]
        if self.op == "list":
            if self.as_json:
                return [json.dumps({"images": self.selected, "tags": dict(self.frequency)}, indent=2)]
            lines = [f"{self.selected} of {self.images} image(s) selected"]
            return lines + [f"{n:6d}  {n / max(1, self.selected):6.1%}  {tag}" for tag, n in self.frequency]
        lines = []
        for image, before, after in self.changes[:5]:
            lines += [image, f"  - {before}", f"  + {after}"]
        if len(self.changes) > 5:
            lines.append(f"... and {len(self.changes) - 5} more")
        if self.dry_run:
            return lines + [f"dry run: {len(self.changes)} caption(s) would change"]
        return lines + [f"{self.written} caption(s) written; `loratrain tags undo {self.dataset_dir}` reverts this"]


@job
def run_tags(cfg: TagsConfig, reporter: Reporter, stop: StopFlag) -> TagsResult:
    """List, set, edit (journalled, undoable), undo or show the history of a dataset's captions.

    An edit is one unit: it is computed in memory for every selected caption, then written through
    one journal operation, so a stop never leaves part of an edit applied.
    """
    result = TagsResult(op=cfg.op, dataset_dir=cfg.dataset_dir, as_json=cfg.as_json)
    if cfg.op == "undo":
        res = Journal(cfg.dataset_dir).undo(force=cfg.force)
        result.undone = {"description": res.header.get("description"), "time": res.header.get("time"),
                         "restored": res.restored, "files": res.files}
        return result
    if cfg.op == "history":
        result.history = Journal(cfg.dataset_dir).history()
        return result
    captions = CaptionSet.load(cfg.dataset_dir, cfg.caption_extension, cfg.recursive, cfg.separator)
    result.images = len(captions.entries)
    if cfg.op == "list":
        chosen = captions.select(cfg.all_of, cfg.any_of, cfg.none_of)
        result.selected = len(chosen)
        result.frequency = Counter(CaptionSet.frequency(chosen)).most_common(cfg.top or None)
        return result
    if cfg.op == "set":
        result.changes = [captions.set_caption(cfg.image, cfg.caption)]
        description = f"set caption of {Path(cfg.image).name}"
    else:
        result.changes = apply_edit(captions, cfg.op, cfg)
        description = f"{cfg.op} {' '.join(cfg.tags) or cfg.find} on {len(result.changes)} caption(s)"
    result.dry_run = cfg.dry_run
    if not cfg.dry_run:
        result.written = captions.save(cfg.op, description)
    return result
