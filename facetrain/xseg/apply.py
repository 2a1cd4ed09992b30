"""`loratrain face xseg apply | remove | undo`: a segmenter's masks into a faceset's metadata, and back out.

Every change is undoable: before the first face is touched, the masks it will replace are written to a journal
in `<faceset>/.loratrain/xseg/` (atomically), and each face's metadata is then rewritten atomically, pixels
untouched. A kill half-way leaves every face either old or new, and `undo` puts them all back. The journal is
input like any other: its face names must be single names of faces in that faceset, its masks strings.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from loratrain.core.errors import ConfigError
from loratrain.core.jobs import JobResult, job
from loratrain.core.paths import confine, name_problem
from loratrain.core.progress import Reporter, StopFlag
from loratrain.core.safe_io import atomic_write_json

from ..faceset import FacesetError, decode_mask, encode_mask, list_faces, load_face, read_meta, write_meta
from .config import XSegApplyConfig, XSegRemoveConfig, XSegUndoConfig
from .data import crop_face, uncrop_mask
from .model import XSegPredictor
from .polys import face_polys, is_labelled, polys_mask

KEYS = ("xseg_mask", "xseg_source")
MAX_JOURNAL_BYTES = 512 * 1024 * 1024
#: a face counts as changed when its mask moves by more than this share of the face's pixels
CHANGED = 0.01


@dataclass
class XSegWriteResult(JobResult):
    faceset: str = ""
    action: str = ""
    new: int = 0          # faces that had no mask before
    changed: int = 0      # faces whose mask changed by more than 1% of their pixels
    unchanged: int = 0
    removed: int = 0
    restored: int = 0
    journal: str = ""
    names_changed: list[str] = field(default_factory=list)

    def summary(self) -> list[str]:
        if self.action == "apply":
            return [f"{self.faceset}: {self.new} face(s) got a mask, {self.changed} changed, {self.unchanged} unchanged "
                    f"(undo: loratrain face xseg undo {self.faceset})"]
        if self.action == "remove":
            return [f"{self.faceset}: removed {self.removed} mask(s) (undo: loratrain face xseg undo {self.faceset})"]
        return [f"{self.faceset}: restored the masks of {self.restored} face(s) from {Path(self.journal).name}"]


def _journal_dir(faceset: Path) -> Path:
    return confine(faceset / ".loratrain" / "xseg", "faceset's xseg journal", write=True)


def _write_journal(faceset: Path, action: str, before: dict[str, dict]) -> Path:
    folder = _journal_dir(faceset)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{time.strftime('%Y%m%d-%H%M%S')}-{time.time_ns() % 10**9:09d}-{action}.json"
    atomic_write_json(path, {"action": action, "faces": before})
    return path


def _previous(meta_extra: dict) -> dict:
    return {k: meta_extra.get(k) for k in KEYS}


def _mask_change(old: str | None, new: np.ndarray, side: int) -> float:
    """Share of the face's pixels whose side of 0.5 differs between the stored mask and `new` (1 without one)."""
    m = decode_mask(old, side)
    return 1.0 if m is None else float(np.mean((m > 0.5) != (new > 0.5)))


@job
def run_xseg_apply(cfg: XSegApplyConfig, reporter: Reporter, stop: StopFlag) -> XSegWriteResult:
    """Write the segmenter's mask into every face of `faceset` (labelled faces get their polygons' mask when
    `keep_labels`). reporter: one step per face. stop: after the current batch; the faces done keep their new
    masks, the journal covers them all. Result: faces new / changed / unchanged, the journal's path."""
    folder = confine(cfg.faceset, "faceset", write=True)
    faces = list_faces(folder)
    if not faces:
        raise ConfigError(f"faceset {cfg.faceset}: no aligned faces")
    from loratrain.core.devices import pick_device

    predictor = XSegPredictor(confine(cfg.model, "model"), device=str(pick_device(cfg.device)), batch=cfg.batch_size)
    spec = predictor.model.spec
    metas = {p: read_meta(p) for p in faces}
    journal = _write_journal(folder, "apply", {p.name: _previous(m.extra) for p, m in metas.items()})
    result = XSegWriteResult(faceset=str(cfg.faceset), action="apply", journal=str(journal))
    reporter.start(len(faces), f"applying {predictor.name}", unit="face")
    try:
        for i in range(0, len(faces), cfg.batch_size):
            chunk = faces[i:i + cfg.batch_size]
            loaded = [load_face(p) for p in chunk]
            crops = np.stack([crop_face(img, meta, spec.resolution, spec.face_type).astype(np.float32) / 255
                              for img, meta in loaded])
            predicted = predictor(crops)
            for p, (img, meta), mask in zip(chunk, loaded, predicted):
                side = img.shape[0]
                if cfg.keep_labels and is_labelled(meta):
                    full, source = polys_mask(face_polys(meta, str(p)), side), "labels"
                else:
                    full, source = uncrop_mask(mask, meta, side, spec.face_type), f"applied:{predictor.name}"
                change = _mask_change(meta.extra.get("xseg_mask"), full, side)
                if not meta.extra.get("xseg_mask"):
                    result.new += 1
                elif change > CHANGED:
                    result.changed += 1
                else:
                    result.unchanged += 1
                if change > CHANGED:
                    result.names_changed.append(p.name)
                meta.extra["xseg_mask"], meta.extra["xseg_source"] = encode_mask(full), source
                write_meta(p, meta)
            reporter.advance(len(chunk))
            if stop.is_set() and i + cfg.batch_size < len(faces):
                result.stopped = True
                break
    finally:
        reporter.done("")
    return result


@job
def run_xseg_remove(cfg: XSegRemoveConfig, reporter: Reporter, stop: StopFlag) -> XSegWriteResult:
    """Remove XSeg masks from a faceset's metadata (the polygons stay); journalled for `undo`."""
    folder = confine(cfg.faceset, "faceset", write=True)
    metas = {p: read_meta(p) for p in list_faces(folder)}
    chosen = {p: m for p, m in metas.items() if m.extra.get("xseg_mask")
              and (not cfg.only_applied or str(m.extra.get("xseg_source", "")).startswith("applied"))}
    result = XSegWriteResult(faceset=str(cfg.faceset), action="remove")
    if not chosen:
        reporter.log("no face has a mask to remove")
        return result
    result.journal = str(_write_journal(folder, "remove", {p.name: _previous(m.extra) for p, m in chosen.items()}))
    reporter.start(len(chosen), "removing masks", unit="face")
    for p, meta in chosen.items():
        for k in KEYS:
            meta.extra.pop(k, None)
        write_meta(p, meta)
        result.removed += 1
        reporter.advance()
    reporter.done("")
    return result


def _read_journal(path: Path, faces: dict[str, Path]) -> dict[str, dict]:
    """The journal's faces, each checked: a name of a face in this faceset, values strings or None."""
    if path.stat().st_size > MAX_JOURNAL_BYTES:
        raise ConfigError(f"{path}: journal larger than {MAX_JOURNAL_BYTES // 2**20} MiB; not read")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        entries = data["faces"]
        if not isinstance(entries, dict):
            raise TypeError("faces is not a table")
    except (ValueError, KeyError, TypeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: damaged xseg journal ({e}); remove it to undo the one before") from None
    out = {}
    for name, before in entries.items():
        problem = name_problem(name)
        if problem or name not in faces:
            raise ConfigError(f"{path}: journal names {name!r}, which is not a face of this faceset"
                              f"{f' ({problem})' if problem else ''}; nothing was restored")
        if not isinstance(before, dict) or any(not isinstance(before.get(k), (str, type(None))) for k in KEYS):
            raise ConfigError(f"{path}: journal entry of {name} is not a mask record; nothing was restored")
        out[name] = {k: before.get(k) for k in KEYS}
    return out


@job
def run_xseg_undo(cfg: XSegUndoConfig, reporter: Reporter, stop: StopFlag) -> XSegWriteResult:
    """Put back the masks the newest `apply` or `remove` replaced; that journal is then retired (renamed .undone)."""
    folder = confine(cfg.faceset, "faceset", write=True)
    jdir = _journal_dir(folder)
    journals = sorted(jdir.glob("*.json")) if jdir.is_dir() else []
    if not journals:
        raise ConfigError(f"faceset {cfg.faceset}: nothing to undo (no xseg apply or remove was journalled)")
    path = confine(journals[-1], "xseg journal")
    faces = {p.name: p for p in list_faces(folder)}
    entries = _read_journal(path, faces)
    result = XSegWriteResult(faceset=str(cfg.faceset), action="undo", journal=str(path))
    reporter.start(len(entries), f"undoing {path.name}", unit="face")
    for name, before in entries.items():
        meta = read_meta(faces[name])
        for k in KEYS:
            if before[k] is None:
                meta.extra.pop(k, None)
            else:
                meta.extra[k] = before[k]
        try:
            write_meta(faces[name], meta)
        except FacesetError as e:
            raise ConfigError(f"{e}; the faces before it were restored, run undo again after fixing it") from None
        result.restored += 1
        reporter.advance()
    path.rename(path.with_suffix(".undone"))
    reporter.done("")
    return result
