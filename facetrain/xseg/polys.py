"""Hand-drawn include / exclude polygons of a face, in DeepFaceLab's `seg_ie_polys` structure.

DFL stores `{"polys": [{"type": 1, "pts": [[x, y], ...]}, ...]}` (type 1 = include, 0 = exclude; older files
a list of `(type, pts)` pairs) in the aligned image's pixel coordinates. Its mask is every include polygon
filled with 1, then every exclude polygon filled with 0 over them, whatever order they were drawn in
(docs/face-swap.md#xseg-labels). The polygons are input like any other: sizes and numbers are checked here,
so a crafted file cannot make us allocate or draw without bound.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from ..faceset import FaceMeta, FacesetError, read_meta, write_meta

EXCLUDE, INCLUDE = 0, 1
MAX_POLYS = 100
MAX_POINTS = 1000  # over all polygons of a face: keeps the metadata inside one JPEG comment


@dataclass
class Poly:
    type: int                 # INCLUDE or EXCLUDE
    pts: list[list[float]]    # N x 2, aligned-image pixels

    def dump(self) -> dict:
        return {"type": int(self.type), "pts": [[round(float(x), 2), round(float(y), 2)] for x, y in self.pts]}


def parse_polys(data: object, source: str) -> list[Poly]:
    """DFL's dict (or its older list form) as checked polygons; a malformed entry names the face."""
    if data is None:
        return []
    if isinstance(data, dict):
        items = data.get("polys", [])
        entries = [(d.get("type"), d.get("pts")) if isinstance(d, dict) else (None, None) for d in items] \
            if isinstance(items, list) else None
    elif isinstance(data, list):
        entries = [tuple(d) if isinstance(d, (list, tuple)) and len(d) == 2 else (None, None) for d in data]
    else:
        entries = None
    if entries is None:
        raise FacesetError(f"{source}: seg_ie_polys is neither DeepFaceLab's dict nor its list of (type, points)")
    if len(entries) > MAX_POLYS:
        raise FacesetError(f"{source}: {len(entries)} polygons; at most {MAX_POLYS} are read")
    out, total = [], 0
    for k, (kind, pts) in enumerate(entries):
        if kind not in (EXCLUDE, INCLUDE) or isinstance(kind, bool):
            raise FacesetError(f"{source}: polygon {k} has type {kind!r}; expected 1 (include) or 0 (exclude)")
        try:
            arr = np.asarray(pts, np.float64).reshape(-1, 2) if pts is not None and len(pts) else np.zeros((0, 2))
        except (TypeError, ValueError):
            raise FacesetError(f"{source}: polygon {k} points are not [x, y] pairs") from None
        if not np.isfinite(arr).all() or (np.abs(arr) > 1e5).any():
            raise FacesetError(f"{source}: polygon {k} has a point that is not a finite pixel position")
        total += len(arr)
        if total > MAX_POINTS:
            raise FacesetError(f"{source}: more than {MAX_POINTS} polygon points; simplify the polygons")
        out.append(Poly(int(kind), arr.tolist()))
    return out


def dump_polys(polys: list[Poly]) -> dict:
    """DFL's structure, which `face export-dfl` writes back and DFL's editor reads."""
    return {"polys": [p.dump() for p in polys]}


def face_polys(meta: FaceMeta, source: str = "face") -> list[Poly]:
    return parse_polys(meta.extra.get("seg_ie_polys"), source)


def is_labelled(meta: FaceMeta) -> bool:
    """A face XSeg trains on: it has at least one include polygon with an area (DFL's `has_polys`)."""
    try:
        return any(p.type == INCLUDE and len(p.pts) >= 3 for p in face_polys(meta))
    except FacesetError:
        return False


def polys_mask(polys: list[Poly], size: int, scale: float = 1.0) -> np.ndarray:
    """float32 size x size mask: includes filled with 1, then excludes with 0 (DFL's order). `scale` maps the
    polygons' pixel coordinates (the stored face's) to `size`."""
    mask = np.zeros((size, size), np.float32)
    ordered = [p for p in polys if p.type == INCLUDE] + [p for p in polys if p.type == EXCLUDE]
    for p in ordered:
        if len(p.pts) < 3:
            continue
        pts = np.round(np.asarray(p.pts, np.float64) * scale).astype(np.int32)
        cv2.fillPoly(mask, [pts], 1.0 if p.type == INCLUDE else 0.0)
    return mask


def set_face_polys(path: str | Path, polys: list[Poly]) -> FaceMeta:
    """Store a face's polygons in its metadata (atomic; pixels untouched). An empty list removes them."""
    meta = read_meta(path)
    checked = parse_polys(dump_polys(polys), str(path))  # what is written is what a reader accepts
    if checked:
        meta.extra["seg_ie_polys"] = dump_polys(checked)
    else:
        meta.extra.pop("seg_ie_polys", None)
    write_meta(path, meta)
    return meta


def polygon_area(pts: list[list[float]]) -> float:
    """Shoelace area in pixels (for tests and the labelling page's summary)."""
    if len(pts) < 3:
        return 0.0
    a = np.asarray(pts, np.float64)
    return 0.5 * math.fabs(float(np.dot(a[:, 0], np.roll(a[:, 1], 1)) - np.dot(a[:, 1], np.roll(a[:, 0], 1))))
