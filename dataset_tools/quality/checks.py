"""One function per quality check, registered by name; each turns measurements into findings."""
from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from loratrain.core.captions import CaptionError, caption_path, read_caption_file
from loratrain.core.progress import NullReporter, Reporter, StopFlag
from loratrain.core.registry import Registry

from ..captions import split_tags
from .config import CheckConfig
from .measure import ImageInfo, hamming_pairs

CAPTION_LIKE = (".txt", ".caption", ".tags", ".tag")


@dataclass
class Finding:
    check: str
    path: str
    severity: str  # "error": the trainer will fail or misread it; "warning": worth a look
    message: str
    score: float | None = None
    group: list[str] = field(default_factory=list)
    kind: str = ""  # what sort of problem within the check (text_marks: band / corner / tiled / static / model)
    boxes: list[list[int]] = field(default_factory=list)  # [x, y, w, h] regions in the image's pixels


@dataclass
class Dataset:
    """Everything the checks look at."""

    root: Path
    infos: list[ImageInfo]
    unsupported: list[Path]
    cfg: CheckConfig
    _captions: dict[Path, tuple[Path, str | None, str | None]] = field(default_factory=dict)
    #: what a check adds to the report beyond findings (the shot mix per concept, ...), by check name: into the JSON;
    #: a section's "summary" lines are printed under the table
    sections: dict[str, Any] = field(default_factory=dict)
    #: measurements a check module makes once for several of its checks (faces: people and shot_balance)
    cache: dict[str, Any] = field(default_factory=dict)
    #: for checks with a slow pass of their own (face detection): progress, and Ctrl-C ends the pass
    reporter: Reporter = field(default_factory=NullReporter)
    stop: StopFlag = field(default_factory=StopFlag)

    def readable(self) -> list[ImageInfo]:
        return [i for i in self.infos if i.error is None]

    def caption(self, info: ImageInfo) -> tuple[Path, str | None, str | None]:
        """(caption file, text or None, problem or None), read once however many checks ask."""
        if info.path not in self._captions:
            self._captions[info.path] = _caption_text(self, info)
        return self._captions[info.path]


Check = Callable[[Dataset], list[Finding]]
CHECKS: Registry[Check] = Registry("quality check")


@CHECKS.register("corrupt")
def corrupt(ds: Dataset) -> list[Finding]:
    return [Finding("corrupt", str(i.path), "error", i.error or "") for i in ds.infos if i.error]


@CHECKS.register("unsupported")
def unsupported(ds: Dataset) -> list[Finding]:
    return [Finding("unsupported", str(p), "warning", f"{p.suffix} images are not read by the trainer; convert to PNG/JPEG")
            for p in ds.unsupported]


@CHECKS.register("too_small")
def too_small(ds: Dataset) -> list[Finding]:
    m = ds.cfg.min_side
    return [Finding("too_small", str(i.path), "warning", f"{i.width}x{i.height}: short side below {m}", float(min(i.width, i.height)))
            for i in ds.readable() if min(i.width, i.height) < m]


@CHECKS.register("extreme_aspect")
def extreme_aspect(ds: Dataset) -> list[Finding]:
    out = []
    for i in ds.readable():
        ratio = max(i.width, i.height) / max(1, min(i.width, i.height))
        if ratio > ds.cfg.max_aspect:
            out.append(Finding("extreme_aspect", str(i.path), "warning", f"{i.width}x{i.height}: aspect {ratio:.2f}:1", round(ratio, 3)))
    return out


@CHECKS.register("blurry")
def blurry(ds: Dataset) -> list[Finding]:
    t = ds.cfg.blur_threshold
    return [Finding("blurry", str(i.path), "warning", f"Laplacian variance {i.blur:.1f} < {t:g}", round(i.blur, 2))
            for i in ds.readable() if i.blur < t]


@CHECKS.register("duplicate_stem")
def duplicate_stem(ds: Dataset) -> list[Finding]:
    """a.jpg + a.png share a.txt and their latent cache names; sd-scripts gives no warning."""
    by_stem: dict[Path, list[Path]] = defaultdict(list)
    for p in [i.path for i in ds.infos] + ds.unsupported:
        by_stem[p.with_suffix("")].append(p)
    out = []
    for paths in by_stem.values():
        if len(paths) > 1:
            names = sorted(str(p) for p in paths)
            for p in names:
                out.append(Finding("duplicate_stem", p, "error", "same name with another extension: they share one "
                                   "caption and cache file", group=names))
    return out


def _best_first(i: ImageInfo) -> tuple:
    """Sort key putting the copy to keep first: largest, then lossless, then sharpest, then by path.

    Lossless before sharp because JPEG ringing raises the Laplacian variance of the worse copy."""
    return (-(i.width * i.height), i.path.suffix.lower() not in (".png", ".bmp"), -i.blur, str(i.path))


@CHECKS.register("exact_duplicate")
def exact_duplicate(ds: Dataset) -> list[Finding]:
    groups: dict[str, list[ImageInfo]] = defaultdict(list)
    for i in ds.readable():
        groups[i.pixel_hash].append(i)
    out = []
    for infos in groups.values():
        if len(infos) > 1:
            keep, *rest = sorted(infos, key=_best_first)
            names = [str(i.path) for i in [keep, *rest]]
            out += [Finding("exact_duplicate", str(i.path), "warning", f"same pixels as {keep.path}", group=names) for i in rest]
    return out


@CHECKS.register("near_duplicate")
def near_duplicate(ds: Dataset) -> list[Finding]:
    infos = ds.readable()
    parent = list(range(len(infos)))

    def find(a: int) -> int:
        while parent[a] != a:
            parent[a] = parent[parent[a]]
            a = parent[a]
        return a

    closest: dict[int, int] = {}
    for a, b, d in hamming_pairs([i.phash for i in infos], ds.cfg.near_duplicate_distance):
        if infos[a].pixel_hash == infos[b].pixel_hash:
            continue  # exact duplicates are their own check
        parent[find(a)] = find(b)
        closest[a] = min(closest.get(a, 64), d)
        closest[b] = min(closest.get(b, 64), d)
    groups: dict[int, list[int]] = defaultdict(list)
    for idx in closest:
        groups[find(idx)].append(idx)
    out = []
    for members in groups.values():
        keep, *rest = sorted(members, key=lambda m: _best_first(infos[m]))
        names = [str(infos[m].path) for m in [keep, *rest]]
        for m in rest:
            out.append(Finding("near_duplicate", str(infos[m].path), "warning",
                               f"looks like {infos[keep].path} (pHash distance {closest[m]})", float(closest[m]), group=names))
    return out


def _caption_text(ds: Dataset, info: ImageInfo) -> tuple[Path, str | None, str | None]:
    """(caption file, its first line (what the trainer reads) or None, problem or None)."""
    cap = caption_path(info.path, ds.cfg.caption_extension)
    if cap.is_dir():
        return cap, None, "is a folder, not a caption file"
    if not cap.is_file():
        others = [caption_path(info.path, e) for e in CAPTION_LIKE if e != ds.cfg.caption_extension]
        found = [o for o in others if o.is_file()]
        if found:
            return cap, None, f"no {cap.name}, but {found[0].name} exists: the trainer would ignore it (caption_extension is {ds.cfg.caption_extension})"
        return cap, None, "missing"
    try:
        text = read_caption_file(cap)
    except CaptionError:
        return cap, None, "not UTF-8"
    return cap, text.first if text else "", None


@CHECKS.register("captions")
def captions(ds: Dataset) -> list[Finding]:
    out = []
    for info in ds.infos:
        cap, text, problem = ds.caption(info)
        if problem == "missing":
            out.append(Finding("captions", str(info.path), "warning", f"no caption ({cap.name}); the folder's class tokens will be used"))
        elif problem:
            out.append(Finding("captions", str(cap), "error", problem))
        elif not split_tags(text or ""):
            empty = not cap.read_bytes().strip()
            out.append(Finding("captions", str(cap), "error", "caption file is empty" if empty else
                               "the caption's first line is empty (the trainer reads only the first line)"))
    return out


def _class_tokens(path: Path) -> str | None:
    head, sep, tokens = path.parent.name.partition("_")
    return tokens if sep and head.isdigit() else None


@CHECKS.register("tag_imbalance")
def tag_imbalance(ds: Dataset) -> list[Finding]:
    """A tag on most images (one pose, one outfit) gets baked into the LoRA."""
    counts: Counter = Counter()
    firsts: Counter = Counter()
    captioned = 0
    ignore = {t.strip().lower() for t in ds.cfg.ignore_tags}
    for info in ds.infos:
        _, text, problem = ds.caption(info)
        if text is None:
            continue
        ordered = split_tags(text)
        if not ordered:
            continue
        captioned += 1
        counts.update(set(ordered))
        firsts[ordered[0]] += 1
        if (tokens := _class_tokens(info.path)) is not None:
            ignore.add(tokens.lower())
    if captioned < 4:
        return []
    trigger, n_first = firsts.most_common(1)[0]
    if n_first == captioned:
        ignore.add(trigger.lower())  # the same first tag everywhere is a trigger word, there on purpose
    out = []
    for tag, n in counts.most_common():
        share = n / captioned
        if share < ds.cfg.tag_share:
            break
        if tag.lower() in ignore:
            continue
        out.append(Finding("tag_imbalance", str(ds.root), "warning",
                           f"tag '{tag}' is on {n}/{captioned} captioned images ({share:.0%})", round(share, 3)))
    return out


# Checks kept in modules of their own register themselves when imported.
from . import extensions, marks_check, people  # noqa: E402, F401, I001
