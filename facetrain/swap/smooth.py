"""Temporal smoothing of landmarks (a one-euro filter per tracked face) and the jitter measure that shows it.

Neither DFL's merger nor FaceFusion filters landmarks over time, so a still face shimmers: the detector and
landmarker give a slightly different answer each frame, and the pasted crop follows it. The one-euro filter
(Casiez et al., CHI 2012) is a low-pass whose cutoff rises with speed: steady when the face is still, no lag
when it moves. It runs on all 68 points together, in units of the face's width, so one setting suits every
frame size; its state is plain data, so a resumed swap continues with exactly the filter it stopped with.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from ..landmarks import face_matrix, transform_points


def _alpha(cutoff: float, dt: float) -> float:
    tau = 1.0 / (2 * math.pi * cutoff)
    return 1.0 / (1.0 + tau / dt)


@dataclass
class OneEuro:
    min_cutoff: float = 0.4
    beta: float = 10.0
    d_cutoff: float = 1.0
    x: list | None = None      # filtered landmarks (68 x 2), in frame pixels
    dx: float = 0.0            # filtered speed, face widths per second

    def __call__(self, points: np.ndarray, dt: float) -> np.ndarray:
        points = np.asarray(points, np.float64)
        if self.x is None:
            self.x = points.tolist()
            return points
        prev = np.asarray(self.x)
        width = max(float(np.ptp(points[:, 0])), 1.0)
        speed = float(np.abs(points - prev).mean()) / width / dt
        self.dx += _alpha(self.d_cutoff, dt) * (speed - self.dx)
        a = _alpha(self.min_cutoff + self.beta * abs(self.dx), dt)
        out = prev + a * (points - prev)
        self.x = out.tolist()
        return out


@dataclass
class Track:
    filter: OneEuro
    centre: list
    last_frame: int
    motion: tuple[float, float] = (0.0, 0.0)


@dataclass
class Smoother:
    """Tracks faces frame to frame (nearest centre within half a face width) and filters each track."""

    fps: float
    enabled: bool = True
    min_cutoff: float = 0.4
    beta: float = 10.0
    tracks: list[Track] = field(default_factory=list)

    def __call__(self, frame_index: int, faces: list[np.ndarray]) -> list[tuple[np.ndarray, tuple[float, float]]]:
        """(smoothed landmarks, motion (pixels, degrees) since the previous frame) per face, in the given order."""
        dt = 1.0 / (self.fps or 25.0)
        self.tracks = [t for t in self.tracks if frame_index - t.last_frame <= 2]
        free = list(self.tracks)
        out = []
        for lm in faces:
            lm = np.asarray(lm, np.float64)
            centre = lm.mean(0)
            width = max(float(np.ptp(lm[:, 0])), 1.0)
            best = min(free, key=lambda t: np.linalg.norm(np.asarray(t.centre) - centre), default=None)
            if best is None or np.linalg.norm(np.asarray(best.centre) - centre) > width / 2:
                best = Track(OneEuro(self.min_cutoff, self.beta), centre.tolist(), frame_index)
                self.tracks.append(best)
            else:
                free.remove(best)
            smoothed = best.filter(lm, dt) if self.enabled else lm
            move = smoothed.mean(0) - np.asarray(best.centre)
            best.motion = (float(np.hypot(*move)), float(-math.degrees(math.atan2(move[1], move[0]))))
            best.centre, best.last_frame = smoothed.mean(0).tolist(), frame_index
            out.append((smoothed, best.motion))
        return out

    def state(self) -> dict:
        """Plain data for the resume file."""
        return {"tracks": [{"x": t.filter.x, "dx": t.filter.dx, "centre": t.centre, "last_frame": t.last_frame} for t in self.tracks]}

    def restore(self, state: dict) -> None:
        self.tracks = [Track(OneEuro(self.min_cutoff, self.beta, x=t["x"], dx=t["dx"]), t["centre"], t["last_frame"])
                       for t in state.get("tracks", [])]


def crop_jitter(landmarks: list[np.ndarray], size: int = 256, face_type: str = "wf") -> float:
    """Mean frame-to-frame movement (pixels) of the aligned crop's four corners in the frame: on a still
    camera and a still face, every pixel of it is jitter."""
    corners = np.array([[0, 0], [size, 0], [size, size], [0, size]], float)
    placed = [transform_points(corners, face_matrix(lm, size, face_type), invert=True) for lm in landmarks]
    moves = [np.linalg.norm(b - a, axis=1).mean() for a, b in zip(placed, placed[1:])]
    return float(np.mean(moves)) if moves else 0.0
