"""Colour drift: each LoRA cell of a grid against the same cell at LoRA weight 0 (same prompt, seed and settings).

The guides our users follow test a LoRA at weights up to 1 and read a colour cast or over-saturation that grows with
the weight as the sign of an overtrained LoRA. A LoRA changes what is drawn too, so the measure is deliberately
coarse: the shift of the image's mean colour (CIE76 delta E of the mean L*a*b*, which content changes move little
while a cast moves all of it) and the change of its mean saturation (chroma). Thresholds are rules of thumb.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from .axes import CellParams

Index = tuple[int, int, int]


def lab(rgb: np.ndarray) -> np.ndarray:
    """sRGB (uint8, ..., 3) -> CIE L*a*b* (D65), the standard formulas."""
    c = rgb.astype(np.float64) / 255.0
    c = np.where(c <= 0.04045, c / 12.92, ((c + 0.055) / 1.055) ** 2.4)
    m = np.array([[0.4124564, 0.3575761, 0.1804375], [0.2126729, 0.7151522, 0.0721750], [0.0193339, 0.1191920, 0.9503041]])
    xyz = c @ m.T / np.array([0.95047, 1.0, 1.08883])
    f = np.where(xyz > (6 / 29) ** 3, np.cbrt(xyz), xyz / (3 * (6 / 29) ** 2) + 4 / 29)
    return np.stack([116 * f[..., 1] - 16, 500 * (f[..., 0] - f[..., 1]), 200 * (f[..., 1] - f[..., 2])], axis=-1)


@dataclass
class ColorStats:
    L: float
    a: float
    b: float
    chroma: float  # mean per-pixel sqrt(a^2 + b^2): saturation
    contrast: float  # standard deviation of L

    @classmethod
    def of(cls, path: Path) -> "ColorStats":
        with Image.open(path) as im:
            px = lab(np.asarray(im.convert("RGB"))).reshape(-1, 3)
        return cls(*(float(v) for v in px.mean(0)), float(np.hypot(px[:, 1], px[:, 2]).mean()), float(px[:, 0].std()))


@dataclass
class Drift:
    cell: Index
    reference: Index
    weight: float
    delta_e: float  # CIE76 distance of the mean L*a*b*
    chroma_change: float  # relative change of the mean chroma
    contrast_change: float  # relative change of the L spread
    flagged: bool


def reference_of(p: CellParams) -> CellParams | None:
    """The same cell with the first LoRA at weight 0; None for a cell without a LoRA or already at 0."""
    if not p.loras or p.loras[0].weight == 0:
        return None
    return p.with_lora(weight=0.0)


def missing_references(cells: dict[Index, CellParams]) -> list[CellParams]:
    """Weight-0 cells the grid lacks, one per distinct reference (`--color_drift on` makes them)."""
    have = list(cells.values())
    out: list[CellParams] = []
    for p in cells.values():
        ref = reference_of(p)
        if ref is not None and ref not in have and ref not in out:
            out.append(ref)
    return out


def measure_drift(cells: dict[Index, CellParams], done: dict[Index, Path], extra: dict[Index, tuple[CellParams, Path]],
                  max_delta_e: float, max_chroma: float) -> list[Drift]:
    """Each made LoRA cell against its weight-0 cell (in the grid, or among `extra`, keyed by negative indices)."""
    made = {idx: (cells[idx], path) for idx, path in done.items()} | extra
    stats: dict[Index, ColorStats] = {}

    def stat(idx: Index) -> ColorStats:
        if idx not in stats:
            stats[idx] = ColorStats.of(made[idx][1])
        return stats[idx]

    out = []
    for idx, (p, _) in sorted(made.items()):
        ref = reference_of(p)
        match = next((j for j, (q, _) in made.items() if ref is not None and q == ref), None)
        if match is None:
            continue
        s, r = stat(idx), stat(match)
        de = float(np.sqrt((s.L - r.L) ** 2 + (s.a - r.a) ** 2 + (s.b - r.b) ** 2))
        chroma = (s.chroma - r.chroma) / max(r.chroma, 1e-6)
        contrast = (s.contrast - r.contrast) / max(r.contrast, 1e-6)
        out.append(Drift(idx, match, p.loras[0].weight, round(de, 3), round(chroma, 4), round(contrast, 4),
                         de > max_delta_e or abs(chroma) > max_chroma))
    return out


def drift_summary(drifts: list[Drift], max_delta_e: float, max_chroma: float) -> str:
    if not drifts:
        return "colour drift: no LoRA cell has a weight-0 twin to compare with (add 0 to the lora_weight axis, or --color_drift on)"
    flagged = [d for d in drifts if d.flagged]
    worst = max(drifts, key=lambda d: d.delta_e)
    head = (f"colour drift (rule of thumb: mean-colour delta E > {max_delta_e:g} or saturation change > {max_chroma:.0%} "
            f"against weight 0): {len(flagged)} of {len(drifts)} LoRA cells drift")
    return head + (f"; worst at weight {worst.weight:g}: delta E {worst.delta_e:.1f}, saturation {worst.chroma_change:+.0%}"
                   + (" - a sign of overtraining; test lower weights (0.5-0.7) or an earlier save" if flagged else ""))


def as_json(drifts: list[Drift]) -> list[dict]:
    return [asdict(d) for d in drifts]
