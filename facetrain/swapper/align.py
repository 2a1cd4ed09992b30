"""5-point face alignment: the crops identity recognisers, swappers and enhancers of the inswapper family expect.

Those models were trained on faces warped by a *similarity* (rotation, uniform scale, shift) that puts five
points (both eye centres, the nose tip, both mouth corners) as close as possible to a fixed template. A model
only sees a face as it was trained when its crop uses the same template, so the templates below are data, not
taste: each is the one a published model family was trained with, normalised to 0..1 of the crop side so one
table serves every crop size. Points are in image order: the eye on the image's left first (the person's right
eye), then the right eye, nose tip, left and right mouth corner.

Our facesets store 68 dlib/DFL landmarks; `five_points` reduces them to the five. The fit is the closed-form
least-squares similarity (Umeyama), not a RANSAC/LMEDS estimate: with five points and no outliers to reject, the
exact solution is deterministic, so the same face always gives the same crop (and a resumed job the same pixels).
"""
from __future__ import annotations

import cv2
import numpy as np

#: insightface's standard ArcFace points at 112 px (the arcface_dst of its face_align), divided by 112
_ARCFACE_112_PX = np.array([[38.2946, 51.6963], [73.5318, 51.5014], [56.0252, 71.7366],
                            [41.5493, 92.3655], [70.7299, 92.2041]])

TEMPLATES: dict[str, np.ndarray] = {
    # the older, left-right symmetric 112 px points SimSwap and GHOST crop with
    # (39.730, 51.138 / 72.270, 51.138 / 56.000, 68.493 / 42.463, 87.010 / 69.537, 87.010 px at 112)
    "arcface_112_v1": np.array([[39.730, 51.138], [72.270, 51.138], [56.000, 68.493],
                                [42.463, 87.010], [69.537, 87.010]]) / 112,
    # insightface's standard points: the recognisers (w600k_r50 and kin) were trained on these crops
    "arcface_112_v2": _ARCFACE_112_PX / 112,
    # insightface's norm_crop at 128 px: the same pixel points shifted 8 px right, divided by 128 (derived from
    # its estimate_norm: for a size that is no multiple of 112 it scales the points by size / 128 and adds
    # 8 * size / 128 in x, i.e. unscaled + 8 px at 128); inswapper_128 and HyperSwap crop with it
    "arcface_128": (_ARCFACE_112_PX + [8.0, 0.0]) / 128,
    # the FFHQ-aligned face at 512 px (GFPGAN / CodeFormer / facexlib's face template), divided by 512
    "ffhq_512": np.array([[192.98138, 239.94708], [318.90277, 240.19360], [256.63416, 314.01935],
                          [201.26117, 371.41043], [313.08905, 371.15118]]) / 512,
}

#: dlib / DFL 68-point indices: eye contours, nose tip, mouth corners
_LEFT_EYE, _RIGHT_EYE, _NOSE_TIP, _MOUTH_LEFT, _MOUTH_RIGHT = slice(36, 42), slice(42, 48), 30, 48, 54


def five_points(landmarks: np.ndarray) -> np.ndarray:
    """(5, 2) float64 points from 68 dlib/DFL landmarks (eye centres, nose tip, mouth corners); 5 points pass through."""
    lm = np.asarray(landmarks, np.float64)
    if lm.shape == (5, 2):
        return lm.copy()
    if lm.shape != (68, 2):
        raise ValueError(f"landmarks: expected 68 dlib/DFL points (68, 2) or 5 points (5, 2), got an array of shape "
                         f"{lm.shape}")
    return np.stack([lm[_LEFT_EYE].mean(0), lm[_RIGHT_EYE].mean(0), lm[_NOSE_TIP], lm[_MOUTH_LEFT], lm[_MOUTH_RIGHT]])


def template(name: str, size: int) -> np.ndarray:
    """The template's points in pixels of a `size` crop."""
    if name not in TEMPLATES:
        raise ValueError(f"unknown alignment template {name!r}; known: {', '.join(TEMPLATES)}")
    return TEMPLATES[name] * float(size)


def similarity_matrix(points5: np.ndarray, template_name: str, size: int) -> np.ndarray:
    """2x3 matrix of the least-squares similarity taking the 5 points onto the template in a `size` crop.

    Umeyama's closed form: centre both point sets, take the SVD of their cross-covariance; the rotation is
    U·diag(1, ±1)·Vᵀ (the sign keeps it a rotation, never a mirror), the scale the explained variance over the
    source variance, the shift what lines the centroids up."""
    src = np.asarray(points5, np.float64)
    if src.shape != (5, 2) or not np.isfinite(src).all():
        raise ValueError(f"points5: expected 5 finite (x, y) points, got shape {src.shape}")
    dst = template(template_name, size)
    mu_s, mu_d = src.mean(0), dst.mean(0)
    s, d = src - mu_s, dst - mu_d
    var_s = (s ** 2).sum() / len(src)
    if var_s < 1e-12:
        raise ValueError("points5: the points coincide; no alignment fits them")
    u, sig, vt = np.linalg.svd(d.T @ s / len(src))
    flip = np.diag([1.0, 1.0 if np.linalg.det(u) * np.linalg.det(vt) >= 0 else -1.0])
    rot = u @ flip @ vt
    scale = float(np.trace(np.diag(sig) @ flip)) / var_s
    shift = mu_d - scale * rot @ mu_s
    return np.hstack([scale * rot, shift[:, None]])


def points_in(mat: np.ndarray, pts: np.ndarray) -> np.ndarray:
    """Points (N, 2) mapped by a 2x3 affine matrix (image -> crop for an alignment matrix)."""
    pts = np.asarray(pts, np.float64)
    return pts @ np.asarray(mat, np.float64)[:, :2].T + np.asarray(mat, np.float64)[:, 2]


def _shrink_roi(image: np.ndarray, mat: np.ndarray, size: int, scale: float) -> tuple[np.ndarray, np.ndarray]:
    """The part of `image` the crop reads, area-averaged down by about `scale`, and the matrix from it to the crop.

    cv2.warpAffine has no area filter (it turns INTER_AREA into bilinear), so a warp that shrinks a face several
    times samples it sparsely and aliases. Shrinking only the crop's footprint with cv2.resize(INTER_AREA) first
    leaves the warp a scale near 1. The footprint is clipped to the image, so the warp's border replicate still
    repeats the image's own edge."""
    inv = cv2.invertAffineTransform(mat)
    corners = points_in(inv, [[0, 0], [size, 0], [0, size], [size, size]])
    h, w = image.shape[:2]
    x0, y0 = np.clip(np.floor(corners.min(0)).astype(int) - 2, 0, [w - 1, h - 1])
    x1, y1 = np.clip(np.ceil(corners.max(0)).astype(int) + 3, [x0 + 1, y0 + 1], [w, h])
    roi = image[y0:y1, x0:x1]
    nw, nh = max(1, round(roi.shape[1] * scale)), max(1, round(roi.shape[0] * scale))
    small = cv2.resize(roi, (nw, nh), interpolation=cv2.INTER_AREA)
    fx, fy = roi.shape[1] / nw, roi.shape[0] / nh
    # a small pixel (u, v) covers roi pixels centred at ((u + 0.5) * fx - 0.5, ...): back to image coordinates
    to_image = np.array([[fx, 0, 0.5 * fx - 0.5 + x0], [0, fy, 0.5 * fy - 0.5 + y0]])
    composed = mat[:, :2] @ to_image
    composed[:, 2] += mat[:, 2]
    return small, composed


def align_crop(image: np.ndarray, points5: np.ndarray, template_name: str, size: int) -> tuple[np.ndarray, np.ndarray]:
    """(crop `size` x `size`, 2x3 image->crop matrix) of the face whose 5 points are given, on `template_name`.

    Outside the image the edge pixels repeat (border replicate), as the models' training crops did; shrinking
    is area-averaged, enlarging bicubic."""
    mat = similarity_matrix(points5, template_name, size)
    scale = float(np.sqrt(abs(np.linalg.det(mat[:, :2]))))
    src, warp = image, mat
    interp = cv2.INTER_CUBIC
    if scale < 1.0:
        interp = cv2.INTER_LINEAR
        if scale < 0.75:  # only a real shrink is worth the resize; near 1 bilinear already sees every pixel
            src, warp = _shrink_roi(image, mat, size, scale)
    crop = cv2.warpAffine(src, warp, (size, size), flags=interp, borderMode=cv2.BORDER_REPLICATE)
    return crop, mat
