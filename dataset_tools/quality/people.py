"""People per image and shot balance: the `people` and `shot_balance` checks, from one face-detection pass.

Guides for person LoRAs ask for one person per image, a mix of close-up, half-body and full-body
shots, and not only frontal faces. Faces come from the detectors we ship (loratrain.core.faces:
dlib HOG by default); images are detected at a long side of at most 1024 px, where a full-body
figure's face is still about 60 px, above the HOG detector's 40 px minimum at upsample 1.

Shot class: the largest face's box height over the image height (docs/dataset-tools.md#shot-classes
says where the thresholds come from). View: the head's yaw in degrees, from six of the 68 landmarks
fitted to a generic 3-D head (OpenCV's solvePnP). Which concepts are people: `--people` (all),
`--person_concepts` (folder names or class tokens), else a concept where most images show a face.
Without the face extra (dlib, OpenCV, the model files) both checks say they were skipped and why.
"""
from __future__ import annotations

import math
import threading
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import numpy as np

from loratrain.core.faces import DETECTORS, FACE_INSTALL, LANDMARKERS, find_faces, missing_face_modules
from loratrain.core.images import open_image, to_rgb_on_white
from loratrain.core.parallel import ordered_map

from .checks import CHECKS, Dataset, Finding, _class_tokens
from .measure import ImageInfo

DETECT_SIDE = 1024  # long side the detector sees (smaller images are not enlarged)
MIN_SCORE = 0.5  # dlib HOG margins: real faces score about 1 and up, false positives about 0.1 (as `face extract`)
MIN_FACE = 20  # px at the detection scale
CLOSE_UP = 0.25  # face box height / image height at or above: close-up (frame about 2.4 head heights or less)
FULL_BODY = 0.09  # below: full-body (frame about 6.7 head heights or more); in between: half-body
FRONTAL = 25.0  # |yaw| below, degrees: frontal
PROFILE = 60.0  # |yaw| at or above: profile; in between: three-quarter
SHOTS = ("close-up", "half-body", "full-body", "no face")
VIEWS = ("frontal", "three-quarter", "profile")
MIN_SHARE = 0.1  # each shot class, and the turned (not frontal) faces, at least this share of a person concept
MIN_JUDGED = 5  # a concept with fewer images is not judged
RECOMMENDATION = ("one person per image; mostly close-ups and half-body shots with some full-body ones (each at least "
                  f"{MIN_SHARE:.0%} of a concept), and not only frontal faces: some three-quarter and side views")

#: a generic head (OpenCV head-pose tutorials' values, in mm-like units; x to the subject's left, y up, z towards the
#: viewer) for landmarks 30 (nose tip), 8 (chin), 36 and 45 (outer eye corners), 48 and 54 (mouth corners)
HEAD_MODEL = np.array([(0.0, 0.0, 0.0), (0.0, -330.0, -65.0), (-225.0, 170.0, -135.0), (225.0, 170.0, -135.0),
                       (-150.0, -150.0, -125.0), (150.0, -150.0, -125.0)])
HEAD_POINTS = [30, 8, 36, 45, 48, 54]


@dataclass
class Face:
    box: tuple[float, float, float, float]  # x0, y0, x1, y1 in the image's pixels
    score: float
    yaw: float | None  # degrees, positive when the face turns towards the image's right; None when no pose fits


@dataclass
class FacePass:
    """Faces per image path, or why none were looked for."""

    faces: dict[Path, list[Face]] = field(default_factory=dict)
    skipped: str = ""
    errors: dict[str, str] = field(default_factory=dict)
    stopped: bool = False


def head_yaw(landmarks: np.ndarray, size: tuple[int, int]) -> float | None:
    """Yaw in degrees of the head whose 68 landmarks are given, in an image of `size` (h, w): 0 faces the camera.

    The horizontal angle between the head model's forward axis, after fitting its six points (focal length =
    image width, no distortion: the usual assumptions when the camera is unknown), and the line from the head
    to the camera: a face at the edge of a wide shot that looks into the lens is frontal, as a viewer sees it."""
    import cv2

    h, w = size
    camera = np.array([[w, 0, w / 2], [0, w, h / 2], [0, 0, 1]], np.float64)
    points = np.ascontiguousarray(np.asarray(landmarks, np.float64)[HEAD_POINTS])
    ok, rvec, tvec = cv2.solvePnP(HEAD_MODEL, points, camera, np.zeros(4), flags=cv2.SOLVEPNP_ITERATIVE)
    if not ok:
        return None
    rot, _ = cv2.Rodrigues(rvec)
    fx, _, fz = rot @ np.array([0.0, 0.0, 1.0])  # where the face points, in camera axes (z away from the camera)
    tx, _, tz = np.ravel(tvec)  # where the head is
    yaw = math.degrees(math.atan2(fx, -fz) - math.atan2(-tx, tz))
    return float((yaw + 180.0) % 360.0 - 180.0)


def shot_class(face_height: float, image_height: int) -> str:
    ratio = face_height / max(1, image_height)
    return "close-up" if ratio >= CLOSE_UP else "full-body" if ratio < FULL_BODY else "half-body"


def view_class(yaw: float | None) -> str | None:
    if yaw is None:
        return None
    return "frontal" if abs(yaw) < FRONTAL else "profile" if abs(yaw) >= PROFILE else "three-quarter"


_idle: dict[str, list] = {}  # detectors not in use, by name: kept for the next image, thread and run
_idle_lock = threading.Lock()


@contextmanager
def _detector(name: str):
    """A detector no other thread is using: dlib's keep scan buffers inside (one may not run on two threads at
    once) and release the GIL while they run, so each worker thread detecting with its own is what makes --workers
    count. They are pooled, not made per thread: making dlib's HOG detector takes about 0.2 s."""
    with _idle_lock:
        idle = _idle.setdefault(name, [])
        det = idle.pop() if idle else None
    if det is None:
        det = DETECTORS.get(name)(upsample=1)
    try:
        yield det
    finally:
        with _idle_lock:
            idle.append(det)


@lru_cache(maxsize=1)
def _landmarker():
    """One shape predictor for all threads, taken in turn: its model is ~100 MB, and fitting 68 points takes a few
    ms per face against a few hundred for the detection, so the lock costs next to nothing."""
    fit = LANDMARKERS.get("dlib68")()
    lock = threading.Lock()

    def landmarks(rgb: np.ndarray, rect: tuple[float, float, float, float]) -> np.ndarray:
        with lock:
            return fit(rgb, rect)

    return landmarks


def _load(info: ImageInfo) -> tuple[np.ndarray, float]:
    """(RGB uint8 array at most DETECT_SIDE on its long side, the scale from the image to it): on worker threads."""
    from PIL import Image

    with open_image(info.path) as img:
        rgb = to_rgb_on_white(img)
        scale = min(1.0, DETECT_SIDE / max(rgb.size))
        if scale < 1.0:
            rgb = rgb.resize((max(1, round(rgb.width * scale)), max(1, round(rgb.height * scale))), Image.Resampling.BOX)
        return np.ascontiguousarray(np.asarray(rgb, np.uint8)), scale


def _faces(info: ImageInfo, detector: str) -> list[Face]:
    """One image's faces, boxes in its own pixels: decode, detect and fit landmarks, all on a worker thread."""
    rgb, scale = _load(info)
    with _detector(detector) as detect:
        found = find_faces(rgb, detect, _landmarker(), MIN_FACE, MIN_SCORE)
    return [Face(tuple(round(v / scale, 1) for v in box[:4]), round(float(box[4]), 3), head_yaw(lm, rgb.shape[:2]))
            for box, lm in found]


def face_pass(ds: Dataset) -> FacePass:
    """Every readable image's faces, found once per run however many checks ask (kept in ds.cache)."""
    if "faces" in ds.cache:
        return ds.cache["faces"]
    result = FacePass()
    ds.cache["faces"] = result
    missing = missing_face_modules()
    if missing:
        result.skipped = f"needs {', '.join(missing)}: {FACE_INSTALL}"
        return result
    with _detector(ds.cfg.face_detector):  # a missing model file is one clear error, before any image
        _landmarker()
    infos = ds.readable()
    ds.reporter.start(len(infos), "finding faces", unit="img")
    for info, faces in ordered_map(lambda i: _faces(i, ds.cfg.face_detector), infos, ds.cfg.workers,
                                   lookahead=2 * ds.cfg.workers):
        if isinstance(faces, BaseException):
            result.errors[str(info.path)] = str(faces)
        else:
            result.faces[info.path] = faces
        ds.reporter.advance()
        if ds.stop.is_set():
            result.stopped = True
            break
    ds.reporter.done("")
    return result


def concept_of(ds: Dataset, path: Path) -> str:
    """The concept an image belongs to: its folder relative to the dataset ("." for images at the top)."""
    try:
        return path.parent.relative_to(ds.root).as_posix()
    except ValueError:
        return path.parent.name


def _declared(ds: Dataset, concepts: set[str]) -> tuple[set[str], list[str]]:
    """(the concepts --people / --person_concepts name, the names matching no concept)."""
    if ds.cfg.people:
        return set(concepts), []
    chosen, unmatched = set(), []
    for name in ds.cfg.person_concepts:
        want = name.strip().strip("/").lower()
        hits = {c for c in concepts if want in {c.lower(), Path(c).name.lower(), (_class_tokens(Path(c) / "x") or "").lower()}}
        chosen |= hits
        if not hits:
            unmatched.append(name)
    return chosen, unmatched


def _skipped(ds: Dataset, check: str, fp: FacePass) -> list[Finding]:
    """A skipped face check says so under the table and in the JSON; a warning when people were asked for."""
    ds.sections[check] = {"skipped": fp.skipped, "summary": [f"{check}: skipped, {fp.skipped}"]}
    if ds.cfg.people or ds.cfg.person_concepts or check in ds.cfg.checks:
        return [Finding(check, str(ds.root), "warning", f"skipped: {fp.skipped}")]
    return []


@CHECKS.register("people")
def people(ds: Dataset) -> list[Finding]:
    """More than one face: an error in a person concept (two people learnt as one), else a warning."""
    fp = face_pass(ds)
    if fp.skipped:
        return _skipped(ds, "people", fp)
    concepts = {concept_of(ds, i.path) for i in ds.readable()}
    persons, unmatched = _declared(ds, concepts)
    out = [Finding("people", str(ds.root), "error", f"--person_concepts {name!r} names no concept folder "
                   f"(folders: {', '.join(sorted(concepts)) or 'none'})") for name in unmatched]
    images = {}
    for path, faces in fp.faces.items():
        images[str(path)] = {"faces": len(faces), "boxes": [[*f.box, f.score] for f in faces]}
        if len(faces) > 1:
            person = concept_of(ds, path) in persons
            why = ("a person concept needs one person per image" if person else
                   "person LoRAs want one person per image (--person_concepts makes this an error)")
            out.append(Finding("people", str(path), "error" if person else "warning", f"{len(faces)} faces: {why}",
                               float(len(faces))))
    n_multi = sum(1 for v in images.values() if v["faces"] > 1)
    ds.sections["people"] = {"detector": ds.cfg.face_detector, "person_concepts": sorted(persons), "images": images,
                             "errors": fp.errors, "stopped": fp.stopped,
                             "summary": [f"people: {len(images)} image(s) searched for faces, {n_multi} with more than one"
                                         + (" (stopped early)" if fp.stopped else "")]}
    return out


def _advice(shots: Counter, views: Counter) -> list[str]:
    n = sum(shots.values())
    faced = n - shots["no face"]
    out = [f"add {shot} shots" for shot in SHOTS[:3] if shots[shot] < MIN_SHARE * n]
    posed = sum(views.values())
    if posed and views["frontal"] > (1 - MIN_SHARE) * posed and faced:
        out.append("add three-quarter and side views")
    return out


@CHECKS.register("shot_balance")
def shot_balance(ds: Dataset) -> list[Finding]:
    """Per image a shot class and a view; per concept the mix, judged against the guides for person concepts."""
    fp = face_pass(ds)
    if fp.skipped:
        return _skipped(ds, "shot_balance", fp)
    heights = {i.path: i.height for i in ds.readable()}
    images: dict[str, dict] = {}
    shots: dict[str, Counter] = {}
    views: dict[str, Counter] = {}
    for path, faces in fp.faces.items():
        concept = concept_of(ds, path)
        shots.setdefault(concept, Counter())
        views.setdefault(concept, Counter())
        if not faces:
            images[str(path)] = {"shot": "no face", "view": None}
            shots[concept]["no face"] += 1
            continue
        top = faces[0]  # the largest: the subject
        height = top.box[3] - top.box[1]
        shot, view = shot_class(height, heights[path]), view_class(top.yaw)
        images[str(path)] = {"shot": shot, "face_height": round(height / max(1, heights[path]), 3), "view": view,
                             "yaw": None if top.yaw is None else round(top.yaw, 1), "concept": concept}
        shots[concept][shot] += 1
        if view:
            views[concept][view] += 1
    declared, _ = _declared(ds, set(shots))
    out, concepts, summary = [], {}, []
    for concept in sorted(shots):
        n = sum(shots[concept].values())
        with_face = n - shots[concept]["no face"]
        person = "declared" if concept in declared else "detected" if not declared and with_face * 2 > n else ""
        advice = _advice(shots[concept], views[concept]) if person and n >= MIN_JUDGED else []
        concepts[concept] = {"images": n, "person": person or None, "shots": {s: shots[concept][s] for s in SHOTS},
                             "views": {v: views[concept][v] for v in VIEWS}, "advice": advice}
        if with_face:
            mix = ", ".join(f"{s} {shots[concept][s]}" for s in SHOTS)
            turn = ", ".join(f"{v} {views[concept][v]}" for v in VIEWS)
            summary.append(f"shot mix {concept} ({n} image(s)): {mix}; {turn}")
        if advice:
            share = max(shots[concept].values()) / n
            out.append(Finding("shot_balance", str(ds.root / concept), "warning",
                               f"{'; '.join(advice)} (close-up {shots[concept]['close-up']}, half-body "
                               f"{shots[concept]['half-body']}, full-body {shots[concept]['full-body']}, no face "
                               f"{shots[concept]['no face']}; frontal {views[concept]['frontal']} of {sum(views[concept].values())}"
                               f" posed): the guides want {RECOMMENDATION}", round(share, 3)))
    ds.sections["shot_balance"] = {
        "thresholds": {"close_up": CLOSE_UP, "full_body": FULL_BODY, "frontal_deg": FRONTAL, "profile_deg": PROFILE,
                       "min_share": MIN_SHARE, "min_images": MIN_JUDGED},
        "recommendation": RECOMMENDATION, "concepts": concepts, "images": images, "summary": summary}
    return out
