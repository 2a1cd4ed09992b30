"""How users name LoRAs and LoRA block weights: `PATH[:RATIO[:BLOCKS]]`, presets and 12/17/20/26-value vectors.

Light to import (no torch), so configs can check these specs before any job starts.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path

from loratrain.core.errors import ConfigError
from loratrain.core.models.families import Family

from .blocks import BASE, block_names
from .flux_blocks import FLUX_BLOCKS, flux_block_presets
from .presets import lora_block_presets

# LoRA block-weight formats (hako-mikan's extension); MID is our M00
LBW_LAYOUTS: dict[int, list[str]] = {
    26: [BASE] + [f"IN{i:02d}" for i in range(12)] + ["M00"] + [f"OUT{i:02d}" for i in range(12)],
    17: [BASE, "IN01", "IN02", "IN04", "IN05", "IN07", "IN08", "M00"] + [f"OUT{i:02d}" for i in range(3, 12)],
    20: [BASE] + [f"IN{i:02d}" for i in range(9)] + ["M00"] + [f"OUT{i:02d}" for i in range(9)],
    12: [BASE, "IN04", "IN05", "IN07", "IN08", "M00"] + [f"OUT{i:02d}" for i in range(6)],
    61: FLUX_BLOCKS,  # FLUX.1 (flux_blocks.py); SD families refuse it, FLUX refuses the others
}


@dataclass
class LoraSpec:
    path: str
    ratio: float = 1.0
    blocks: str = ""  # LoRA block-weight preset name or value list


def parse_lora_spec(text: str) -> LoraSpec:
    """`PATH[:RATIO[:LBW]]`, LBW a preset name or comma list (12/17/20/26 values).

    A value that names an existing file is taken as a path whole, so paths with colons still work.
    """
    try:
        whole = Path(text).exists()
    except OSError:  # a name too long for the file system (a 61-value FLUX vector): not a file
        whole = False
    if whole:
        return LoraSpec(text)
    parts = text.split(":")
    for n_tail in (2, 1):
        if len(parts) > n_tail:
            head, tail = ":".join(parts[:-n_tail]), parts[-n_tail:]
            try:
                ratio = float(tail[0])
            except ValueError:
                continue
            return LoraSpec(head, ratio, tail[1] if n_tail == 2 else "")
    return LoraSpec(text)


def missing_lora(text: str, spec: LoraSpec) -> str:
    """Why `text` names no LoRA file: an existing file followed by a weight that is not a number says so, rather
    than "not found"."""
    parts = text.split(":")
    for n_tail in (1, 2):
        head = ":".join(parts[:-n_tail])
        if len(parts) > n_tail and head and Path(head).is_file():
            return f"{text}: the weight {parts[-n_tail]!r} after {head} is not a number (PATH:WEIGHT, e.g. {head}:0.8)"
    return f"LoRA not found: {spec.path}"


def lora_spec_problems(specs: list[str], field: str) -> list[tuple[str, str]]:
    """Each `PATH[:RATIO[:BLOCKS]]` names an existing file and, if given, a known block preset or value list."""
    out = []
    for text in specs:
        spec = parse_lora_spec(text)
        if not Path(spec.path).is_file():
            out.append((field, missing_lora(text, spec)))
        out += [(field, problem) for problem in spec_value_problems(text, spec)]
    return out


def spec_value_problems(text: str, spec: LoraSpec) -> list[str]:
    """What is wrong with a spec's weight and block weights (a nan or inf weight would write nan / inf into every
    module, a black image); the file is checked by the caller, which knows where to look for it."""
    out = []
    if not math.isfinite(spec.ratio):
        out.append(f"{text}: the weight {spec.ratio} is not a finite number")
    if spec.blocks:
        try:
            lbw_values(spec.blocks)
        except ValueError as e:
            out.append(f"{text}: {e}")
    return out


def block_values(text: str, presets: dict[str, list[float]], label: str = "LoRA", hint: str = "") -> list[float]:
    """The finite values of a block-weight preset name (looked up in `presets`) or comma list; the caller checks how
    many. `label` names the kind in messages (LoRA, FLUX), `hint` is added to the unknown-preset one."""
    name = text.strip()
    if re.fullmatch(r"[A-Za-z_][\w.]*", name):
        if name not in presets:
            raise ConfigError(f"unknown {label} block-weight preset {text!r}; known: {', '.join(presets)}{hint}")
        values = presets[name]
    else:
        try:
            values = [float(v) for v in text.split(",")]
        except ValueError:
            raise ConfigError(f"{label} block weights {text!r}: not a preset name or a list of numbers") from None
    if not all(math.isfinite(v) for v in values):
        raise ConfigError(f"{label} block weights {text!r}: every value must be a finite number (no nan or inf)")
    return values


def lbw_values(text: str) -> list[float]:
    """The values of a LoRA block-weight preset name or comma list (12, 17, 20 or 26 of them; 61 for FLUX)."""
    presets = lora_block_presets()
    if text.strip() not in presets and text.strip() in flux_block_presets():
        return flux_block_presets()[text.strip()]
    values = block_values(text, presets, hint=f" (FLUX: {', '.join(flux_block_presets())})")
    if len(values) not in LBW_LAYOUTS:
        raise ConfigError(f"LoRA block weights need 12, 17, 20 or 26 values (FLUX: 61), got {len(values)}")
    return values


def lbw_weights(text: str, family: Family) -> dict[str, float]:
    """Block name -> ratio from a LoRA block-weight preset or vector; blocks a format omits get 0."""
    values = lbw_values(text)
    layout = LBW_LAYOUTS[len(values)]
    weights = {name: 0.0 for name in [BASE] + block_names(family)}
    known = set(weights)
    for name, v in zip(layout, values):
        if name in known:
            weights[name] = v
        elif v != 0:
            raise ValueError(f"LoRA block weights: block {name} does not exist in {family.name}")
    return weights
