"""The `text_marks` and `video_marks` checks: overlays found per image, and marks that stay put across a clip.

Frames of one video are grouped by what `loratrain dataset frames` writes: one folder, one size, and one
file-name stem once its trailing frame number is removed (`clip_00000500ms.png`, `clip_00001000ms.png`,
also `shot-0001.jpg`, `frame 12.png`). A group of at least `video_min_frames` is compared as one clip:
a pixel whose thin-stroke contrast is there in every frame while the scene changes is part of a burned-in
logo, channel bug or timestamp (a moving scene puts a stroke on one pixel in every frame only by chance; the
background between a logo's letters changes, so the pixel values themselves are not compared). A clip whose scene hardly changes (a locked-off camera on a still
subject) tells nothing this way and yields no finding.
"""
from __future__ import annotations

import re
import threading
from collections import defaultdict
from collections.abc import Iterable, Iterator
from functools import lru_cache
from pathlib import Path

import numpy as np

from loratrain.core.errors import ConfigError
from loratrain.core.images import open_image, to_rgb_on_white
from loratrain.core.parallel import ordered_map

from .checks import CHECKS, Dataset, Finding
from .marks import Mark, MarkOptions, _merge_boxes, _resize, detect, place, stroke_maps

VIDEO_SIDE = 512
_FRAME_NUMBER = re.compile(r"[ _.\-]*\d+(ms)?$")
WHERE = {"band": "a text band (subtitle or caption)", "corner": "text in a corner (signature, logo or timestamp)",
         "tiled": "a tiled watermark over the whole image", "static": "a mark that stays put across the clip's frames",
         "model": "text found by the text detector"}
FIX = {"band": "crop it away or inpaint it", "corner": "crop it away or inpaint it", "static": "crop it away or inpaint it",
       "model": "crop it away or inpaint it", "tiled": "neither crop nor inpaint helps: use a clean copy or drop the image"}


def options(cfg) -> MarkOptions:
    return MarkOptions(contrast=cfg.marks_contrast, min_chars=cfg.marks_min_letters, isolation=cfg.marks_isolation,
                       tiled_lines=cfg.marks_tiled_lines)


def load_rgb(path: Path) -> np.ndarray:
    with open_image(path) as img:
        return np.asarray(to_rgb_on_white(img))


# ---- the optional model ------------------------------------------------------------------------------------
_model_lock = threading.Lock()


@lru_cache(maxsize=2)
def _text_model(path: str):
    """OpenCV's TextDetectionModel over the user's ONNX file: DB unless the file name says EAST."""
    import cv2

    from loratrain.core.paths import confine

    file = confine(path, "text_model")  # checked here, where it is opened: OpenCV's own open is out of our sight
    if not file.is_file():
        raise ConfigError(f"text_model: {path} {'is a folder' if file.is_dir() else 'not found'}; give an ONNX file")
    data = np.frombuffer(file.read_bytes(), np.uint8)  # the bytes of the checked file, handed to OpenCV
    try:
        net = cv2.dnn.readNetFromONNX(data)
        east = "east" in Path(path).name.lower()
        model = cv2.dnn.TextDetectionModel_EAST(net) if east else cv2.dnn.TextDetectionModel_DB(net)
    except cv2.error as e:
        raise ConfigError(f"text_model: {path} cannot be loaded as an ONNX text detector (OpenCV "
                          f"{cv2.__version__} reads ONNX only: convert an EAST .pb first): {str(e).strip()[-200:]}") from None
    if east:
        model.setConfidenceThreshold(0.5).setNMSThreshold(0.4)
        model.setInputParams(1.0, (320, 320), (123.68, 116.78, 103.94), True)
    else:
        model.setBinaryThreshold(0.3).setPolygonThreshold(0.5).setUnclipRatio(2.0).setMaxCandidates(200)
        model.setInputParams(1.0 / 255, (640, 640), (122.68, 116.67, 104.01), True)
    return model


def model_marks(rgb: np.ndarray, path: str) -> list[Mark]:
    """Text boxes from the user's detector, kept where overlays go (the same positional prior as the built-in)."""
    import cv2

    model = _text_model(path)
    H, W = rgb.shape[:2]
    with _model_lock:  # one network, not safe to run from several threads at once
        try:
            quads, confidences = model.detect(cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
        except cv2.error as e:
            want = ("EAST's score and geometry maps" if "east" in Path(path).name.lower()
                    else "a DB detector's HxW probability map; OpenCV 5 refuses 1x1xHxW")
            raise ConfigError(f"text_model: {path} failed on an image (the network must output {want}): "
                              f"{str(e).strip()[-200:]}") from None
    out = []
    for quad, conf in zip(quads, list(confidences) or [1.0] * len(quads)):
        x, y, w, h = cv2.boundingRect(np.asarray(quad, np.int32))
        x0, y0, x1, y1 = max(0, x), max(0, y), min(W, x + w), min(H, y + h)
        box = (x0, y0, x1 - x0, y1 - y0)
        where = place(box, W, H) if box[2] > 0 and box[3] > 0 else None
        if where:
            out.append(Mark(where, box, round(float(conf), 3)))
    return out


# ---- per image ---------------------------------------------------------------------------------------------
def find_marks(path: Path, opts: MarkOptions, text_model: str = "") -> list[Mark]:
    rgb = load_rgb(path)
    return model_marks(rgb, text_model) if text_model else detect(rgb, opts)


def findings(path: Path, marks: list[Mark], check: str = "text_marks") -> list[Finding]:
    """One finding per kind of mark on the image, carrying every box of that kind."""
    by_kind: dict[str, list[Mark]] = defaultdict(list)
    for m in marks:
        by_kind[m.kind].append(m)
    out = []
    for kind, items in by_kind.items():
        boxes = [m.as_list() for m in items]
        shown = ", ".join(str(b) for b in boxes[:3]) + (" ..." if len(boxes) > 3 else "")
        out.append(Finding(check, str(path), "warning", f"{WHERE.get(kind, kind)} at {shown}: {FIX.get(kind, '')}",
                           round(max(m.score for m in items), 3), kind=kind, boxes=boxes))
    return out


@CHECKS.register("text_marks")
def text_marks(ds: Dataset) -> list[Finding]:
    """Subtitles, signatures, logos, timestamps and tiled watermarks over the image (marks.py says how)."""
    opts, model = options(ds.cfg), ds.cfg.text_model
    if model:
        _text_model(model)  # a bad file is one clear error, before any image
    out = []
    for info, marks in ordered_map(lambda i: find_marks(i.path, opts, model), ds.readable(), ds.cfg.workers,
                                   lookahead=4 * ds.cfg.workers):
        if isinstance(marks, ConfigError):
            raise marks
        if isinstance(marks, BaseException):
            continue  # decoded once already by measure; a file changed meanwhile is the corrupt check's to report
        out += findings(info.path, marks)
    return out


# ---- frames of one video -----------------------------------------------------------------------------------
def clips(ds: Dataset) -> list[list[Path]]:
    """Frames grouped as one clip each: same folder, same size, same name stem without its frame number."""
    groups: dict[tuple, list[Path]] = defaultdict(list)
    for info in ds.readable():
        stem = _FRAME_NUMBER.sub("", info.path.stem)
        if stem != info.path.stem:
            groups[(info.path.parent, info.width, info.height, stem)].append(info.path)
    return [sorted(paths) for paths in groups.values() if len(paths) >= ds.cfg.video_min_frames]


def static_marks(frames: Iterable[np.ndarray], contrast: float = 30.0,
                 size: tuple[int, int] | None = None) -> list[tuple[int, int, int, int]]:
    """Boxes (in the frames' pixels) of strokes present in every frame of a changing scene; [] if the scene is still.

    Frames are taken one at a time and kept only as running sums and a running AND of their strokes: a folder of
    a thousand numbered photos of one size is one "clip", and holding its frames would take gigabytes. `size` is
    (width, height) of the original frames when the frames given are already shrunk (to VIDEO_SIDE or less)."""
    import cv2

    count, total, squares, always, scale = 0, None, None, None, 1.0
    W = H = 0
    for frame in frames:
        small, _ = _resize(frame, VIDEO_SIDE)
        g = cv2.cvtColor(small, cv2.COLOR_RGB2GRAY) if small.ndim == 3 else small
        if total is None:
            H, W = frame.shape[:2] if size is None else (size[1], size[0])
            scale = small.shape[1] / W
            total, squares = np.zeros(g.shape, np.float64), np.zeros(g.shape, np.float64)
        g64 = g.astype(np.float64)
        total += g64
        squares += g64 * g64
        bright, dark = stroke_maps(g, 9)
        strokes = np.maximum(bright, dark) >= contrast
        always = strokes if always is None else always & strokes
        count += 1
    if not count:
        return []
    mean = total / count
    sd = np.sqrt(np.maximum(squares / count - mean * mean, 0.0))
    if np.median(sd) < 8.0:
        return []  # too little of the scene moves to tell a mark from the background
    mask = always.astype(np.uint8)  # the pixels between a logo's letters change with the scene: strokes alone count
    mask = cv2.morphologyEx(mask, cv2.MORPH_CLOSE, np.ones((7, 7), np.uint8))
    n, _, stats, _ = cv2.connectedComponentsWithStats(mask, connectivity=8)
    boxes = []
    for x, y, w, h, area in stats[1:]:
        if area >= 20 and w >= 4 and h >= 4:
            boxes.append(((int(x), int(y), int(w), int(h)), float(max(h, 4))))
    out = []
    for (x, y, w, h), _ in _merge_boxes(boxes):
        x0, y0 = max(0, int(x / scale) - 3), max(0, int(y / scale) - 3)
        x1, y1 = min(W, int(np.ceil((x + w) / scale)) + 3), min(H, int(np.ceil((y + h) / scale)) + 3)
        out.append((x0, y0, x1 - x0, y1 - y0))
    return out


class _UnreadableFrame(Exception):
    pass


def _small_frame(path: Path) -> np.ndarray:
    return _resize(load_rgb(path), VIDEO_SIDE)[0]


def _frames(paths: list[Path], workers: int) -> Iterator[np.ndarray]:
    """A clip's frames shrunk to VIDEO_SIDE, decoded on worker threads ahead of use; a frame that fails raises."""
    for _, frame in ordered_map(_small_frame, paths, workers, lookahead=2 * workers):
        if isinstance(frame, BaseException):
            raise _UnreadableFrame(str(frame))
        yield frame


@CHECKS.register("video_marks")
def video_marks(ds: Dataset) -> list[Finding]:
    """Logos, channel bugs and timestamps burned into every frame of a clip (see the module docstring for grouping)."""
    out = []
    sizes = {i.path: (i.width, i.height) for i in ds.readable()}
    for paths in clips(ds):
        try:
            boxes = static_marks(_frames(paths, ds.cfg.workers), size=sizes[paths[0]])
        except _UnreadableFrame:  # a frame that no longer decodes: the corrupt check reports it
            continue
        if not boxes:
            continue
        names = [str(p) for p in paths]
        for p in paths:
            out += [Finding(f.check, f.path, f.severity, f.message, f.score, group=names, kind=f.kind, boxes=f.boxes)
                    for f in findings(p, [Mark("static", b, float(len(paths))) for b in boxes], "video_marks")]
    return out
