"""`loratrain face sort`: order a faceset by pose, sharpness, histogram or identity, and set other people aside.

Files are renamed with a rank prefix (an earlier prefix is replaced), never deleted; with --by identity,
faces farther than --identity_threshold from the reference person move to `<faceset>/_other/`.
"""
from __future__ import annotations

import os
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np

from loratrain.core.errors import ConfigError
from loratrain.core.images import laplacian_variance
from loratrain.core.jobs import JobResult, job
from loratrain.core.progress import Reporter, StopFlag
from loratrain.core.registry import Registry

from ..faceset import FaceMeta, list_faces, load_face
from ..landmarks import estimate_yaw_pitch, hull_mask
from .config import SortConfig
from .plugins import identity_encoder, identity_threshold

RANK = re.compile(r"^\d{5}_")
SortKey = Callable[[list[tuple[Path, np.ndarray, FaceMeta]], SortConfig], list[float]]
SORT_KEYS: Registry[SortKey] = Registry("face sort key")


@SORT_KEYS.register("yaw")
def _yaw(faces, cfg):  # noqa: ANN001, ANN202
    return [estimate_yaw_pitch(m.landmarks_array())[0] for _, _, m in faces]


@SORT_KEYS.register("pitch")
def _pitch(faces, cfg):  # noqa: ANN001, ANN202
    return [estimate_yaw_pitch(m.landmarks_array())[1] for _, _, m in faces]


@SORT_KEYS.register("blur")
def _blur(faces, cfg):  # noqa: ANN001, ANN202
    """Blurriness: minus the sharpness (variance of the Laplacian inside the face hull), so the sharpest face comes
    first and the blurriest last, as DFL sorts them (blurry faces are deleted from the end). The Laplacian is taken
    on the whole image and read inside the hull: on a hull-masked image the mask's own edge outweighs the face's
    detail, and a blurred face scored as sharp as a sharp one."""
    out = []
    for _, img, m in faces:
        gray = cv2.cvtColor(img, cv2.COLOR_BGR2GRAY).astype(np.float32)
        inside = hull_mask(gray.shape, m.landmarks_array()) > 0.5
        lap = cv2.Laplacian(gray, cv2.CV_32F)
        out.append(-float(lap[inside].var()) if inside.sum() > 1 else -laplacian_variance(gray))
    return out


@SORT_KEYS.register("hist")
def _hist(faces, cfg):  # noqa: ANN001, ANN202
    """Greedy chain of nearest colour histograms (Hellinger distance), so look-alike faces sit together."""
    hists = np.stack([cv2.calcHist([img], [0, 1, 2], None, [8, 8, 8], [0, 256] * 3).ravel() for _, img, _ in faces])
    roots = np.sqrt(hists / np.maximum(hists.sum(1, keepdims=True), 1))
    order = [0]
    left = np.ones(len(faces), bool)
    left[0] = False
    while left.any():
        idx = np.flatnonzero(left)
        nxt = int(idx[np.argmin(((roots[idx] - roots[order[-1]]) ** 2).sum(1))])
        order.append(nxt)
        left[nxt] = False
    rank = np.empty(len(faces))
    rank[order] = np.arange(len(faces))
    return rank.tolist()


def embeddings(faces: list[tuple[Path, np.ndarray, FaceMeta]], recognizer: str = "") -> np.ndarray:
    """Identity embeddings of these faces: dlib's, or the `--recognizer` ONNX file's (L2-normalised)."""
    enc = identity_encoder(recognizer)
    return np.stack([enc(cv2.cvtColor(img, cv2.COLOR_BGR2RGB), m.landmarks_array()) for _, img, m in faces])


def reference_embedding(paths: list[str], recognizer: str = "") -> np.ndarray:
    """The mean identity embedding of these face files: the person `--reference` names."""
    return embeddings([(Path(p), *load_face(p)) for p in paths], recognizer).mean(0)


@SORT_KEYS.register("identity")
def _identity(faces, cfg):  # noqa: ANN001, ANN202
    emb = embeddings(faces, cfg.recognizer)
    if cfg.reference:
        ref = reference_embedding(cfg.reference, cfg.recognizer)
    else:
        ref = np.median(emb, axis=0)
    return np.asarray(identity_encoder(cfg.recognizer).distance(emb, ref), np.float64).reshape(-1).tolist()


@dataclass
class SortResult(JobResult):
    by: str = ""
    dry_run: bool = False
    order: list[tuple[str, float]] = field(default_factory=list)
    moved_other: list[str] = field(default_factory=list)

    def summary(self) -> list[str]:
        if self.stopped:
            return ["stopped before sorting; nothing was renamed"]
        lines = [f"{score:9.4f}  {path}" for path, score in self.order[:10]] if self.dry_run else []
        return lines + [f"sorted {len(self.order)} face(s) by {self.by}"
                        + (f"; {len(self.moved_other)} other person(s) moved to _other/" if self.moved_other else "")]


@job
def run_face_sort(cfg: SortConfig, reporter: Reporter, stop: StopFlag) -> SortResult:
    """Order a faceset (rank prefixes) and, by identity, move other people to `_other/`; nothing is deleted.

    stop is honoured while faces are read and scored; the renames that follow run as one unit, so a
    faceset is never left half renamed.
    """
    folder = Path(cfg.faceset)
    paths = list_faces(folder)
    if not paths:
        raise ConfigError(f"{folder}: no faces")
    if cfg.by == "identity":  # the encoder first (loaded once, kept): a wrong --recognizer is named before faces are read
        identity_encoder(cfg.recognizer)
    reporter.start(len(paths), "reading faces", unit="face")
    faces = []
    for p in paths:
        if stop.is_set():
            reporter.done("")
            return SortResult(by=cfg.by, stopped=True)
        faces.append((p, *load_face(p)))
        reporter.advance()
    reporter.done("")
    scores = SORT_KEYS.get(cfg.by)(faces, cfg)
    ranked = sorted(zip(paths, scores), key=lambda t: t[1], reverse=cfg.descending)
    result = SortResult(by=cfg.by, dry_run=cfg.dry_run, order=[(str(p), float(s)) for p, s in ranked])
    if cfg.dry_run:
        return result
    keep = ranked
    if cfg.by == "identity":
        limit = identity_threshold(identity_encoder(cfg.recognizer), cfg.identity_threshold)
        keep = [(p, s) for p, s in ranked if s <= limit]
        other = folder / "_other"
        for p, s in ranked:
            if s > limit:
                other.mkdir(exist_ok=True)
                dst = other / p.name
                os.replace(p, dst)
                result.moved_other.append(str(dst))
    # two phases so a new name never lands on a file not yet renamed
    temps = []
    for i, (p, _) in enumerate(keep):
        tmp = p.with_name(f".sorting_{i:05d}_{RANK.sub('', p.name)}")
        os.replace(p, tmp)
        temps.append(tmp)
    for i, tmp in enumerate(temps):
        os.replace(tmp, tmp.with_name(f"{i:05d}_{tmp.name.split('_', 2)[2]}"))
    return result
