"""XY(Z) grid axes: what each changes in a cell, how its values parse, and how costly a change is.

Values parse like A1111's X/Y/Z plot: CSV (quotes allow commas), and on int/float axes `1-5`,
`1-5 (+2)`, `10-1 (-3)` and `1-10 [5]`. The cost orders the loops: the costliest axis (checkpoint)
runs outermost so each model loads once.
"""
from __future__ import annotations

import csv
import io
import re
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from loratrain.core.errors import ConfigError
from loratrain.core.paths import confine, locate
from loratrain.core.registry import Registry
from loratrain.core.samplers import SAMPLERS
from loratrain.core.session import LoraUse


@dataclass
class CellParams:
    checkpoint: str
    prompt: str
    negative_prompt: str = ""
    loras: list[LoraUse] = field(default_factory=list)
    seed: int = 0
    steps: int = 20
    cfg_scale: float = 7.0
    sampler: str = "euler_a"
    clip_skip: int = 1
    width: int = 512
    height: int = 512
    guidance: float = 3.5  # FLUX.1 dev's embedded guidance
    shift: float = 0.0  # FLUX.1 schedule shift (0: BFL's own)

    def with_lora(self, **changes: Any) -> "CellParams":
        """Change the first LoRA slot (the one the LoRA axes compare)."""
        if not self.loras:
            raise ConfigError("a LoRA axis needs a LoRA: pass --loras PATH[:WEIGHT] (or use the `lora` axis)")
        return replace(self, loras=[replace(self.loras[0], **changes), *self.loras[1:]])


@dataclass(frozen=True)
class Axis:
    name: str
    label: str
    kind: type  # int, float or str
    cost: float
    apply: Callable[[CellParams, Any], CellParams]
    describe: Callable[[Any], str] = str  # the value as shown in a label
    check: Callable[[Any], None] = lambda v: None


AXES: Registry[Axis] = Registry("grid axis")


def _register(axis: Axis, *aliases: str) -> None:
    AXES.register(axis.name, *aliases)(axis)


def _file_exists(what: str) -> Callable[[Any], None]:
    def check(v: Any) -> None:
        confine(v, what)  # an axis value is a path like any option's: inside the app's workspace or refused
        if not locate(v).exists():
            raise ConfigError(f"{what} not found: {v}")
    return check


def _sampler_known(v: Any) -> None:
    if v not in SAMPLERS:
        raise ConfigError(f"unknown sampler {v!r}; choose one of {', '.join(SAMPLERS.names())}")


def _size(v: str) -> tuple[int, int]:
    m = re.fullmatch(r"\s*(\d+)\s*[xX×]\s*(\d+)\s*", v)
    if not m:
        raise ConfigError(f"size {v!r} must look like 512x768")
    return int(m.group(1)), int(m.group(2))


_register(Axis("checkpoint", "Model", str, 1.0, lambda p, v: replace(p, checkpoint=v), lambda v: Path(v).stem,
               _file_exists("checkpoint")), "model")
_register(Axis("lora", "LoRA", str, 0.5, lambda p, v: p.with_lora(path=v) if p.loras else replace(p, loras=[LoraUse(v)]),
               lambda v: Path(v).stem, _file_exists("LoRA")))
_register(Axis("lora_weight", "LoRA weight", float, 0.1, lambda p, v: p.with_lora(weight=v)))
_register(Axis("lora_blocks", "LoRA blocks", str, 0.3, lambda p, v: p.with_lora(blocks=v)))
_register(Axis("seed", "Seed", int, 0.0, lambda p, v: replace(p, seed=v)))
_register(Axis("steps", "Steps", int, 0.0, lambda p, v: replace(p, steps=v)))
_register(Axis("cfg_scale", "CFG scale", float, 0.0, lambda p, v: replace(p, cfg_scale=v)), "cfg")
_register(Axis("sampler", "Sampler", str, 0.0, lambda p, v: replace(p, sampler=v), check=_sampler_known))
_register(Axis("clip_skip", "Clip skip", int, 0.0, lambda p, v: replace(p, clip_skip=v)))
_register(Axis("width", "Width", int, 0.0, lambda p, v: replace(p, width=v)))
_register(Axis("height", "Height", int, 0.0, lambda p, v: replace(p, height=v)))
_register(Axis("size", "Size", str, 0.0, lambda p, v: replace(p, width=_size(v)[0], height=_size(v)[1]),
               check=lambda v: _size(v) and None))
# FLUX.1 only (plan._check refuses them with an SD model)
_register(Axis("guidance", "Guidance", float, 0.0, lambda p, v: replace(p, guidance=v)), "distilled_cfg")
_register(Axis("shift", "Shift", float, 0.0, lambda p, v: replace(p, shift=v)))
# prompt search/replace is applied by the runner (it needs the first value); registered for parsing and labels
_register(Axis("prompt_sr", "Prompt S/R", str, 0.0, lambda p, v: p), "prompt")

_RANGE = re.compile(r"^\s*([+-]?\d+(?:\.\d*)?)\s*-\s*([+-]?\d+(?:\.\d*)?)\s*(?:\(([+-]\d+(?:\.\d*)?)\s*\)|\[(\d+)\s*\])?\s*$")


def _expand(item: str, kind: type) -> list[Any]:
    m = _RANGE.match(item)
    if not m:
        return [kind(item)]
    a, b, step, count = m.groups()
    if kind is int and any(v is not None and not float(v).is_integer() for v in (a, b, step)):
        raise ValueError(f"{item!r}: an integer axis takes whole-number ranges (A1111 refuses fractions too)")
    if count is not None:
        n = int(count)
        lo, hi = float(a), float(b)
        vals = [lo + (hi - lo) * i / (n - 1) for i in range(n)] if n > 1 else [lo]
        return [int(v) if kind is int else round(v, 8) for v in vals]
    s = float(step) if step is not None else (1.0 if float(b) >= float(a) else -1.0)
    if s == 0 or (float(b) - float(a)) * s < 0:
        raise ValueError(item)
    out, v = [], float(a)
    while (v <= float(b) + 1e-9) if s > 0 else (v >= float(b) - 1e-9):
        out.append(int(round(v)) if kind is int else round(v, 8))
        v += s
    return out


def parse_axis_values(axis_name: str, text: str) -> tuple[Axis, list[Any]]:
    """The axis and its values, or a ConfigError naming the axis and the bad value."""
    axis = AXES.get(axis_name) if axis_name in AXES else None
    if axis is None:
        raise ConfigError(f"unknown grid axis {axis_name!r}; choose one of {', '.join(AXES.names())}")
    items = [s.strip() for row in csv.reader(io.StringIO(text), skipinitialspace=True) for s in row if s.strip()]
    if not items:
        raise ConfigError(f"axis {axis.name}: no values given")
    values: list[Any] = []
    for item in items:
        try:
            values.extend(_expand(item, axis.kind) if axis.kind in (int, float) else [item])
        except ValueError as e:
            detail = str(e) if "integer axis" in str(e) else f"{item!r} is not a valid {axis.kind.__name__} or range"
            raise ConfigError(f"axis {axis.name}: {detail}") from None
    for v in values:
        try:
            axis.check(v)
        except ConfigError as e:
            raise ConfigError(f"axis {axis.name}: {e}") from None
    return axis, values


def label(axis: Axis, value: Any) -> str:
    return f"{axis.label}: {axis.describe(value)}"
