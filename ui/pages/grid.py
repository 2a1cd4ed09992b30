"""The XY(Z) grid page: axis types and values for X, Y and Z, every value checked before the first image,
the cells appearing as they finish, then the grid itself."""
from __future__ import annotations

import csv
import io
from typing import Any

import gradio as gr

from loratrain.core.config import JobConfig
from loratrain.core.errors import ConfigError, Problem
from loratrain.grid.axes import AXES

from ..config import AppContext
from ..events import Snapshot
from ..sections import JobSection

AXIS_FIELDS = ("x_type", "x_values", "y_type", "y_values", "z_type", "z_values")
PATH_AXES = ("checkpoint", "lora")


def grid_images(snap: Snapshot) -> list[tuple[str, str]]:
    """The finished grid(s) first, then the cells newest first (a gallery fills in while the grid runs)."""
    grids = [(p, "grid") for p in snap.outputs if p.lower().endswith((".png", ".jpg", ".webp"))]
    return grids + list(reversed(snap.samples[-200:]))


class GridSection(JobSection):
    """The grid's form, plus a workspace check of the files a checkpoint or LoRA axis names."""

    def validate(self, values: list[Any], ready: bool) -> tuple[JobConfig | None, list[Problem]]:
        data = self.data(values)
        problems: list[Problem] = []
        for key in "xyz":
            kind, raw = data.get(f"{key}_type") or "", data.get(f"{key}_values") or ""
            if kind not in PATH_AXES or not raw.strip():
                continue
            # split as the axis parser does (its own checks, such as "the file exists", come later, on the resolved paths)
            items = [v.strip() for row in csv.reader(io.StringIO(raw), skipinitialspace=True) for v in row if v.strip()]
            resolved = []
            for item in items:
                try:
                    resolved.append(str(self.ctx.workspace.resolve(item, f"{key}_values")))  # type: ignore[attr-defined]
                except ConfigError as e:
                    problems.append((f"{key}_values", str(e).split(": ", 1)[1]))
            out = io.StringIO()
            csv.writer(out).writerow(resolved)
            data[f"{key}_values"] = out.getvalue().strip()
        if problems:
            return None, problems
        from ..sections import validate

        return validate(self.ctx, self.cfg_cls, data, ready)


class Page:
    def __init__(self, ctx: AppContext) -> None:
        self.ctx = ctx
        demo = None
        if ctx.demo_config:
            demo = {"model": ctx.demo_config["pretrained_model_name_or_path"], "prompt": "a photo of a red circle",
                    "width": 64, "height": 64, "steps": 4, "sampler": "euler", "seed": 1, "output_dir": "demo/grid"}
        self.section = GridSection(ctx, "grid", "grid", shared=AXIS_FIELDS, open_groups=("Model", "Prompt", "Sampling"),
                                   defaults=demo, images=grid_images, images_label="grid and cells",
                                   title=lambda c: f"grid {c.x_type} × {c.y_type}", start_label="Make the grid")
        self.panel = self.section.panel

    def render(self) -> None:
        axes = AXES.names()
        gr.Markdown("Values: `a, b, c`; numeric axes also take ranges `1-5`, `1-5 (+2)`, `0-1 [5]`. Checkpoint and LoRA "
                    "axes take files inside the workspace. Every value is checked before the first image.")
        shared = []
        for key, default_type, default_values in (("x", "cfg_scale", "4, 7"), ("y", "seed", "1, 2"), ("z", "", "")):
            with gr.Row():
                kind = gr.Dropdown(["", *axes], value=default_type, label=f"{key.upper()} axis", elem_id=f"grid-{key}-type",
                                   scale=1)
                values = gr.Textbox(label=f"{key.upper()} values", value=default_values, elem_id=f"grid-{key}-values", scale=3)
            shared += [kind, values]
        self.section.render(shared)
