"""`loratrain grid`: one labelled image comparing checkpoints, LoRAs, weights and sampling settings.

Every value is parsed and checked before the first image; the seed is fixed once for the whole grid;
the costliest axis runs outermost, so each checkpoint loads once, and LoRAs are diffusers adapters on
the loaded model: a weight change is an adapter scale, a LoRA file is loaded once per checkpoint.
"""
from __future__ import annotations

import json
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image
from PIL.PngImagePlugin import PngInfo

from loratrain.core.jobs import JobResult, job
from loratrain.core.models.loading import SDModel, load_model
from loratrain.core.progress import Reporter, StopFlag
from loratrain.core.safe_io import atomic_path, atomic_write_json
from loratrain.core.sampling import SamplePrompt, generate
from loratrain.core.session import ModelSession

from .axes import CellParams
from .config import GridConfig
from .draw import draw_grid, side_by_side
from .drift import Drift, as_json, drift_summary, measure_drift, missing_references, reference_of
from .plan import AxisValues, loop_order, plan_grid

#: the colour-drift numbers beside the grid (only while they belong to the grid there)
DRIFT_REPORT = "color_drift.json"


@dataclass
class GridResult(JobResult):
    grids: list[Path]
    cells: dict[tuple[int, int, int], Path]
    complete: bool
    model_loads: int
    params: dict[tuple[int, int, int], CellParams] = field(default_factory=dict)
    drift: list[Drift] = field(default_factory=list)
    drift_line: str = ""

    def summary(self) -> list[str]:
        state = "grid" if self.complete else "partial grid (stopped)"
        line = f"{state}: {self.grids[-1]} ({len(self.cells)}/{len(self.params)} cells, {self.model_loads} model load(s))"
        return [self.drift_line, line] if self.drift_line else [line]


@job
def run_grid(cfg: GridConfig, reporter: Reporter, stop: StopFlag, loader: Callable[..., SDModel] = load_model) -> GridResult:
    """An XY(Z) grid: every value checked first, the costliest axis outermost, stop after the current cell.

    Result: the grid image(s) (a partial grid when stopped), each cell's PNG and parameters, model loads.
    Each finished cell reaches the reporter as a sample.
    """
    seed = cfg.seed if cfg.seed != -1 else random.randrange(0, 4294967294)
    axes, cells = plan_grid(cfg, seed)
    out_dir = Path(cfg.output_dir)
    state = _session(cfg, cells, loader)
    done: dict[tuple[int, int, int], Path] = {}
    infotexts: dict[tuple[int, int, int], str] = {}
    order = loop_order(axes)
    _read_loras_first(state, cells, order)
    (out_dir / "cells").mkdir(parents=True, exist_ok=True)
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
        made = _make(state, model, p, path, extra)
        done[idx] = path
        infotexts[idx] = made.parameters
        reporter.advance(1)
        reporter.sample([str(path)], [" | ".join(a.labels[i] for a, i in zip(axes, idx) if a.axis)])
    complete = len(done) == len(cells)
    grids = _write_grids(cfg, axes, cells, done, infotexts, seed, out_dir, complete)
    drift, drift_line = _color_drift(cfg, cells, done, state, out_dir, stop) if complete and cfg.color_drift != "off" else ([], "")
    stale = out_dir / DRIFT_REPORT
    if not drift and (stale.is_file() or stale.is_symlink()):  # an earlier grid's numbers must not sit beside this grid
        stale.unlink()
    reporter.done("")
    return GridResult(grids=grids, cells=done, complete=complete, model_loads=state.loads, params=cells, stopped=not complete,
                      drift=drift, drift_line=drift_line)


def _read_loras_first(state: Any, cells: dict[tuple[int, int, int], CellParams], order: list[tuple[int, int, int]]) -> None:
    """Every LoRA file the first checkpoint's cells use, read (and so checked) before the first cell is made: a bad
    file on a later value of a LoRA axis fails the grid before anything is written, not half way through it. The
    files are read once and kept by the session, so the cells do not read them again. (A later checkpoint's are read
    when it loads: reading them now would load every checkpoint twice.)"""
    if not order:
        return
    first = cells[order[0]].checkpoint
    state.ensure(first)
    seen: set[tuple[tuple[str, str], ...]] = set()
    for idx in order:
        p = cells[idx]
        key = tuple((u.path, u.blocks or "") for u in p.loras)
        if p.checkpoint == first and p.loras and key not in seen:
            seen.add(key)
            state.activate(p.loras, p.sampler)


def _color_drift(cfg: GridConfig, cells: dict[tuple[int, int, int], CellParams], done: dict[tuple[int, int, int], Path],
                 state: ModelSession, out_dir: Path, stop: StopFlag) -> tuple[list[Drift], str]:
    """Each LoRA cell against its weight-0 twin (made now with --color_drift on when the grid lacks it); the numbers go
    to color_drift.json beside the grid."""
    if not any(reference_of(p) for p in cells.values()):  # no LoRA at a weight other than 0: nothing to compare
        return [], ""
    extra: dict[tuple[int, int, int], tuple[CellParams, Path]] = {}
    if cfg.color_drift == "on":
        for k, p in enumerate(missing_references(cells)):
            if stop.is_set():
                return [], ""
            model = state.ensure(p.checkpoint)
            state.activate(p.loras, p.sampler)
            path = out_dir / "cells" / f"reference_{k:02d}.png"
            _make(state, model, p, path)
            extra[(-1, -1, k)] = (p, path)
    drift = measure_drift(cells, done, extra, cfg.drift_delta_e, cfg.drift_chroma)
    if drift:
        atomic_write_json(out_dir / DRIFT_REPORT, {"max_delta_e": cfg.drift_delta_e, "max_chroma_change": cfg.drift_chroma,
                                                         "cells": as_json(drift)})
    return drift, drift_summary(drift, cfg.drift_delta_e, cfg.drift_chroma)


def _session(cfg: GridConfig, cells: dict[tuple[int, int, int], CellParams], loader: Callable[..., SDModel]) -> Any:
    """FLUX.1 checkpoints get FLUX's session (its sampler, LoRA hooks); plan_grid has refused mixing families."""
    from loratrain.core.flux_sampling import FluxParts, FluxSession, is_flux_checkpoint

    if any(is_flux_checkpoint(m) for m in {p.checkpoint for p in cells.values()}):  # each file once, not per cell
        return FluxSession(FluxParts.of(cfg))
    from loratrain.core.sd3_sampling import SD3Parts, SD3Session, is_sd3_checkpoint

    if any(is_sd3_checkpoint(m) for m in {p.checkpoint for p in cells.values()}):
        return SD3Session(SD3Parts.of(cfg))
    return ModelSession(loader, cfg.allow_pickle)


def _make(state: Any, model: Any, p: CellParams, path: Path, extra: dict[str, str] | None = None) -> Any:
    """One cell's image with the session's sampler (FLUX.1: guidance and shift from the cell)."""
    prompt = SamplePrompt(p.prompt, p.negative_prompt, p.width, p.height, p.steps, p.cfg_scale, p.seed, p.sampler)
    if not isinstance(state, ModelSession):
        prompt.guidance = p.guidance
        return state.generate(prompt, path, shift=p.shift or None, extra_params=extra)
    return generate(model, prompt, path, p.sampler, p.clip_skip, extra_params=extra)


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
