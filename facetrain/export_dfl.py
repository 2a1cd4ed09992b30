"""`loratrain face export-dfl`: a faceset -> DeepFaceLab DFLJPG files, XSeg polygons and masks included, so a
faceset labelled or segmented here can go on in DFL (docs/face-swap.md#xseg-labels).

Each face keeps its compressed JPEG data byte for byte (a PNG face is encoded to JPEG at quality 95). Our JSON
comment comes out and DFL's dict goes into an APP15 segment after the last APPn segment, where DFL's own writer
puts it. The dict has to be a pickle, since that is all DFL reads; this code writes it from metadata it has
checked, and never unpickles anything itself. Arrays are pickled as `numpy.ndarray(shape, dtype, bytearray)`:
numpy 2 would otherwise name its `numpy._core` module, which the numpy 1.x that DFL runs on cannot import.
"""
from __future__ import annotations

import base64
import binascii
import copyreg
import io
import pickle
import struct
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np

from loratrain.core.errors import ConfigError
from loratrain.core.jobs import JobResult, job
from loratrain.core.paths import confine
from loratrain.core.progress import Reporter, StopFlag
from loratrain.core.safe_io import atomic_write_bytes

from .config import ExportDflConfig
from .face_types import FACE_TYPE_NAMES
from .faceset import META_KEY, FaceMeta, FacesetError, _jpeg_segments, decode_dfl_mask, list_faces, load_face, read_meta
from .xseg.polys import face_polys

#: DFL's set_xseg_mask: a PNG, or a JPEG at the highest quality that keeps it within this many bytes
DFL_MASK_CAP = 50_000
#: an APPn segment's payload: its 16-bit length field counts itself
MAX_APP15 = 65533
PNG_TO_JPEG_QUALITY = 95
_SMALLEST_MASK = 16


def _reduce_array(a: np.ndarray) -> tuple:
    """`numpy.ndarray(shape, dtype, bytearray)`: over bytes the array would load read-only, and DFL's XSeg editor
    moves polygon points in place."""
    a = np.ascontiguousarray(a)
    return np.ndarray, (a.shape, a.dtype, bytearray(a.tobytes()))


class _DflPickler(pickle.Pickler):
    """A plain pickler whose arrays name only `numpy.ndarray`, `numpy.dtype` and `bytearray` (in numpy 1.x and 2)."""

    dispatch_table = {**copyreg.dispatch_table, np.ndarray: _reduce_array}


def dfl_pickle(d: dict) -> bytes:
    """Protocol 4: DFL's Python 3.6 reads it."""
    buf = io.BytesIO()
    _DflPickler(buf, protocol=4).dump(d)
    return buf.getvalue()


def dfl_mask_buffer(mask: np.ndarray) -> np.ndarray | None:
    """A uint8 mask encoded as DFL's set_xseg_mask does: cv2.imencode's (N, 1) uint8 array of a PNG, or of a JPEG
    at the highest quality within DFL_MASK_CAP bytes (found by bisection rather than DFL's 100 tries); None when
    not even quality 0 fits."""
    ok, buf = cv2.imencode(".png", mask)
    if ok and len(buf) <= DFL_MASK_CAP:
        return buf.reshape(-1, 1)  # the shape DFL's OpenCV gives (newer ones return N)
    best, lo, hi = None, 0, 100
    while lo <= hi:
        q = (lo + hi) // 2
        ok, jpg = cv2.imencode(".jpg", mask, [int(cv2.IMWRITE_JPEG_QUALITY), q])
        if ok and len(jpg) <= DFL_MASK_CAP:
            best, lo = jpg.reshape(-1, 1), q + 1
        else:
            hi = q - 1
    return best


def _mask_image(meta: FaceMeta, source: str) -> np.ndarray | None:
    """Our stored XSeg mask (base64 PNG) at its own resolution, size-checked before decoding."""
    data = meta.extra.get("xseg_mask")
    if not data:
        return None
    try:
        raw = base64.b64decode(data, validate=True)
    except (binascii.Error, TypeError, ValueError):
        raise FacesetError(f"{source}: its XSeg mask is not base64 data") from None
    return decode_dfl_mask(raw, source, "its XSeg mask")


def _rect_value(v: float) -> int | float:
    return int(v) if float(v).is_integer() else float(v)


def dfl_fields(meta: FaceMeta, source: str) -> dict:
    """DFL's dict for one face, without the mask: DFL's key names, its types (arrays where DFL keeps arrays, the
    polygons as SegIEPolys.dump() writes them, float32 points). Keys DFL would drop (None, no polygons) are left out."""
    face_type = FACE_TYPE_NAMES.get(meta.face_type)
    if face_type is None:
        raise FacesetError(f"{source}: face type {meta.face_type!r} has no DeepFaceLab name")
    d: dict = {
        "face_type": face_type,
        "landmarks": np.asarray(meta.landmarks, np.float64).reshape(68, 2),
        "source_filename": str(meta.source_filename),
        "source_rect": tuple(_rect_value(v) for v in meta.source_rect),
        "source_landmarks": np.asarray(meta.source_landmarks, np.float64).reshape(-1, 2),
        "image_to_face_mat": np.asarray(meta.image_to_face_mat, np.float64).reshape(2, 3),
        "eyebrows_expand_mod": float(meta.eyebrows_expand_mod),
    }
    polys = face_polys(meta, source)  # checked as on import: a malformed polygon refuses the face, named
    if polys:
        d["seg_ie_polys"] = {"polys": [{"type": int(p.type), "pts": np.asarray(p.pts, np.float32).reshape(-1, 2)}
                                       for p in polys]}
    return d


def dfl_payload(meta: FaceMeta, source: str) -> tuple[bytes, str | None]:
    """The APP15 pickle and, when the mask had to shrink to fit DFL's caps, a note saying so."""
    d = dfl_fields(meta, source)
    mask, note = _mask_image(meta, source), None
    while True:
        buf = None if mask is None else dfl_mask_buffer(mask)
        if buf is not None:
            d["xseg_mask"] = buf
        data = dfl_pickle(d) if mask is None or buf is not None else None
        if data is not None and len(data) <= MAX_APP15:
            return data, note
        if mask is None or min(mask.shape) // 2 < _SMALLEST_MASK:
            raise FacesetError(f"{source}: DeepFaceLab metadata does not fit one APP15 segment ({MAX_APP15} bytes)"
                               f"{' even with a small mask' if mask is not None else ''}; use fewer polygon points")
        mask = cv2.resize(mask, (mask.shape[1] // 2, mask.shape[0] // 2), interpolation=cv2.INTER_AREA)
        note = (f"{source}: XSeg mask shrunk to {mask.shape[1]}x{mask.shape[0]} px to fit DeepFaceLab's metadata "
                f"({DFL_MASK_CAP} bytes a mask, {MAX_APP15} a segment); DFL resizes masks on load")


def dfl_jpeg(jpeg: bytes, payload: bytes, source: str) -> bytes:
    """`jpeg` with our comment (and any older APP15) taken out and `payload` in an APP15 segment after the last APPn
    segment; the image data is kept byte for byte. An APP0 that is not JFIF is dropped: DFL's reader refuses it."""
    segs = _jpeg_segments(jpeg, source)
    scan = segs[-1][2] if segs else 2
    if jpeg[scan:scan + 2] != b"\xff\xda":
        raise FacesetError(f"{source}: JPEG has no image data after its header")
    ours = (META_KEY + ":").encode()
    kept: list[tuple[int, bytes]] = []
    for marker, s, e in segs:
        body = jpeg[s + 4:e]
        if marker == 0xEF or (marker == 0xFE and body.startswith(ours)) or (marker == 0xE0 and not body.startswith(b"JFIF\0")):
            continue
        kept.append((marker, jpeg[s:e]))
    last_app = max((i for i, (m, _) in enumerate(kept) if 0xE0 <= m <= 0xEF), default=-1)
    parts = [b for _, b in kept]
    parts.insert(last_app + 1, b"\xff\xef" + struct.pack(">H", len(payload) + 2) + payload)
    return b"\xff\xd8" + b"".join(parts) + jpeg[scan:]


def export_face(path: Path) -> tuple[bytes, FaceMeta, str | None]:
    """One face as DFLJPG bytes, its metadata, and a note when its mask shrank."""
    source = str(path)
    if path.suffix.lower() == ".png":
        img, meta = load_face(path)
        ok, buf = cv2.imencode(".jpg", img, [int(cv2.IMWRITE_JPEG_QUALITY), PNG_TO_JPEG_QUALITY])
        if not ok:
            raise FacesetError(f"{source}: cannot encode as JPEG")
        jpeg = buf.tobytes()
    else:
        meta = read_meta(confine(path, "face"))
        jpeg = path.read_bytes()
    payload, note = dfl_payload(meta, source)
    return dfl_jpeg(jpeg, payload, source), meta, note


def _targets(faces: list[Path], out: Path) -> dict[Path, Path]:
    """Each face's DFLJPG name: its stem + .jpg; `a.png` beside `a.jpg` becomes `a_1.jpg`, never a replacement."""
    taken: set[str] = set()
    names: dict[Path, Path] = {}
    for face in sorted(faces, key=lambda p: (p.suffix.lower() == ".png", p.name)):  # JPEGs keep their own names
        name, n = face.stem + ".jpg", 1
        while name.lower() in taken:
            name, n = f"{face.stem}_{n}.jpg", n + 1
        taken.add(name.lower())
        names[face] = out / name
    return names


@dataclass
class ExportDflResult(JobResult):
    output: str = ""
    exported: int = 0
    with_masks: int = 0
    with_polygons: int = 0
    refused: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def summary(self) -> list[str]:
        head = (f"exported {self.exported} face(s) to {self.output} as DFLJPG ({self.with_masks} with XSeg masks, "
                f"{self.with_polygons} with polygons); refused {len(self.refused)}")
        return [head] + [f"  {r}" for r in self.refused] + [f"  note: {n}" for n in self.notes]

    @property
    def exit_code(self) -> int:
        return 130 if self.stopped else (1 if self.refused else 0)


@job
def run_face_export_dfl(cfg: ExportDflConfig, reporter: Reporter, stop: StopFlag) -> ExportDflResult:
    """Write every face of a faceset as a DeepFaceLab DFLJPG (docs/face-swap.md#xseg-labels), one atomic file each.

    reporter: phase "exporting" per face; a note for each mask shrunk to fit DFL's APP15 segment. stop: after the
    current face (the files written so far are complete). A face whose metadata is malformed is refused and named;
    the rest are written. Result: faces exported (with masks, with polygons), refused faces, notes.
    """
    faces = list_faces(cfg.faceset)
    if not faces:
        raise ConfigError(f"no aligned faces in {cfg.faceset}")
    out = confine(cfg.output, "output", write=True)
    targets = _targets(faces, out)
    if not cfg.overwrite:
        there = [str(t) for t in targets.values() if t.exists() or t.is_symlink()]
        if there:
            more = f" and {len(there) - 3} more" if len(there) > 3 else ""
            raise ConfigError(f"{', '.join(there[:3])}{more} already exist; pass --overwrite or choose another output folder",
                              [("output", f"{there[0]} exists; pass --overwrite or choose another folder")])
    out.mkdir(parents=True, exist_ok=True)
    result = ExportDflResult(output=str(out))
    reporter.start(len(faces), "exporting", unit="face")
    for face in faces:
        if stop.is_set():
            result.stopped = True
            break
        try:
            data, meta, note = export_face(face)
        except FacesetError as e:
            result.refused.append(str(e))
            reporter.advance()
            continue
        atomic_write_bytes(confine(targets[face], "DFLJPG file", write=True), data)
        result.exported += 1
        result.with_masks += bool(meta.extra.get("xseg_mask"))
        result.with_polygons += bool(face_polys(meta))
        if note:
            result.notes.append(note)
            reporter.log(f"note: {note}")
        reporter.advance()
    reporter.done("")
    return result
