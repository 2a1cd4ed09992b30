"""Face types (crop extents) and their DeepFaceLab paddings; kept free of OpenCV so the CLI can list them."""
from __future__ import annotations

#: face type -> (padding, upward centre shift as a share of the square's side); docs/face-swap.md#face-types
FACE_TYPES: dict[str, tuple[float, float]] = {
    "h": (0.0, 0.0), "mf": (0.0675, 0.0), "f": (0.2109375, 0.0), "wf": (0.40, 0.07), "head": (0.70, 0.5),
}
FACE_TYPE_NAMES = {"h": "half_face", "mf": "midfull_face", "f": "full_face", "wf": "whole_face", "head": "head"}
