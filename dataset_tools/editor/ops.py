"""Bulk tag edits: one function per operation, registered by name so the CLI and UI list the same set.

Each operation maps one caption's tags to new tags; it sees the config and the whole dataset's tag
frequency (for `sort --sort_by frequency`). Applying them, journalling and undo live elsewhere.
"""
from __future__ import annotations

import re
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

from loratrain.core.errors import ConfigError
from loratrain.core.registry import Registry
from loratrain.core.tokenizer import token_count

from ..captions import dedupe, join_tags, split_tags
from .caption_set import CaptionSet
from .config import TagsConfig


@dataclass
class EditContext:
    cfg: TagsConfig
    frequency: Counter


EditOp = Callable[[list[str], EditContext], list[str]]
EDIT_OPS: Registry[EditOp] = Registry("tag edit")


def _need_tags(ctx: EditContext, op: str) -> list[str]:
    if not ctx.cfg.tags:
        raise ConfigError(f"tags {op}: give --tags")
    return ctx.cfg.tags


@EDIT_OPS.register("add")
def add(tags: list[str], ctx: EditContext) -> list[str]:
    new = [t for t in _need_tags(ctx, "add") if t not in tags]
    return new + tags if ctx.cfg.front else tags + new


@EDIT_OPS.register("remove")
def remove(tags: list[str], ctx: EditContext) -> list[str]:
    targets = _need_tags(ctx, "remove")
    if ctx.cfg.regex:
        pats = [_compile(t) for t in targets]
        return [t for t in tags if not any(p.fullmatch(t) for p in pats)]
    return [t for t in tags if t not in targets]


@EDIT_OPS.register("replace")
def replace(tags: list[str], ctx: EditContext) -> list[str]:
    cfg = ctx.cfg
    if not cfg.find:
        raise ConfigError("tags replace: give --find (and --replace_with; empty removes)")
    sep = cfg.separator
    if cfg.scope == "caption":
        text = join_tags(tags, sep)
        text = _compile(cfg.find).sub(cfg.replace_with, text) if cfg.regex else text.replace(cfg.find, cfg.replace_with)
        return dedupe(split_tags(text, sep))
    out = []
    for t in tags:
        if cfg.regex:
            pat = _compile(cfg.find)
            t = pat.sub(cfg.replace_with, t) if pat.fullmatch(t) else t
        elif t == cfg.find:
            t = cfg.replace_with
        out.extend(split_tags(t, sep))  # a replacement may be several tags, or none
    return dedupe(out)


@EDIT_OPS.register("move_front")
def move_front(tags: list[str], ctx: EditContext) -> list[str]:
    first = [t for t in _need_tags(ctx, "move_front") if t in tags]
    return first + [t for t in tags if t not in first]


@EDIT_OPS.register("dedupe")
def dedupe_op(tags: list[str], ctx: EditContext) -> list[str]:
    return dedupe(tags)


@EDIT_OPS.register("sort")
def sort(tags: list[str], ctx: EditContext) -> list[str]:
    cfg = ctx.cfg
    keys: dict[str, Callable[[str], object]] = {
        "alphabetical": lambda t: t.lower(),
        "frequency": lambda t: (ctx.frequency[t], t),
        "length": lambda t: (len(t), t),
        "tokens": lambda t: (token_count(t), t),
    }
    fixed, rest = tags[:cfg.keep_first], tags[cfg.keep_first:]
    return fixed + sorted(rest, key=keys[cfg.sort_by], reverse=cfg.descending)


@EDIT_OPS.register("truncate")
def truncate(tags: list[str], ctx: EditContext) -> list[str]:
    """Drop whole tags from the end until the caption fits the CLIP token budget."""
    cfg = ctx.cfg
    out = list(tags)
    while len(out) > cfg.keep_first and token_count(join_tags(out, cfg.separator)) > cfg.max_tokens:
        out.pop()
    return out


def _compile(pattern: str) -> re.Pattern:
    try:
        return re.compile(pattern)
    except re.error as e:
        raise ConfigError(f"bad regular expression {pattern!r}: {e}") from None


def apply_edit(captions: CaptionSet, op: str, cfg: TagsConfig) -> list[tuple[str, str, str]]:
    """Run `op` on the filtered images in memory; returns (image, before, after) for each change."""
    fn = EDIT_OPS.get(op)
    chosen = captions.select(cfg.all_of, cfg.any_of, cfg.none_of)
    ctx = EditContext(cfg, CaptionSet.frequency(captions.entries))
    changed = []
    for e in chosen:
        new = fn(list(e.tags), ctx)
        if new != e.tags:
            changed.append((str(e.image), captions.text(e), join_tags(new, captions.separator)))
            e.tags = new
    return changed
