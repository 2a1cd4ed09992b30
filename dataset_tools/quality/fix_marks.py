"""`loratrain dataset fix-marks`: crop away or inpaint the text and marks `dataset check` found, undoably.

Every changed image is written through the dataset's journal (dataset_tools/journal.py), the same one
caption edits use: the original bytes are kept, and `loratrain tags undo DIR` restores them exactly. The
boxes come from a check report (`--report`, untrusted: every path must resolve inside DIR) or, without one,
from running the text_marks and video_marks checks again.

Crop keeps the largest rectangle free of every box (cutting rows off the top or bottom, or columns off a
side), refuses a cut that would leave a long/short ratio over `max_aspect`, and says when the short side
ends below `min_side`. Inpaint fills each box, grown by `dilate` pixels, with OpenCV's inpainting (Telea or
Navier-Stokes). A tiled watermark is never "fixed": neither helps.
"""
from __future__ import annotations

import io
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from loratrain.core.config import JobConfig, opt
from loratrain.core.errors import ConfigError, Problem
from loratrain.core.images import IMAGE_EXTENSIONS, STATE_DIR
from loratrain.core.jobs import JobResult, job
from loratrain.core.paths import confine, real, within
from loratrain.core.progress import Reporter, StopFlag

from ..journal import Journal

FIXABLE = ("band", "corner", "static", "model")
MARK_CHECKS = ("text_marks", "video_marks")


class FixMarksConfig(JobConfig):
    dataset_dir: str = opt("", "dataset folder whose images are fixed in place (journalled: `loratrain tags undo` restores)",
                           positional=True, path="dir")
    mode: str = opt("crop", "crop: cut the marked band or corner off; inpaint: paint over the boxes", choices=["crop", "inpaint"])
    report: str = opt("", "a `dataset check --json_output` report to take the boxes from (default: detect again)", path="file")
    method: str = opt("telea", "inpainting method (OpenCV): telea or ns (Navier-Stokes)", choices=["telea", "ns"])
    dilate: int = opt(4, "inpaint: grow each box by this many pixels", ge=0, le=64)
    radius: int = opt(5, "inpaint: neighbourhood radius in pixels", ge=1, le=50)
    margin: int = opt(2, "crop: cut this many pixels more than the box", ge=0, le=64)
    max_aspect: float = opt(2.5, "crop: never leave a long/short side ratio above this (use inpaint there)", ge=1)
    min_side: int = opt(512, "crop: say so when the short side ends below this", ge=1)
    images: list[str] = opt([], "fix only these images (paths inside the dataset folder; default: every finding)")
    dry_run: bool = opt(False, "only say what would change")
    quiet: bool = opt(False, "no progress bar")

    def requirements(self) -> list[Problem]:
        return [("dataset_dir", "is required")] if not self.dataset_dir else []


@dataclass
class FixResult(JobResult):
    dataset_dir: str = ""
    mode: str = ""
    fixed: list[dict] = field(default_factory=list)
    skipped: list[dict] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    dry_run: bool = False

    def summary(self) -> list[str]:
        lines = [f"{f['image']}: {f['change']}" for f in self.fixed[:10]]
        if len(self.fixed) > 10:
            lines.append(f"... and {len(self.fixed) - 10} more")
        lines += [f"skipped {s['image']}: {s['why']}" for s in self.skipped] + self.notes
        verb = "would be changed (dry run)" if self.dry_run else "changed"
        tail = "" if self.dry_run or not self.fixed else f"; `loratrain tags undo {self.dataset_dir}` restores them"
        return lines + [f"{len(self.fixed)} image(s) {verb} by {self.mode}{tail}"]


# ---- the two fixes (pure functions of pixels and boxes) -----------------------------------------------------
def crop_rect(width: int, height: int, boxes: list[list[int]], margin: int = 2,
              max_aspect: float = 2.5) -> tuple[int, int, int, int] | None:
    """(left, top, right, bottom) of the largest rectangle left after cutting each box off along one side, or None
    when every way leaves a ratio over `max_aspect` (or nothing)."""
    rect = (0, 0, width, height)
    for x, y, w, h in sorted(boxes, key=lambda b: -b[2] * b[3]):
        left, top, right, bottom = rect
        if x + w <= left or x >= right or y + h <= top or y >= bottom:
            continue  # already cut off with an earlier box
        cuts = [(left, max(top, y + h + margin), right, bottom), (left, top, right, min(bottom, y - margin)),
                (max(left, x + w + margin), top, right, bottom), (left, top, min(right, x - margin), bottom)]
        ok = [c for c in cuts if c[2] > c[0] and c[3] > c[1]
              and max(c[2] - c[0], c[3] - c[1]) / min(c[2] - c[0], c[3] - c[1]) <= max_aspect]
        if not ok:
            return None
        rect = max(ok, key=lambda c: (c[2] - c[0]) * (c[3] - c[1]))
    return rect


def inpaint(rgb: np.ndarray, boxes: list[list[int]], dilate: int = 4, radius: int = 5, method: str = "telea") -> np.ndarray:
    import cv2

    H, W = rgb.shape[:2]
    mask = np.zeros((H, W), np.uint8)
    for x, y, w, h in boxes:
        mask[max(0, y - dilate):min(H, y + h + dilate), max(0, x - dilate):min(W, x + w + dilate)] = 255
    flag = cv2.INPAINT_TELEA if method == "telea" else cv2.INPAINT_NS
    return cv2.inpaint(np.ascontiguousarray(rgb), mask, radius, flag)


def _encode(img: Image.Image, fmt: str, info: dict) -> bytes:
    buf = io.BytesIO()
    kw: dict = {}
    if fmt == "JPEG":
        kw = {"quality": 95, "subsampling": 0}
    elif fmt == "WEBP":
        kw = {"quality": 95}
    if info.get("icc_profile"):
        kw["icc_profile"] = info["icc_profile"]
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def fix_image(path: Path, boxes: list[list[int]], cfg: FixMarksConfig) -> tuple[bytes | None, str]:
    """(new file bytes, what changed) for one image; (None, why not) when it is left alone."""
    with Image.open(confine(path, "image")) as img:
        img.load()
        fmt, info, mode = img.format or "PNG", dict(img.info), img.mode
        W, H = img.size
        bad = [b for b in boxes if b[2] <= 0 or b[3] <= 0 or b[0] < 0 or b[1] < 0 or b[0] + b[2] > W or b[1] + b[3] > H]
        if bad:
            return None, f"box {bad[0]} does not fit the {W}x{H} image (the report is for another version of it)"
        if cfg.mode == "crop":
            rect = crop_rect(W, H, boxes, cfg.margin, cfg.max_aspect)
            if rect is None:
                return None, f"every crop leaves a ratio over {cfg.max_aspect:g} (use --mode inpaint)"
            out = img.crop(rect)
            change = f"cropped {W}x{H} -> {out.width}x{out.height} (kept x {rect[0]}-{rect[2]}, y {rect[1]}-{rect[3]})"
            if min(out.size) < cfg.min_side:
                change += f"; short side {min(out.size)} is below min_side {cfg.min_side}"
        else:
            work = img.convert("RGBA" if "A" in mode else "RGB")
            arr = np.array(work)
            arr[..., :3] = inpaint(arr[..., :3], boxes, cfg.dilate, cfg.radius, cfg.method)
            out = Image.fromarray(arr, work.mode)
            if mode not in (work.mode,) and mode in ("L", "P"):
                out = out.convert(mode)
            change = f"inpainted {len(boxes)} box(es) ({cfg.method}, grown {cfg.dilate} px)"
        if fmt == "JPEG" and out.mode not in ("RGB", "L"):
            out = out.convert("RGB")
        return _encode(out, fmt, info), change


# ---- which boxes ---------------------------------------------------------------------------------------------
def inside(root: Path, value: str, what: str) -> Path:
    """`value` (relative to `root`, or absolute) as a path inside `root` with every link followed, else a ConfigError."""
    text = str(value)
    if not text or "\x00" in text:
        raise ConfigError(f"{what}: {text!r} is not a path")
    path = real(text, root) if not Path(text).is_absolute() else real(text)
    if not within(path, real(root)) or path == real(root):
        raise ConfigError(f"{what}: {text!r} is outside the dataset folder {root}; refusing to change it")
    if any(part.startswith(STATE_DIR) for part in path.relative_to(real(root)).parts):
        raise ConfigError(f"{what}: {text!r} is inside the dataset's own state (backups, caches); refusing to change it")
    if path.suffix.lower() not in IMAGE_EXTENSIONS:
        raise ConfigError(f"{what}: {text!r} is not an image ({', '.join(sorted(IMAGE_EXTENSIONS))})")
    return path


def _from_report_root(text: str, report_root: object) -> str:
    """A report's relative path is relative to where `dataset check` ran, and starts with the folder it was given
    (`ds/img.png` for `dataset check ds`): that prefix is dropped so the rest is read inside the dataset folder."""
    if not isinstance(report_root, str) or not report_root or Path(text).is_absolute():
        return text
    prefix, parts = Path(report_root).parts, Path(text).parts
    return str(Path(*parts[len(prefix):])) if len(parts) > len(prefix) and parts[:len(prefix)] == prefix else text


def boxes_from_report(root: Path, report: str) -> dict[Path, list[list[int]]]:
    """The fixable boxes of a check report, per image; the report is untrusted input, checked whole before use."""
    try:
        data = json.loads(Path(confine(report, "report")).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ConfigError(f"report: {report} is not a readable check report ({e})") from None
    items = data.get("findings") if isinstance(data, dict) else None
    if not isinstance(items, list):
        raise ConfigError(f"report: {report} has no 'findings' list (write one with `dataset check --json_output`)")
    out: dict[Path, list[list[int]]] = {}
    for n, f in enumerate(items):
        if not isinstance(f, dict) or f.get("check") not in MARK_CHECKS or f.get("kind") not in FIXABLE:
            continue
        boxes = f.get("boxes")
        if not isinstance(boxes, list) or not all(isinstance(b, list) and len(b) == 4 and all(
                isinstance(v, int) and not isinstance(v, bool) for v in b) for b in boxes):
            raise ConfigError(f"report: finding {n} of {report} has malformed 'boxes' (want [[x, y, w, h], ...])")
        path = inside(root, _from_report_root(str(f.get("path", "")), data.get("root")), f"report finding {n}")
        out.setdefault(path, [])
        out[path] += [b for b in boxes if b not in out[path]]
    return out


def detect_boxes(root: Path, reporter: Reporter) -> dict[Path, list[list[int]]]:
    from .config import CheckConfig
    from .report import run_check

    report = run_check(CheckConfig(dataset_dir=str(root), checks=list(MARK_CHECKS), quiet=True), reporter)
    out: dict[Path, list[list[int]]] = {}
    for f in report.findings:
        if f.kind in FIXABLE:
            out.setdefault(real(f.path), []).extend(f.boxes)
    return out


@job
def run_fix_marks(cfg: FixMarksConfig, reporter: Reporter, stop: StopFlag) -> FixResult:
    """Crop or inpaint every fixable mark (from --report, or found again), each image written through the journal.

    stop ends after the current image; what was written stays journalled and `tags undo` restores it."""
    root = Path(confine(cfg.dataset_dir, "dataset_dir"))
    if not root.is_dir():
        raise ConfigError(f"dataset_dir: {cfg.dataset_dir} is not a folder")
    wanted = {inside(root, i, "images") for i in cfg.images}  # a wrong --images is refused before any detection
    todo = boxes_from_report(root, cfg.report) if cfg.report else detect_boxes(root, reporter)
    if wanted:
        todo = {p: b for p, b in todo.items() if p in wanted}
    result = FixResult(dataset_dir=str(root), mode=cfg.mode, dry_run=cfg.dry_run)
    op = None if cfg.dry_run else Journal(root).begin("fix-marks", f"{cfg.mode} marks on {len(todo)} image(s)")
    reporter.start(len(todo), f"{cfg.mode} marks", unit="img")
    try:
        for path, boxes in sorted(todo.items()):
            rel = path.relative_to(real(root)).as_posix()
            if not path.is_file():
                result.skipped.append({"image": rel, "why": "not found"})
                continue
            try:
                data, change = fix_image(path, boxes, cfg)
            except (OSError, ValueError, Image.DecompressionBombError) as e:  # not an image after all, or too large to open
                data, change = None, f"not fixed: {e}"
            if data is None:
                result.skipped.append({"image": rel, "why": change})
            else:
                if op is not None:
                    op.write({path: data})
                result.fixed.append({"image": rel, "change": change, "boxes": boxes})
            reporter.advance()
            if stop.is_set():
                result.stopped = True
                break
    finally:
        if op is not None:
            op.finish()
    reporter.done("")
    return result
