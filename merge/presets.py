"""Named weight presets users know from the block-weighted merge and LoRA block-weight extensions.

Merge presets are 25 values (IN00..IN11, M00, OUT00..OUT11), BASE given separately. The simple ones
and the smoothstep/cosine curves are defined by their formulas (t = i/24); the cubic-Hermite curves
exist only as tables and ship as data. Users can add their own in a TSV file (`name<TAB>values`).
"""
from __future__ import annotations

import math
from functools import cache
from pathlib import Path

from loratrain.core.lora.presets import read_tsv

HERE = Path(__file__).parent / "presets"


def _smoothstep(x: float) -> float:
    return 3 * x * x - 2 * x * x * x


def _fold(v: float) -> float:
    """Reflect into [0, 1] like a triangle wave (used by the *N and /N curves)."""
    v = v % 2.0
    return 1.0 - abs(1.0 - v)


def _ring(*ones: int, halves: tuple[int, ...] = ()) -> list[float]:
    w = [0.0] * 25
    for i in ones:
        w[i] = 1.0
    for i in halves:
        w[i] = 0.5
    return w


def _formula_presets() -> dict[str, list[float]]:
    t = [i / 24 for i in range(25)]
    p: dict[str, list[float]] = {
        "GRAD_V": [abs(12 - i) / 12 for i in range(25)],
        "GRAD_A": [1 - abs(12 - i) / 12 for i in range(25)],
        "FLAT_25": [0.25] * 25,
        "FLAT_75": [0.75] * 25,
        "ALL_A": [0.0] * 25,
        "ALL_B": [1.0] * 25,
        "MID12_50": [0.5 if 5 <= i <= 18 else 0.0 for i in range(25)],
        "OUT07": [1.0 if i >= 18 else 0.0 for i in range(25)],
        "OUT12": [1.0 if i >= 13 else 0.0 for i in range(25)],
        "OUT12_5": [1.0 if i >= 13 else (0.5 if i == 12 else 0.0) for i in range(25)],
        "RING08_SOFT": _ring(6, 7, 8, 16, 17, 18, halves=(5, 9, 15, 19)),
        "RING08_5": _ring(6, 7, 8, 9, 15, 16, 17, 18),
        "RING10_5": _ring(5, 6, 7, 8, 9, 15, 16, 17, 18, 19),
        "RING10_3": _ring(6, 7, 8, 9, 10, 14, 15, 16, 17, 18),
        "SMOOTHSTEP": [_smoothstep(x) for x in t],
        "COSINE": [(1 + math.cos(math.pi * x)) / 2 for x in t],
    }
    for n in (4, 6, 7, 8):
        p[f"WRAP{2 * n:02d}"] = [1.0] * n + [0.0] * (25 - 2 * n) + [1.0] * n
    p["REVERSE-SMOOTHSTEP"] = [1 - v for v in p["SMOOTHSTEP"]]
    p["REVERSE_COSINE"] = [1 - v for v in p["COSINE"]]
    for k in (2, 3, 4):
        p[f"SMOOTHSTEP*{k}"] = [_fold(k * _smoothstep(x)) for x in t]
        p[f"SMOOTHSTEP/{k}"] = [_smoothstep(_fold(k * x)) for x in t]
    for k in (2, 3, 4):
        for kind in ("*", "/"):
            p[f"R_SMOOTHSTEP{kind}{k}"] = [1 - v for v in p[f"SMOOTHSTEP{kind}{k}"]]
    return p


@cache
def merge_presets() -> dict[str, list[float]]:
    presets = _formula_presets()
    presets.update(read_tsv(HERE / "cubic_hermite.tsv", 25))
    return presets


def merge_preset(name: str, extra_file: str | Path | None = None) -> list[float]:
    presets = dict(merge_presets())
    if extra_file:
        presets.update(read_tsv(Path(extra_file), 25))
    lookup = {k.upper().replace("-", "_"): v for k, v in presets.items()}
    key = name.upper().replace("-", "_")
    if key not in lookup:
        raise ValueError(f"unknown merge preset {name!r}; known: {', '.join(sorted(presets))}")
    return list(lookup[key])
