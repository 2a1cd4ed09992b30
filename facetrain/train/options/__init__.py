"""`face train`'s option groups beyond SAEHD's own (which stay in train/config.py): one class per feature, each
with its own checks, inherited by FaceTrainConfig, so a feature's options live beside nothing else's."""
from __future__ import annotations

import math
from typing import Any

from loratrain.core.errors import Problem

MAX_FLOAT_OPTION = 1e9  # no float option of these groups means anything near this; above it, say "too large"


def finite_problems(config: Any, group: type) -> list[Problem]:
    """Every float option a group declares must be a finite number of sane size: a range like `ge=0` lets inf
    through (inf >= 0), and NaN or inf in a weight, a power or a decay poisons training silently. A huge value is
    named "too large" rather than echoed back as a 300-digit number."""
    out: list[Problem] = []
    for name in getattr(group, "__annotations__", {}):
        value = getattr(config, name, None)
        if isinstance(value, bool) or not isinstance(value, float):
            continue
        if not math.isfinite(value):
            out.append((name, f"must be a finite number, not {value}"))
        elif abs(value) > MAX_FLOAT_OPTION:
            out.append((name, f"too large (at most {MAX_FLOAT_OPTION:g})"))
    return out
