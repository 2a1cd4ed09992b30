"""Aligned facesets: one image per face with its metadata as plain JSON inside the file (no pickle).

JPEG faces carry the JSON in a COM segment, PNG faces in an iTXt chunk, both under the key
`loratrain.face`. DeepFaceLab's DFLJPG files (a pickled dict in APP15) can be imported through an
allow-list unpickler that accepts only plain data and numpy arrays; anything else is refused.
"""
from __future__ import annotations

import base64
import io
import json
import os
import pickle
import struct
from dataclasses import asdict, dataclass, field
from pathlib import Path

import cv2
import numpy as np
from PIL import Image, PngImagePlugin

from loratrain.core.paths import confine
from loratrain.core.safe_io import atomic_path, atomic_write_bytes

META_KEY = "loratrain.face"
FACE_EXTENSIONS = {".jpg", ".jpeg", ".png"}


class FacesetError(ValueError):
    """A face file is missing its metadata, or its metadata is malformed; the message names it."""


@dataclass
class FaceMeta:
    face_type: str
    landmarks: list[list[float]]            # 68x2 in the aligned image
    source_filename: str
    source_rect: list[float]                # x0, y0, x1, y1 in the source frame
    source_landmarks: list[list[float]]     # 68x2 in the source frame
    image_to_face_mat: list[list[float]]    # 2x3 affine, source frame -> aligned image
    eyebrows_expand_mod: float = 1.0
    extra: dict = field(default_factory=dict)

    def landmarks_array(self) -> np.ndarray:
        return np.asarray(self.landmarks, np.float64)

    def xseg_mask(self, size: int) -> np.ndarray | None:
        """The XSeg mask carried over from DeepFaceLab (float32 size x size, 0..1), or None when there is none."""
        return decode_mask(self.extra.get("xseg_mask"), size)

    def to_json(self) -> str:
        return json.dumps(asdict(self), separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str, source: str) -> "FaceMeta":
        try:
            data = json.loads(text)
            meta = cls(**data)
            lm = np.asarray(meta.landmarks, np.float64)
            mat = np.asarray(meta.image_to_face_mat, np.float64)
        except (ValueError, TypeError) as e:
            raise FacesetError(f"{source}: malformed face metadata ({e})") from None
        if lm.shape != (68, 2) or mat.shape != (2, 3):
            raise FacesetError(f"{source}: face metadata has landmarks {lm.shape} and matrix {mat.shape}; expected 68x2 and 2x3")
        return meta


def decode_mask(data: object, size: int) -> np.ndarray | None:
    """A stored base64 PNG mask as float32 size x size in 0..1; None when absent or not an image."""
    if not data or not isinstance(data, str):
        return None
    try:
        raw = base64.b64decode(data, validate=False)
    except ValueError:
        return None
    try:  # the header first: a few kB of PNG can inflate to gigabytes
        with Image.open(io.BytesIO(raw)) as probe:
            if max(probe.size) > MAX_MASK_SIDE:
                return None
    except (OSError, ValueError, Image.DecompressionBombError):
        return None
    mask = cv2.imdecode(np.frombuffer(raw, np.uint8), cv2.IMREAD_GRAYSCALE)
    if mask is None:
        return None
    return cv2.resize(mask, (size, size), interpolation=cv2.INTER_LINEAR).astype(np.float32) / 255.0


def _round(a: np.ndarray, digits: int = 4) -> list:
    return np.round(np.asarray(a, np.float64), digits).tolist()


def make_meta(face_type: str, aligned_landmarks: np.ndarray, source: str, rect: tuple[float, ...],
              source_landmarks: np.ndarray, mat: np.ndarray) -> FaceMeta:
    return FaceMeta(face_type, _round(aligned_landmarks), source, [float(v) for v in rect], _round(source_landmarks),
                    _round(mat, 8))


def save_face(path: str | Path, image_bgr: np.ndarray, meta: FaceMeta, quality: int = 95) -> Path:
    """Write the aligned face (BGR uint8) with its metadata, atomically."""
    path = Path(path)
    img = Image.fromarray(cv2.cvtColor(image_bgr, cv2.COLOR_BGR2RGB))
    with atomic_path(path) as tmp:
        if path.suffix.lower() == ".png":
            info = PngImagePlugin.PngInfo()
            info.add_itxt(META_KEY, meta.to_json())
            img.save(tmp, format="PNG", pnginfo=info)
        else:
            img.save(tmp, format="JPEG", quality=quality, comment=(META_KEY + ":" + meta.to_json()).encode())
    return path


#: a JPEG COM segment holds at most 65533 bytes, and our metadata is one segment
MAX_JPEG_META = 65533


def write_meta(path: str | Path, meta: FaceMeta) -> None:
    """Replace a face's metadata without touching its pixels, atomically. A JPEG keeps its compressed image
    data byte for byte (only our COM segment is rewritten); a PNG is re-saved, which is lossless."""
    path = confine(path, "face", write=True)
    text = meta.to_json()
    if path.suffix.lower() == ".png":
        with Image.open(path) as img:
            img.load()
            info = PngImagePlugin.PngInfo()
            info.add_itxt(META_KEY, text)
            with atomic_path(path) as tmp:
                img.save(tmp, format="PNG", pnginfo=info)
        return
    payload = (META_KEY + ":" + text).encode()
    if len(payload) > MAX_JPEG_META:
        raise FacesetError(f"{path}: metadata of {len(payload)} bytes does not fit a JPEG comment ({MAX_JPEG_META}); "
                           "use fewer polygon points")
    data = path.read_bytes()
    segs = _jpeg_segments(data, str(path))
    ours = [(s, e) for m, s, e in segs if m == 0xFE and data[s + 4:s + 4 + len(META_KEY) + 1] == (META_KEY + ":").encode()]
    for s, e in reversed(ours):
        data = data[:s] + data[e:]
    com = b"\xff\xfe" + struct.pack(">H", len(payload) + 2) + payload
    atomic_write_bytes(path, data[:2] + com + data[2:])


def encode_mask(mask: np.ndarray, budget: int = 40_000) -> str:
    """A 0..1 (or uint8) mask as base64 PNG, halved until it fits `budget` characters (DFL caps its own at 50 kB)."""
    m = mask if mask.dtype == np.uint8 else (np.clip(mask, 0, 1) * 255 + 0.5).astype(np.uint8)
    m = m.squeeze()
    while True:
        encoded = base64.b64encode(cv2.imencode(".png", m)[1].tobytes()).decode()
        if len(encoded) <= budget or m.shape[0] <= 32:
            return encoded
        m = cv2.resize(m, (m.shape[1] // 2, m.shape[0] // 2), interpolation=cv2.INTER_AREA)


def read_meta(path: str | Path) -> FaceMeta:
    path = Path(path)
    try:
        with Image.open(path) as img:
            info = dict(img.info)
    except FileNotFoundError:
        raise
    except OSError as e:
        raise FacesetError(f"{path}: cannot read image ({e})") from None
    text = info.get(META_KEY)
    comment = info.get("comment")
    if text is None and comment:
        comment = comment.decode("utf-8", "replace") if isinstance(comment, bytes) else comment
        if comment.startswith(META_KEY + ":"):
            text = comment[len(META_KEY) + 1:]
    if text is None:
        raise FacesetError(f"{path}: no {META_KEY} metadata (not an aligned face from `loratrain face extract`; "
                           "DeepFaceLab files need `loratrain face import-dfl`)")
    return FaceMeta.from_json(text, str(path))


def load_face(path: str | Path) -> tuple[np.ndarray, FaceMeta]:
    """(BGR uint8 image, metadata)."""
    meta = read_meta(confine(path, "face"))
    img = cv2.imdecode(np.fromfile(str(path), np.uint8), cv2.IMREAD_COLOR)
    if img is None:
        raise FacesetError(f"{path}: cannot decode image")
    return img, meta


def list_faces(folder: str | Path) -> list[Path]:
    folder = confine(folder, "faceset folder")
    if not folder.is_dir():
        raise FileNotFoundError(f"faceset folder not found: {folder}")
    # a face linking out of the app's workspace is refused, not read
    return sorted(confine(p, "face") for p in folder.iterdir() if p.suffix.lower() in FACE_EXTENSIONS and not p.name.startswith("."))


def move_to_other(folder: str | Path, names: list[str]) -> list[Path]:
    """Set faces of another person aside in `<folder>/_other/` (what `face sort --by identity` does for the
    faces it finds): nothing is deleted, and a face already there is never replaced."""
    folder = Path(folder)
    faces = {p.name: p for p in list_faces(folder)}
    unknown = [n for n in names if n not in faces]
    if unknown:
        raise FacesetError(f"{folder}: no face named {', '.join(unknown[:5])}")
    other = confine(folder / "_other", "faceset's _other folder", write=True)  # a link out is refused, not followed
    other.mkdir(exist_ok=True)
    moved = []
    for name in dict.fromkeys(names):
        target, n = other / name, 1
        while target.exists() or target.is_symlink():
            target = other / f"{Path(name).stem}_{n}{Path(name).suffix}"
            n += 1
        os.replace(faces[name], confine(target, "face", write=True))
        moved.append(target)
    return moved


# ---------------------------------------------------------------- DeepFaceLab import


#: an APP15 segment holds at most this many bytes: no buffer or array built from one can honestly be larger
_SEGMENT_MAX = 65_535


def _safe_bytearray(*args: object) -> bytearray:
    """bytearray(data) only, never bytearray(n): `bytearray(10**12)` is a 60-byte pickle that allocates a terabyte."""
    if len(args) != 1 or not isinstance(args[0], (bytes, bytearray)) or len(args[0]) > _SEGMENT_MAX:
        raise pickle.UnpicklingError("refused bytearray: only a byte string of at most one segment is allowed")
    return bytearray(args[0])


class _SafeNDArray(np.ndarray):
    """numpy.ndarray as the allow list hands it out. Called as numpy.ndarray(shape, dtype, buffer) (how
    `face export-dfl` writes arrays), the buffer must hold the whole array: a bare shape would allocate whatever
    size the file names. numpy's own `_reconstruct(ndarray, ...)` path takes it as the class to build and fills it
    from the state's bytes, which bound it already."""

    def __new__(cls, shape: object, dtype: object = float, buffer: object = None, *rest: object) -> np.ndarray:
        if not isinstance(buffer, (bytes, bytearray)) or not isinstance(shape, tuple) or rest:
            raise pickle.UnpicklingError("refused numpy.ndarray: only (shape, dtype, buffer) is allowed")
        if len(shape) > 8 or any(not isinstance(n, int) or n < 0 for n in shape):
            raise pickle.UnpicklingError(f"refused numpy.ndarray of shape {shape!r}")
        dt = np.dtype(dtype)  # type: ignore[call-overload]
        if dt.hasobject or float(np.prod(shape, dtype=np.float64)) * dt.itemsize > len(buffer):
            raise pickle.UnpicklingError("refused numpy.ndarray: its shape does not fit its buffer")
        return np.ndarray(shape, dt, buffer)


class _AllowListUnpickler(pickle.Unpickler):
    """Only what a DFLJPG dict legitimately holds: builtins data and numpy arrays / scalars. Array and buffer
    constructors are wrapped so a file cannot name a size larger than the bytes it carries."""

    ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
        ("numpy", "dtype"),
    }
    WRAPPED = {("numpy", "ndarray"): _SafeNDArray,
               ("builtins", "bytearray"): _safe_bytearray}  # the buffer of `face export-dfl`'s arrays

    def find_class(self, module: str, name: str):  # noqa: ANN201
        if (module, name) in self.WRAPPED:
            return self.WRAPPED[(module, name)]
        if (module, name) in self.ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refused to load {module}.{name}")


def _jpeg_segments(data: bytes, source: str) -> list[tuple[int, int, int]]:
    """(marker, start, end) of each segment before the scan data."""
    if data[:2] != b"\xff\xd8":
        raise FacesetError(f"{source}: not a JPEG file")
    out, pos = [], 2
    while pos + 4 <= len(data):
        if data[pos] != 0xFF:
            raise FacesetError(f"{source}: corrupt JPEG segment at byte {pos}")
        marker = data[pos + 1]
        if marker == 0xDA:  # start of scan: the rest is image data
            break
        length = struct.unpack(">H", data[pos + 2:pos + 4])[0]
        out.append((marker, pos, pos + 2 + length))
        pos += 2 + length
    return out


def read_dfl_dict(path: str | Path) -> tuple[dict, bytes]:
    """The APP15 dict of a DFLJPG file, unpickled through the allow list, and the JPEG without it."""
    path = Path(path)
    data = path.read_bytes()
    segs = _jpeg_segments(data, str(path))
    app15 = [s for s in segs if s[0] == 0xEF]
    if not app15:
        raise FacesetError(f"{path}: no DeepFaceLab metadata (APP15 segment)")
    _, start, end = app15[0]
    try:
        obj = _AllowListUnpickler(io.BytesIO(data[start + 4:end])).load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, MemoryError, OverflowError) as e:
        raise FacesetError(f"{path}: DeepFaceLab metadata refused: {e}") from None
    if not isinstance(obj, dict):
        raise FacesetError(f"{path}: DeepFaceLab metadata is not a dict")
    return _base_arrays(obj), data[:start] + data[end:]


def _base_arrays(value: object) -> object:
    """The allow list's array subclass back to plain numpy arrays, through dicts, lists and tuples."""
    if isinstance(value, np.ndarray):
        return np.asarray(value)
    if isinstance(value, dict):
        return {k: _base_arrays(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_base_arrays(v) for v in value)
    return value


_DFL_FACE_TYPES = {"half_face": "h", "midfull_face": "mf", "full_face": "f", "whole_face": "wf", "head": "head"}


#: the JSON metadata lives in one JPEG COM segment (at most 65533 bytes), so the mask PNG gets a budget
_MASK_BUDGET = 40_000
#: a mask larger than this (per side) is refused before it is decoded: an APP15 segment of 64 kB could otherwise
#: hold a PNG that inflates to a gigabyte
MAX_MASK_SIDE = 4096
_PNG_MAGIC, _JPEG_MAGIC = b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff"


def _encoded_mask_bytes(raw: object) -> bytes | None:
    """The PNG / JPEG bytes of DFL's xseg_mask, or None when it is not an encoded image. DFL stores what
    cv2.imencode returns, an (N, 1) uint8 ndarray of the file's bytes; bytes are taken too."""
    if isinstance(raw, (bytes, bytearray)):
        return bytes(raw)
    if isinstance(raw, np.ndarray) and raw.dtype == np.uint8 and raw.size >= 8:
        flat = raw.reshape(-1)
        if flat[:8].tobytes().startswith((_PNG_MAGIC, _JPEG_MAGIC)):
            return flat.tobytes()
    return None


def decode_dfl_mask(raw: object, source: str, what: str = "DeepFaceLab xseg_mask") -> np.ndarray:
    """DFL's xseg_mask (or, with `what` naming it, our own stored mask's PNG bytes) as a uint8 grayscale image at
    its own resolution; its size is checked before it is decoded."""
    data = _encoded_mask_bytes(raw)
    if data is not None:
        try:
            with Image.open(io.BytesIO(data)) as probe:  # reads the header only
                size = probe.size
        except (OSError, ValueError, Image.DecompressionBombError):
            size = None
        if size is not None and max(size) > MAX_MASK_SIDE:
            raise FacesetError(f"{source}: {what} is {size[0]}x{size[1]}; at most {MAX_MASK_SIDE} px a side is read")
        mask = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_GRAYSCALE) if size else None
        if mask is None:
            raise FacesetError(f"{source}: {what} cannot be decoded (neither PNG nor JPEG)")
        return mask
    # very old files stored the mask image itself: H x W (or H x W x 1), 0..1 or 0..255
    img = raw[..., 0] if isinstance(raw, np.ndarray) and raw.ndim == 3 and raw.shape[2] == 1 else raw
    if not isinstance(img, np.ndarray) or img.ndim != 2 or img.dtype.kind not in "biuf" or min(img.shape) < 2:
        shape = getattr(raw, "shape", type(raw).__name__)
        raise FacesetError(f"{source}: {what} is neither an encoded PNG/JPEG nor a mask image ({shape})")
    if max(img.shape) > MAX_MASK_SIDE:
        raise FacesetError(f"{source}: {what} is {img.shape[1]}x{img.shape[0]}; at most {MAX_MASK_SIDE} px a side is read")
    img = np.nan_to_num(img.astype(np.float64))
    return np.clip(img * (255 if img.max() <= 1 else 1), 0, 255).astype(np.uint8)


def _dfl_segmentation(d: dict, source: str) -> dict:
    """DFL's XSeg mask re-encoded as a base64 PNG, and its hand-drawn polygons checked by `parse_polys` (a
    malformed polygon refuses the file, named) and stored in DFL's dict form."""
    from .xseg.polys import dump_polys, parse_polys  # xseg.polys imports this module

    out: dict = {}
    raw = d.get("xseg_mask")
    if raw is not None:
        out["xseg_mask"] = encode_mask(decode_dfl_mask(raw, source), _MASK_BUDGET)
        out["xseg_source"] = "dfl"
    polys = parse_polys(d.get("seg_ie_polys"), source)
    if polys:
        out["seg_ie_polys"] = dump_polys(polys)
    return out


def import_dfl_file(src: str | Path, dst: str | Path) -> FaceMeta:
    """Convert one DFLJPG to our format without re-encoding the JPEG (segments are rewritten)."""
    d, jpeg = read_dfl_dict(src)
    try:
        face_type = _DFL_FACE_TYPES.get(str(d.get("face_type", "full_face")), "f")
        meta = make_meta(face_type, np.asarray(d["landmarks"], np.float64), str(d.get("source_filename", "")),
                         tuple(np.asarray(d.get("source_rect", [0, 0, 0, 0]), np.float64).tolist()),
                         np.asarray(d.get("source_landmarks", d["landmarks"]), np.float64),
                         np.asarray(d.get("image_to_face_mat", [[1, 0, 0], [0, 1, 0]]), np.float64))
        meta.eyebrows_expand_mod = float(d.get("eyebrows_expand_mod", 1.0) or 1.0)
        meta.extra.update(_dfl_segmentation(d, str(src)))
        meta = FaceMeta.from_json(meta.to_json(), str(src))
    except FacesetError:
        raise
    except (KeyError, ValueError, TypeError) as e:
        raise FacesetError(f"{src}: DeepFaceLab metadata lacks usable landmarks ({e})") from None
    payload = (META_KEY + ":" + meta.to_json()).encode()
    com = b"\xff\xfe" + struct.pack(">H", len(payload) + 2) + payload
    atomic_write_bytes(dst, jpeg[:2] + com + jpeg[2:])
    return meta
