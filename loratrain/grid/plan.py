"""A grid's plan: its axes and every cell's parameters, parsed and checked before the first image, so a typo in
the last value of an axis fails at once rather than after an hour of images. The form uses it too (GridConfig)."""
from __future__ import annotations

import itertools
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

from loratrain.core.errors import ConfigError
from loratrain.core.session import lora_use

from .axes import Axis, CellParams, label, parse_axis_values

if TYPE_CHECKING:
    from .config import GridConfig


@dataclass
class AxisValues:
    key: str  # "x" | "y" | "z"
    axis: Axis | None
    values: list[Any]
    raw: str = ""

    @property
    def labels(self) -> list[str]:
        return [label(self.axis, v) if self.axis else "" for v in self.values]


def parse_axes(cfg: GridConfig) -> tuple[AxisValues, AxisValues, AxisValues]:
    if not cfg.x_type or not cfg.y_type:
        raise ConfigError("a grid needs --x_type/--x_values and --y_type/--y_values")
    out = []
    for key in ("x", "y", "z"):
        kind, raw = getattr(cfg, f"{key}_type"), getattr(cfg, f"{key}_values")
        if not kind:
            out.append(AxisValues(key, None, [None]))
            continue
        axis, values = parse_axis_values(kind, raw)
        out.append(AxisValues(key, axis, values, raw))
    names = [a.axis.name for a in out if a.axis]
    if len(set(names)) != len(names):
        raise ConfigError(f"an axis type is used twice ({', '.join(names)})")
    return out[0], out[1], out[2]


def cell_params(cfg: GridConfig, axes: tuple[AxisValues, ...], seed: int) -> dict[tuple[int, int, int], CellParams]:
    """Parameters of every cell, computed (and so checked) before anything is generated."""
    base = CellParams(cfg.model, cfg.prompt, cfg.negative_prompt, [lora_use(t, cfg.model) for t in cfg.loras], seed, cfg.steps,
                      cfg.cfg_scale, cfg.sampler, cfg.clip_skip, cfg.width, cfg.height, cfg.guidance, cfg.shift)
    cells = {}
    for iz, iy, ix in itertools.product(*(range(len(a.values)) for a in (axes[2], axes[1], axes[0]))):
        p = base
        for av, i in ((axes[2], iz), (axes[1], iy), (axes[0], ix)):
            if av.axis is None:
                continue
            v = av.values[i]
            if av.axis.name == "prompt_sr":
                p = replace(p, prompt=p.prompt.replace(av.values[0], v), negative_prompt=p.negative_prompt.replace(av.values[0], v))
            elif av.axis.name == "seed" and v == -1:
                p = replace(p, seed=seed)
            else:
                p = av.axis.apply(p, v)
        cells[(ix, iy, iz)] = p
    return cells


def _check(cfg: GridConfig, axes: tuple[AxisValues, ...], cells: dict[tuple[int, int, int], CellParams]) -> None:
    _check_flux(cfg, axes, cells)
    for av in axes:
        if av.axis is not None and av.axis.name == "prompt_sr":
            first = av.values[0]
            if first not in cfg.prompt and first not in cfg.negative_prompt:
                raise ConfigError(f"axis prompt_sr: the first value {first!r} must appear in the prompt or the negative prompt")
    for p in cells.values():
        if not p.checkpoint:
            raise ConfigError("no checkpoint: pass --model or use the checkpoint axis")
        if not p.prompt:
            raise ConfigError("--prompt is required")
        if p.steps < 1 or p.width < 8 or p.height < 8:
            raise ConfigError(f"bad cell settings: steps {p.steps}, size {p.width}x{p.height}")
    from loratrain.core.sampling import SamplePrompt, check_weights

    for prompt, negative in {(p.prompt, p.negative_prompt) for p in cells.values()}:
        try:
            check_weights(SamplePrompt(prompt, negative))
        except ValueError as e:
            raise ConfigError(str(e)) from None
    pixels = sum(p.width * p.height for p in cells.values())
    if pixels > cfg.max_megapixels * 1e6:
        raise ConfigError(f"the grid would have {pixels / 1e6:.0f} MP, above --max_megapixels {cfg.max_megapixels}")


def _check_flux(cfg: GridConfig, axes: tuple[AxisValues, ...], cells: dict[tuple[int, int, int], CellParams]) -> None:
    """FLUX-only axes need FLUX.1 checkpoints; FLUX.1 checkpoints take no SD-only axis and share no grid with SD ones."""
    from loratrain.core.flux_sampling import is_flux_checkpoint

    models = sorted({p.checkpoint for p in cells.values() if p.checkpoint})
    from loratrain.core.sd3_sampling import is_sd3_checkpoint

    flux = bool(models) and any(is_flux_checkpoint(m) for m in models)
    sd3 = not flux and bool(models) and any(is_sd3_checkpoint(m) for m in models)
    names = {a.axis.name for a in axes if a.axis}
    flow_axes = {"shift"} if sd3 else {"guidance", "shift"} if flux else set()
    if names & ({"guidance", "shift"} - flow_axes):
        name = sorted(names & ({"guidance", "shift"} - flow_axes))[0]
        raise ConfigError(f"axis {name}: a FLUX.1{' / SD3' if name == 'shift' else ''} setting; not for this model")
    sd_only = names & {"sampler", "clip_skip", "lora_blocks"}
    if (flux or sd3) and sd_only:
        raise ConfigError(f"axis {sorted(sd_only)[0]}: not used by {'SD3' if sd3 else 'FLUX.1'} sampling (one Euler flow "
                          "sampler, no clip skip, no LoRA block weights yet)")
    problems = cfg.flux_problems(models)  # FLUX.1: every part found; SD: no FLUX option set
    if problems:
        raise ConfigError(problems=problems)


def loop_order(axes: tuple[AxisValues, ...]) -> list[tuple[int, int, int]]:
    """Cells in run order: costliest axis outermost; ties: Z, then Y, then X outer."""
    x, y, z = axes
    ranked = sorted([(z, 0), (y, 1), (x, 2)], key=lambda t: (-(t[0].axis.cost if t[0].axis else -1), t[1]))
    order = []
    for idx in itertools.product(*(range(len(a.values)) for a, _ in ranked)):
        pos = {a.key: i for (a, _), i in zip(ranked, idx)}
        order.append((pos["x"], pos["y"], pos["z"]))
    return order


def plan_grid(cfg: GridConfig, seed: int) -> tuple[tuple[AxisValues, AxisValues, AxisValues], dict[tuple[int, int, int], CellParams]]:
    """Axes and every cell's parameters, parsed and checked: all of it happens before the first image."""
    axes = parse_axes(cfg)
    cells = cell_params(cfg, axes, seed)
    _check(cfg, axes, cells)
    return axes, cells
