"""`loratrain grid`: one labelled image comparing checkpoints, LoRAs, weights and sampling settings.

Every value is parsed and checked before the first image; the seed is fixed once for the whole grid;
the costliest axis runs outermost, so each checkpoint loads once, and LoRAs are diffusers adapters on
the loaded model: a weight change is an adapter scale, a LoRA file is loaded once per checkpoint.
"""
from __future__ import annotations

import itertools
import json
import random
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from PIL import Image
from PIL.PngImagePlugin import PngInfo

from loratrain.core.config import ConfigError
from loratrain.core.jobs import JobResult, job
from loratrain.core.models.loading import SDModel, load_model
from loratrain.core.progress import Reporter, StopFlag
from loratrain.core.safe_io import atomic_path
from loratrain.core.sampling import SamplePrompt, generate
from loratrain.core.session import ModelSession, lora_use

from .axes import Axis, CellParams, label, parse_axis_values
from .config import GridConfig
from .draw import draw_grid, side_by_side


@dataclass
class AxisValues:
    key: str  # "x" | "y" | "z"
    axis: Axis | None
    values: list[Any]
    raw: str = ""

    @property
    def labels(self) -> list[str]:
        return [label(self.axis, v) if self.axis else "" for v in self.values]


@dataclass
class GridResult(JobResult):
    grids: list[Path]
    cells: dict[tuple[int, int, int], Path]
    complete: bool
    model_loads: int
    params: dict[tuple[int, int, int], CellParams] = field(default_factory=dict)

    def summary(self) -> list[str]:
        state = "grid" if self.complete else "partial grid (stopped)"
        return [f"{state}: {self.grids[-1]} ({len(self.cells)}/{len(self.params)} cells, {self.model_loads} model load(s))"]


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
                      cfg.cfg_scale, cfg.sampler, cfg.clip_skip, cfg.width, cfg.height)
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
    pixels = sum(p.width * p.height for p in cells.values())
    if pixels > cfg.max_megapixels * 1e6:
        raise ConfigError(f"the grid would have {pixels / 1e6:.0f} MP, above --max_megapixels {cfg.max_megapixels}")


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


@job
def run_grid(cfg: GridConfig, reporter: Reporter, stop: StopFlag, loader: Callable[..., SDModel] = load_model) -> GridResult:
    """An XY(Z) grid: every value checked first, the costliest axis outermost, stop after the current cell.

    Result: the grid image(s) (a partial grid when stopped), each cell's PNG and parameters, model loads.
    Each finished cell reaches the reporter as a sample.
    """
    seed = cfg.seed if cfg.seed != -1 else random.randrange(0, 4294967294)
    axes, cells = plan_grid(cfg, seed)
    out_dir = Path(cfg.output_dir)
    (out_dir / "cells").mkdir(parents=True, exist_ok=True)
    state = ModelSession(loader, cfg.allow_pickle)
    done: dict[tuple[int, int, int], Path] = {}
    infotexts: dict[tuple[int, int, int], str] = {}
    order = loop_order(axes)
    reporter.start(len(order), "grid", unit="cell")
    for idx in order:
        if stop.is_set():
            break
        p = cells[idx]
        model = state.ensure(p.checkpoint)
        state.activate(p.loras, p.sampler)
        extra = {"Model": Path(p.checkpoint).stem}
        for i, use in enumerate(p.loras, 1):
            extra.update({f"AddNet Module {i}": "LoRA", f"AddNet Model {i}": Path(use.path).stem,
                          f"AddNet Weight A {i}": f"{use.weight:g}", f"AddNet Weight B {i}": f"{use.weight:g}"})
            if use.blocks:
                extra[f"LoRA Block Weight {i}"] = use.blocks
        path = out_dir / "cells" / f"z{idx[2]:02d}_y{idx[1]:02d}_x{idx[0]:02d}.png"
        made = generate(model, SamplePrompt(p.prompt, p.negative_prompt, p.width, p.height, p.steps, p.cfg_scale, p.seed, p.sampler),
                        path, p.sampler, p.clip_skip, extra_params=extra)
        done[idx] = path
        infotexts[idx] = made.parameters
        reporter.advance(1)
        reporter.sample([str(path)], [" | ".join(a.labels[i] for a, i in zip(axes, idx) if a.axis)])
    complete = len(done) == len(cells)
    grids = _write_grids(cfg, axes, cells, done, infotexts, seed, out_dir, complete)
    reporter.done("")
    return GridResult(grids=grids, cells=done, complete=complete, model_loads=state.loads, params=cells, stopped=not complete)


def _write_grids(cfg: GridConfig, axes: tuple[AxisValues, ...], cells: dict[tuple[int, int, int], CellParams],
                 done: dict[tuple[int, int, int], Path], infotexts: dict[tuple[int, int, int], str], seed: int,
                 out_dir: Path, complete: bool) -> list[Path]:
    x, y, z = axes
    cw = max(p.width for p in cells.values())
    ch = max(p.height for p in cells.values())
    fields = {"Script": "X/Y/Z plot", "Fixed seed": str(seed)}
    for av in axes:
        if av.axis is not None:
            fields[f"{av.key.upper()} Type"] = av.axis.label
            fields[f"{av.key.upper()} Values"] = json.dumps(av.raw) if "," in av.raw or '"' in av.raw else av.raw
    meta = {"base": {k: v for k, v in cfg.to_dict().items() if not k.startswith(("x_", "y_", "z_"))},
            "seed": seed, "complete": complete,
            "axes": {av.key: {"type": av.axis.name, "raw": av.raw, "values": av.values} for av in axes if av.axis}}
    tail = "".join(f", {k}: {v}" for k, v in fields.items())

    def infotext(iz: int | None) -> str:
        """A1111: a grid's text is its first made cell's, with the X/Y/Z fields appended."""
        made = [k for k in sorted(infotexts, key=lambda k: (k[2], k[1], k[0])) if iz is None or k[2] == iz]
        return (infotexts[made[0]] if made else cfg.prompt) + tail

    images, paths = [], []
    for iz in range(len(z.values)):
        tiles = [Image.open(done[(ix, iy, iz)]).convert("RGB") if (ix, iy, iz) in done else None
                 for iy in range(len(y.values)) for ix in range(len(x.values))]
        title = z.labels[iz] if z.axis and cfg.draw_legend else ""
        img = draw_grid(tiles, len(x.values), len(y.values), x.labels if cfg.draw_legend else [],
                        y.labels if cfg.draw_legend else [], (cw, ch), cfg.margin, title)
        images.append(img)
        if z.axis:
            paths.append(_save_png(img, out_dir / f"xy_grid_z{iz:02d}.png", infotext(iz), meta))
    if z.axis:
        paths.append(_save_png(side_by_side(images, max(cfg.margin, cw // 16)), out_dir / "xyz_grid.png", infotext(None), meta))
    else:
        paths.append(_save_png(images[0], out_dir / "xy_grid.png", infotext(None), meta))
    return paths


def _save_png(img: Image.Image, path: Path, infotext: str, meta: dict[str, Any]) -> Path:
    info = PngInfo()
    info.add_text("parameters", infotext)
    info.add_text("loratrain.grid", json.dumps(meta, default=str))
    with atomic_path(path) as tmp:
        img.save(tmp, format="PNG", pnginfo=info)
    return path
