"""Text and marks laid over an image (subtitles, signatures, logos, timestamps, tiled watermarks), found without a model.

Why these statistics: an overlay is drawn *on* the photo, so its strokes are thin, of one width and far
brighter or darker than what lies right around them, and its letters sit side by side on one baseline.
Morphological top-hat / black-hat (the image minus its opening / its closing minus the image, with a
kernel wider than a stroke) keeps exactly such thin high-contrast strokes and drops smooth shading and
large shapes. Their connected components are grouped into text lines (similar heights, shared baseline,
gaps under a letter height); a line counts only when it stands out from the band just above and below it
(grass and gravel are stroke-like everywhere) and lies where overlays go: the bottom or top band
(subtitles, captions) or a corner (signatures, logos, timestamps). Text in the middle of a photo is
usually part of the scene (a sign, a shirt) and is left alone.

A tiled watermark is faint and everywhere, so no single line stands out from its band; instead there
are many lines of one letter height spread over the whole image, found with a lower contrast and after
turning the image back by the usual tiling angles. (An autocorrelation of the stroke map was tried
first: turned or rescaled tiles blur its peak below what brick and clock faces reach.)

Every box is in the image's own pixels, [x, y, w, h].
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

WORK_SIDE = 1024  # text lines are found at most at this size (long side)
TILE_SIDE = 640  # tiled watermarks are looked for at this size
TILE_ANGLES = (0, 30, -30, 45, -45)
_PAIRS = 1 << 18  # candidate component pairs tested at once when grouping lines (a few MB of numpy arrays)
BOTTOM_BAND = 0.62  # a line whose top is below this share of the height is in the bottom band
TOP_BAND = 0.28  # ... whose bottom is above this share is in the top band


@dataclass
class MarkOptions:
    """The thresholds of `dataset check`'s text_marks options (config.py), in one place for the fixes and the app."""

    contrast: float = 40.0  # least stroke contrast, 0-255
    min_chars: int = 5  # least letters (stroke components) in a line
    isolation: float = 3.0  # a line's stroke density over that of the band around it
    tiled_lines: int = 5  # least lines of one height, over 3+ ninths of the image, for a tiled watermark


@dataclass
class Mark:
    kind: str  # band | corner | tiled | static | model
    box: tuple[int, int, int, int]  # x, y, w, h in image pixels
    score: float

    def as_list(self) -> list[int]:
        return [int(v) for v in self.box]


def _resize(arr: np.ndarray, side: int) -> tuple[np.ndarray, float]:
    import cv2

    h, w = arr.shape[:2]
    scale = min(1.0, side / max(h, w))
    if scale < 1.0:
        arr = cv2.resize(arr, (max(1, round(w * scale)), max(1, round(h * scale))), interpolation=cv2.INTER_AREA)
    return arr, scale


def stroke_maps(rgb: np.ndarray, kernel: int) -> list[np.ndarray]:
    """Thin-stroke contrast maps, uint8: bright and dark strokes of the luma, bright and dull strokes of the
    chroma (max - min of R, G, B: a red signature on grey has little luma contrast).

    Polarities and channels stay apart: an outlined subtitle is a bright letter inside a dark rim, and the grey
    gaps between yellow letters are "bright" in the blue channel; mixed, each line would become one blob."""
    import cv2

    k = cv2.getStructuringElement(cv2.MORPH_RECT, (kernel, kernel))
    if rgb.ndim == 2:
        planes = [rgb]
    else:
        r, g, b = cv2.split(rgb)
        chroma = cv2.subtract(cv2.max(cv2.max(r, g), b), cv2.min(cv2.min(r, g), b))
        planes = [cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY), chroma]
    out = []
    for plane in planes:
        out.append(cv2.morphologyEx(plane, cv2.MORPH_TOPHAT, k))
        out.append(cv2.morphologyEx(plane, cv2.MORPH_BLACKHAT, k))
    return out


def _components(mask: np.ndarray, max_h: int) -> tuple[np.ndarray, np.ndarray]:
    """(letter-like components as rows of x, y, w, h, area, label, letters; the label image).

    Letters that touch (bold or antialiased text) make one wide component: it is kept when a row through its
    middle crosses strokes about as often as a word's letters would, and counts as that many letters."""
    import cv2

    n, labels, stats, _ = cv2.connectedComponentsWithStats(mask, connectivity=8)
    s = np.concatenate([stats[1:].astype(np.int64), np.arange(1, n, dtype=np.int64)[:, None],
                        np.ones((n - 1, 1), np.int64)], axis=1)
    if not len(s):
        return s.reshape(0, 7), labels
    x, y, w, h, area = s[:, :5].T
    fill = area / np.maximum(1, w * h)
    keep = (h >= 6) & (h <= max_h) & (w >= 2) & (w <= 40 * h) & (fill >= 0.08) & (fill <= 0.95) & (area >= 10)
    s = s[keep]
    for row in s:
        cx, cy, cw, ch, _, lab, _ = row
        if cw <= 2.5 * ch:
            continue
        box = labels[cy:cy + ch, cx:cx + cw] == lab
        rows = box[[ch // 3, ch // 2, (2 * ch) // 3]].astype(np.int8)
        crossings = float(np.mean((np.diff(rows, axis=1) == 1).sum(axis=1)))
        row[6] = round(crossings / 1.6) if crossings >= 0.9 * cw / ch else 0
    return s[s[:, 6] > 0], labels


def _lines(comps: np.ndarray) -> list[np.ndarray]:
    """Group letter components into lines: overlapping rows, similar heights, gaps under ~1.3 letter heights.

    The candidate pairs (a component and those starting within reach to its right) are tested all at once with
    numpy: a photo of grass has thousands of components, and a Python loop over the pairs was most of the check."""
    if len(comps) == 0:
        return []
    order = np.argsort(comps[:, 0])
    comps = comps[order]
    n = len(comps)
    x0, y0, w, h = comps[:, 0], comps[:, 1], comps[:, 2], comps[:, 3]
    x1, y1 = x0 + w, y0 + h
    end = np.searchsorted(x0, x1 + 1.3 * float(h.max()), side="right")  # x0 is sorted: j < end[i] is within reach
    counts = np.maximum(0, end - np.arange(1, n + 1))
    parent = np.arange(n)
    total = np.cumsum(counts)
    cuts = np.searchsorted(total, np.arange(_PAIRS, int(total[-1]), _PAIRS), side="right")
    for start, stop in zip([0, *cuts.tolist()], [*cuts.tolist(), n]):  # about _PAIRS pairs in memory at a time
        i = np.repeat(np.arange(start, stop), counts[start:stop])
        if not len(i):
            continue
        firsts = np.cumsum(counts[start:stop]) - counts[start:stop]
        j = i + 1 + np.arange(len(i)) - np.repeat(firsts, counts[start:stop])
        lo, hi = np.minimum(h[i], h[j]), np.maximum(h[i], h[j])
        gap = x0[j] - x1[i]
        overlap = np.minimum(y1[i], y1[j]) - np.maximum(y0[i], y0[j])
        ok = (gap <= 1.3 * hi) & (gap >= -0.5 * lo) & (overlap >= 0.6 * lo) & (hi <= 2.2 * lo)
        for a, b in zip(i[ok].tolist(), j[ok].tolist()):
            ra, rb = _root(parent, a), _root(parent, b)
            if ra != rb:
                parent[max(ra, rb)] = min(ra, rb)  # the smaller index is the root: groups come out in the old order
    while True:  # every component pointed straight at its group's root
        up = parent[parent]
        if np.array_equal(up, parent):
            break
        parent = up
    _, labels = np.unique(parent, return_inverse=True)
    members = np.argsort(labels, kind="stable")
    bounds = np.cumsum(np.bincount(labels))[:-1]
    groups = np.split(members, bounds)
    return [comps[g] for g in sorted(groups, key=lambda g: g[0])]


def _root(parent: np.ndarray, a: int) -> int:
    while parent[a] != a:
        parent[a] = parent[parent[a]]
        a = int(parent[a])
    return a


def _density(mask: np.ndarray, x0: int, y0: int, x1: int, y1: int) -> float:
    x0, y0 = max(0, x0), max(0, y0)
    x1, y1 = min(mask.shape[1], x1), min(mask.shape[0], y1)
    if x1 <= x0 or y1 <= y0:
        return 0.0
    return float(mask[y0:y1, x0:x1].mean())


def text_lines(rgb: np.ndarray, opts: MarkOptions) -> list[tuple[tuple[int, int, int, int], int, float]]:
    """Text lines found anywhere in `rgb` (work scale): (box, letters, isolation), each standing out from its band."""
    return _text_lines(rgb, opts)[0]


def _text_lines(rgb: np.ndarray, opts: MarkOptions) -> tuple[list[tuple[tuple[int, int, int, int], int, float]], int]:
    """(text_lines, letter-like components seen in all stroke maps): the second tells a tiled search to stop early."""
    H, W = rgb.shape[:2]
    kernel = int(np.clip(round(max(H, W) / 48) | 1, 9, 21))
    out = []
    seen = 0
    for strokes in stroke_maps(rgb, kernel):
        mask = (strokes >= opts.contrast).astype(np.uint8)
        comps, labels = _components(mask, max_h=max(8, int(0.2 * H)))
        seen += int(comps[:, 6].sum())
        for line in _lines(comps):
            if line[:, 6].sum() < opts.min_chars:
                continue  # too few letters whatever line_features drops: most groups are single blobs
            feats = line_features(line, labels, mask, rgb)
            if feats is None or feats["letters"] < opts.min_chars or feats["isolation"] < opts.isolation:
                continue
            out.append((feats["box"], feats["letters"], feats["isolation"]))
    return out, seen


def line_features(line: np.ndarray, labels: np.ndarray, mask: np.ndarray, rgb: np.ndarray) -> dict | None:
    """What tells a line of overlay letters from chance structure: one letter height, one baseline (or top line),
    one colour, and more strokes than the band just above and below."""
    h = float(np.median(line[:, 3]))
    centre = float(np.median(line[:, 1] + line[:, 3] / 2))
    fits = (np.abs(line[:, 1] + line[:, 3] / 2 - centre) <= 0.45 * h) & (line[:, 3] <= 1.9 * h)
    line = line[fits]  # a stray blob the grouping chained on is dropped, not allowed to stretch the box
    if not len(line):
        return None
    h = float(np.median(line[:, 3]))
    tops, bottoms = line[:, 1], line[:, 1] + line[:, 3]
    if len(line) > 1:
        spread = min(np.median(np.abs(bottoms - np.median(bottoms))), np.median(np.abs(tops - np.median(tops))))
        if spread > 0.2 * h or np.median(np.abs(line[:, 3] - h)) > 0.3 * h:
            return None
    x0, y0 = int(line[:, 0].min()), int(tops.min())
    x1, y1 = int((line[:, 0] + line[:, 2]).max()), int(bottoms.max())
    if x1 - x0 < 2.0 * h or y1 - y0 > 2.8 * h:
        return None
    if np.median(line[:, 4] / np.maximum(1, line[:, 2] * line[:, 3])) > 0.65:
        return None  # a row of solid blobs (lamps, rivets, beads), not strokes
    inside = _density(mask, x0, y0, x1, y1)
    pad = int(max(4, 1.2 * h))
    above, below = _density(mask, x0, y0 - pad, x1, y0), _density(mask, x0, y1, x1, y1 + pad)
    if y0 - pad < 0:
        above = below
    if y1 + pad > mask.shape[0]:
        below = above
    region = labels[y0:y1, x0:x1]
    ink = np.isin(region, line[:, 5])
    pixels = (rgb[y0:y1, x0:x1][ink] if rgb.ndim == 3 else rgb[y0:y1, x0:x1][ink][:, None]).astype(np.float32)
    colour = float(pixels.std(axis=0).mean()) if len(pixels) else 255.0
    return {"box": (x0, y0, x1 - x0, y1 - y0), "letters": int(line[:, 6].sum()),
            "isolation": inside / max((above + below) / 2, 0.01), "colour": colour, "h": h}


def _merge_boxes(items: list[tuple[tuple[int, int, int, int], float]]) -> list[tuple[tuple[int, int, int, int], float]]:
    """Union line boxes of a similar letter height (the second item) lying within 0.8 letter heights of each other:
    two subtitle lines, or the words of one line, become one box; a row of lamps above a signature does not."""
    boxes = [[*b, h] for b, h in items]
    merged = True
    while merged:
        merged = False
        for i in range(len(boxes)):
            for j in range(i + 1, len(boxes)):
                a, b = boxes[i], boxes[j]
                gap = 0.8 * max(a[4], b[4])
                if (max(a[4], b[4]) <= 1.6 * min(a[4], b[4]) and a[0] - gap <= b[0] + b[2] and b[0] - gap <= a[0] + a[2]
                        and a[1] - gap <= b[1] + b[3] and b[1] - gap <= a[1] + a[3]):
                    x0, y0 = min(a[0], b[0]), min(a[1], b[1])
                    x1, y1 = max(a[0] + a[2], b[0] + b[2]), max(a[1] + a[3], b[1] + b[3])
                    boxes[i] = [x0, y0, x1 - x0, y1 - y0, max(a[4], b[4])]
                    del boxes[j]
                    merged = True
                    break
            if merged:
                break
    return [((b[0], b[1], b[2], b[3]), b[4]) for b in boxes]


def place(box: tuple[int, int, int, int], width: int, height: int) -> str | None:
    """Where an overlay line sits: "band" (bottom/top, centred or wide), "corner", or None (mid-image: scene text)."""
    x, y, w, h = box
    if y >= BOTTOM_BAND * height or y + h <= TOP_BAND * height:
        cx = x + w / 2
        if w >= 0.45 * width or abs(cx - width / 2) <= 0.12 * width:
            return "band"
        return "corner"
    return None


def overlay_marks(rgb: np.ndarray, opts: MarkOptions) -> list[Mark]:
    """Band and corner text of one RGB (or gray) uint8 image, boxes in its own pixels."""
    H, W = rgb.shape[:2]
    small, scale = _resize(rgb, WORK_SIDE)
    lines = text_lines(small, opts)
    found: dict[str, list[tuple[tuple[int, int, int, int], float]]] = {}
    boxes = []
    for box, letters, isolation in lines:
        full = _to_image(box, scale, W, H)
        if place(full, W, H):
            boxes.append((full, letters * min(isolation, 10.0)))
    for merged, _ in _merge_boxes([(b, _letter_height(b)) for b, _ in boxes]):
        kind = place(merged, W, H) or "corner"
        score = sum(s for b, s in boxes if _inside(b, merged))
        found.setdefault(kind, []).append((merged, score))
    return [Mark(kind, box, round(score, 2)) for kind, items in found.items() for box, score in items]


def _letter_height(full: tuple[int, int, int, int]) -> float:
    """Letter height (image pixels) of the line whose box this is: its box height, which `line_features` keeps
    within 2.8 letter heights; good enough to tell a 12 px signature from 60 px scene blobs."""
    return full[3] / 1.4


def _inside(a: tuple[int, int, int, int], b: tuple[int, int, int, int]) -> bool:
    return a[0] >= b[0] and a[1] >= b[1] and a[0] + a[2] <= b[0] + b[2] and a[1] + a[3] <= b[1] + b[3]


def _to_image(box: tuple[int, int, int, int], scale: float, W: int, H: int, pad: int = 2) -> tuple[int, int, int, int]:
    x, y, w, h = (v / scale for v in box)
    x0, y0 = max(0, int(np.floor(x)) - pad), max(0, int(np.floor(y)) - pad)
    x1, y1 = min(W, int(np.ceil(x + w)) + pad), min(H, int(np.ceil(y + h)) + pad)
    return (x0, y0, x1 - x0, y1 - y0)


def _rotated(rgb: np.ndarray, angle: float) -> np.ndarray:
    import cv2

    if not angle:
        return rgb
    H, W = rgb.shape[:2]
    m = cv2.getRotationMatrix2D((W / 2, H / 2), angle, 1.0)
    return cv2.warpAffine(rgb, m, (W, H), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT)


def tiled_score(rgb: np.ndarray, opts: MarkOptions) -> tuple[int, int]:
    """(lines of one letter height, cells of a 3x3 grid they fall in), at the best of a few angles.

    A tiled watermark is the same text again and again: many lines of one height spread over the whole image,
    faint (so a lower contrast than for overlay lines), often turned (so the image is turned back first).

    Most of the cost is the turned passes, so they are skipped when the unturned pass finds fewer letter-like
    strokes in the whole image than one tiling needs (`tiled_lines` lines of 4): turning a plain sky, a studio
    backdrop or a smooth close-up does not make letters of it."""
    small, _ = _resize(rgb, TILE_SIDE)
    H, W = small.shape[:2]
    loose = MarkOptions(contrast=opts.contrast * 0.8, min_chars=4, isolation=2.0)
    best = (0, 0)
    for angle in TILE_ANGLES:
        lines, letters = _text_lines(_rotated(small, angle), loose)
        if not angle and letters < opts.tiled_lines * loose.min_chars:
            return _tiling(lines, W, H) if lines else best
        if angle:  # the corners of a turned image are reflections: count only the middle
            lines = [ln for ln in lines if abs(ln[0][0] + ln[0][2] / 2 - W / 2) < 0.35 * W
                     and abs(ln[0][1] + ln[0][3] / 2 - H / 2) < 0.35 * H]
        if lines:
            best = max(best, _tiling(lines, W, H), key=lambda t: (min(t[0], 2 * t[1]), t))
    return best


def _tiling(lines: list, W: int, H: int) -> tuple[int, int]:
    """(lines of the median letter height, cells of a 3x3 grid they fall in) of one pass."""
    med = float(np.median([b[3] for b, _, _ in lines]))
    similar = [b for b, _, _ in lines if abs(b[3] - med) <= 0.3 * med]
    cells = {(min(2, int(3 * (b[0] + b[2] / 2) / W)), min(2, int(3 * (b[1] + b[3] / 2) / H))) for b in similar}
    return len(similar), len(cells)


def detect(rgb: np.ndarray, opts: MarkOptions) -> list[Mark]:
    """Every built-in finding of one image: band / corner text lines and a tiled watermark."""
    marks = overlay_marks(rgb, opts)
    lines, cells = tiled_score(rgb, opts)
    if lines >= opts.tiled_lines and cells >= 3:
        H, W = rgb.shape[:2]
        return [Mark("tiled", (0, 0, W, H), float(lines))]  # its band and corner lines are pieces of the tiling
    return marks
