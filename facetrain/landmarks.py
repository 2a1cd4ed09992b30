"""68-point landmarks: the similarity fit to DeepFaceLab's mean face, face-type crops, pose and masks.

The crop is DFL's: Umeyama (with scale) from landmarks 17-48 and 54 to a unit-square mean face, the
square's diagonals mapped back into the image and scaled by the face type's padding, then a 3-point
affine to the output square. Details: docs/face-swap.md#alignment.
"""
from __future__ import annotations

import math

import cv2
import numpy as np

from .face_types import FACE_TYPE_NAMES, FACE_TYPES  # noqa: F401  (re-exported)

# Mean face in the unit square for landmarks 17..48 and 54 (DeepFaceLab's `landmarks_2D_new`).
TEMPLATE = np.array([
    [0.000213256, 0.106454], [0.0752622, 0.038915], [0.18113, 0.0187482], [0.29077, 0.0344891],
    [0.393397, 0.0773906], [0.586856, 0.0773906], [0.689483, 0.0344891], [0.799124, 0.0187482],
    [0.904991, 0.038915], [0.98004, 0.106454], [0.490127, 0.203352], [0.490127, 0.307009],
    [0.490127, 0.409805], [0.490127, 0.515625], [0.36688, 0.587326], [0.426036, 0.609345],
    [0.490127, 0.628106], [0.554217, 0.609345], [0.613373, 0.587326], [0.121737, 0.216423],
    [0.187122, 0.178758], [0.265825, 0.179852], [0.334606, 0.231733], [0.260918, 0.245099],
    [0.182743, 0.244077], [0.645647, 0.231733], [0.714428, 0.179852], [0.793132, 0.178758],
    [0.858516, 0.216423], [0.79751, 0.244077], [0.719335, 0.245099], [0.254149, 0.780233],
    [0.726104, 0.780233],
], dtype=np.float64)
TEMPLATE_INDICES = list(range(17, 49)) + [54]



def umeyama(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """3x3 least-squares similarity (rotation, uniform scale, translation) mapping src points onto dst.

    scikit-image's SimilarityTransform is Umeyama's estimate with scale, exactly what DFL calls.
    """
    from skimage.transform import SimilarityTransform

    src, dst = np.asarray(src, np.float64), np.asarray(dst, np.float64)
    if hasattr(SimilarityTransform, "from_estimate"):  # scikit-image >= 0.26
        tform = SimilarityTransform.from_estimate(src, dst)
        ok = isinstance(tform, SimilarityTransform)
    else:
        tform = SimilarityTransform()
        ok = tform.estimate(src, dst)
    if not ok:
        raise ValueError("the landmarks are degenerate (no similarity transform fits them)")
    return np.asarray(tform.params, np.float64)


def transform_points(points: np.ndarray, mat: np.ndarray, invert: bool = False) -> np.ndarray:
    """Apply a 2x3 affine (or its inverse) to Nx2 points."""
    if invert:
        mat = cv2.invertAffineTransform(np.asarray(mat, np.float64))
    pts = np.asarray(points, np.float64)
    return pts @ np.asarray(mat, np.float64)[:, :2].T + np.asarray(mat, np.float64)[:, 2]


def face_matrix(landmarks: np.ndarray, size: int, face_type: str, scale: float = 1.0) -> np.ndarray:
    """2x3 affine from the frame to the `size`-pixel aligned crop of `face_type`; scale > 1 zooms in (the merger's
    output_face_scale)."""
    if face_type not in FACE_TYPES:
        raise ValueError(f"unknown face type {face_type!r}; choose one of {', '.join(FACE_TYPES)}")
    lm = np.asarray(landmarks, np.float64)
    if lm.shape != (68, 2):
        raise ValueError(f"expected 68x2 landmarks, got {lm.shape}")
    to_unit = umeyama(lm[TEMPLATE_INDICES], TEMPLATE)[:2]
    corners = transform_points(np.array([[0, 0], [1, 0], [1, 1], [0, 1], [0.5, 0.5]]), to_unit, invert=True)
    centre = corners[4]
    tb = corners[2] - corners[0]
    bt = corners[1] - corners[3]
    diag = np.linalg.norm(tb)
    tb, bt = tb / diag, bt / np.linalg.norm(bt)
    padding, shift = FACE_TYPES[face_type]
    mod = diag * (padding * math.sqrt(2.0) + 0.5) / scale
    if face_type == "head":
        # DFL moves a head crop sideways by the yaw seen in the unit-square landmarks, damped near frontal
        # (|tanh(2 yaw)|), so a turned head is not cut off on the side it turns to.
        yaw = averaged_yaw(transform_points(lm, to_unit))
        yaw *= abs(math.tanh(yaw * 2))
        left = corners[0] - corners[1]  # top-right -> top-left; its length is the square's side
        centre = centre - left * yaw / 2
    if shift:
        up = corners[0] - corners[3]  # bottom-left -> top-left
        centre = centre + up * shift
    src = np.float32([centre - tb * mod, centre + bt * mod, centre + tb * mod])
    dst = np.float32([[0, 0], [size, 0], [size, size]])
    return cv2.getAffineTransform(src, dst)


def averaged_yaw(landmarks: np.ndarray) -> float:
    """DFL's yaw proxy for the head crop: nose-bridge-to-jaw distance on the right minus on the left (points 0-2,
    14-16 against 27-29), in the units of the landmarks given (the unit square, in `face_matrix`)."""
    lm = np.asarray(landmarks, np.float64)
    left = ((lm[27, 0] - lm[0, 0]) + (lm[28, 0] - lm[1, 0]) + (lm[29, 0] - lm[2, 0])) / 3.0
    right = ((lm[16, 0] - lm[27, 0]) + (lm[15, 0] - lm[28, 0]) + (lm[14, 0] - lm[29, 0])) / 3.0
    return float(right - left)


def align_face(image: np.ndarray, landmarks: np.ndarray, size: int, face_type: str) -> tuple[np.ndarray, np.ndarray]:
    """(aligned crop, frame-to-crop matrix); Lanczos, as DFL intends."""
    mat = face_matrix(landmarks, size, face_type)
    return cv2.warpAffine(image, mat, (size, size), flags=cv2.INTER_LANCZOS4), mat


def estimate_yaw_pitch(landmarks: np.ndarray) -> tuple[float, float]:
    """Rough head pose from 2-D landmarks (radians-like, about -1..1): enough to sort and to bin by yaw.

    Yaw from the nose tip's position between the jaw edges; pitch from its height between the eye line
    and the mouth, relative to a frontal face's."""
    lm = np.asarray(landmarks, np.float64)
    left, right, nose = lm[0], lm[16], lm[30]
    width = np.linalg.norm(right - left) + 1e-6
    yaw = (np.linalg.norm(nose - left) - np.linalg.norm(nose - right)) / width
    eyes = (lm[36:42].mean(0) + lm[42:48].mean(0)) / 2
    mouth = lm[48:68].mean(0)
    span = np.linalg.norm(mouth - eyes) + 1e-6
    pitch = (np.linalg.norm(nose - eyes) / span - 0.62) * 2.0
    return float(np.clip(yaw * 1.5, -1.5, 1.5)), float(np.clip(pitch, -1.5, 1.5))


def expand_eyebrows(landmarks: np.ndarray, eyebrows_expand_mod: float = 1.0) -> np.ndarray:
    """DFL's per-point rule: each brow point moves away from the eye-top point below it by half their distance
    (times the mod), on whole pixels as DFL computes it; the outer points pair with a point between the eye
    corner and the jaw's first point."""
    lm = np.asarray(landmarks, np.float64).astype(np.int32)
    ml, mr = (lm[36] + lm[0]) // 2, (lm[16] + lm[45]) // 2
    ql, qr = (lm[36] + ml) // 2, (lm[45] + mr) // 2
    bot_l = np.array((ql, lm[36], lm[37], lm[38], lm[39]))
    bot_r = np.array((lm[42], lm[43], lm[44], lm[45], qr))
    top_l, top_r = lm[17:22].copy(), lm[22:27].copy()
    lm[17:22] = top_l + eyebrows_expand_mod * 0.5 * (top_l - bot_l)
    lm[22:27] = top_r + eyebrows_expand_mod * 0.5 * (top_r - bot_r)
    return lm


#: the convex parts whose union is DFL's hull mask (jaw halves, cheeks, nose ridge, eye regions, nose)
HULL_PARTS = (
    (range(0, 9), (17,)), (range(8, 17), (26,)), (range(17, 20), (8,)), (range(24, 27), (8,)), (range(19, 25), (8,)),
    (range(17, 22), (27,), range(31, 36), (8,)), (range(22, 27), (27,), range(31, 36), (8,)), (range(27, 31), range(31, 36)),
)


def hull_mask(shape: tuple[int, int], landmarks: np.ndarray, eyebrows_expand_mod: float = 1.0) -> np.ndarray:
    """float32 HxW mask of the face: DFL's union of convex parts over the landmarks with the brows raised."""
    lm = expand_eyebrows(landmarks, eyebrows_expand_mod)
    mask = np.zeros(shape, np.float32)
    for part in HULL_PARTS:
        points = lm[[i for group in part for i in group]]
        cv2.fillConvexPoly(mask, cv2.convexHull(points), 1.0)
    return mask


def eyes_mouth_mask(shape: tuple[int, int], landmarks: np.ndarray) -> np.ndarray:
    """Eyes and inner mouth, dilated and softened, clipped to the face: where eyes_mouth_prio looks."""
    h = shape[0]
    lm = np.asarray(landmarks, np.float64).astype(np.int32)
    mask = np.zeros(shape, np.float32)
    for part in (lm[36:42], lm[42:48], lm[60:68]):
        cv2.fillConvexPoly(mask, cv2.convexHull(part), 1.0)
    k = max(1, h // 32)
    mask = cv2.dilate(mask, cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (k, k)))
    blur = max(3, h // 16) | 1
    mask = cv2.GaussianBlur(mask, (blur, blur), 0)
    mask *= hull_mask(shape, landmarks) > 0.5
    return mask / max(float(mask.max()), 1e-6)
