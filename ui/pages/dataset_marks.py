"""The Dataset page's "Text and marks" panel: a check report's text_marks / video_marks findings as thumbnails with
their boxes drawn and a table, and Crop / Inpaint for the chosen images.

The fixes run in the app itself through `run_fix_marks` (the function behind `loratrain dataset fix-marks`),
so they go through the dataset's journal and the page's Undo button restores the original bytes.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import gradio as gr
import numpy as np
import pandas as pd
from PIL import Image, ImageDraw

from loratrain.core.errors import ConfigError
from loratrain.core.progress import NullReporter, StopFlag
from loratrain.dataset_tools.quality.fix_marks import (
    MARK_CHECKS,
    FixMarksConfig,
    _from_report_root,
    boxes_from_report,
    run_fix_marks,
)

from ..config import AppContext
from ..forms import problems_markdown
from ..sections import validate

COLUMNS = ["image", "check", "kind", "boxes", "score"]
THUMB = 320


def boxed_thumbnail(path: Path, boxes: list[list[int]], side: int = THUMB) -> np.ndarray:
    """The image at most `side` px, with each box outlined in red (drawn on a copy; the file is not touched)."""
    with Image.open(path) as img:
        img = img.convert("RGB")
        scale = min(1.0, side / max(img.size))
        img = img.resize((max(1, round(img.width * scale)), max(1, round(img.height * scale))))
    draw = ImageDraw.Draw(img)
    for x, y, w, h in boxes:
        draw.rectangle([x * scale, y * scale, (x + w) * scale - 1, (y + h) * scale - 1], outline=(255, 0, 0), width=2)
    return np.asarray(img)


def marks_view(root: Path, report: dict) -> tuple[list[tuple[np.ndarray, str]], pd.DataFrame, list[str]]:
    """(gallery of boxed thumbnails, table, image choices) of a report's mark findings inside `root`."""
    rows, gallery, names = [], [], []
    for f in report.get("findings", []):
        if not isinstance(f, dict) or f.get("check") not in MARK_CHECKS:
            continue
        # a relative path is where `dataset check` ran, as fix-marks reads it (an absolute one stays itself)
        path = root / _from_report_root(str(f.get("path", "")), report.get("root"))
        try:
            rel = path.resolve().relative_to(root.resolve()).as_posix()
        except ValueError:
            continue  # not this folder's image: never shown, never fixed
        rows.append([rel, f["check"], f.get("kind", ""), str(f.get("boxes", [])), f.get("score")])
        if path.is_file() and len(gallery) < 200:
            gallery.append((boxed_thumbnail(path, f.get("boxes") or []), f"{rel} · {f.get('kind', '')}"))
        if rel not in names:
            names.append(rel)
    return gallery, pd.DataFrame(rows, columns=COLUMNS), names


class MarksPanel:
    def __init__(self, ctx: AppContext) -> None:
        self.ctx = ctx

    def render(self, folder: gr.Textbox) -> None:
        gr.Markdown("Run **Quality check** with a JSON output (`json_output`), then show its text and mark findings here. "
                    "Crop cuts the band or corner off; inpaint paints over the boxes. **Undo** above restores the files.")
        with gr.Row():
            self.report = gr.Textbox(label="check report (JSON)", elem_id="mk-report", scale=4)
            show = gr.Button("Show findings", elem_id="mk-show", scale=1)
        self.gallery = gr.Gallery(label="marks found (boxes in red)", elem_id="mk-gallery", columns=4, height=360,
                                  allow_preview=True)
        self.table = gr.Dataframe(headers=COLUMNS, interactive=False, elem_id="mk-table", max_height=240)
        with gr.Row():
            self.images = gr.Dropdown(label="images to fix (none: all)", choices=[], multiselect=True, elem_id="mk-images",
                                      scale=4)
            self.mode = gr.Radio(["crop", "inpaint"], value="inpaint", label="fix", elem_id="mk-mode", scale=1)
            fix = gr.Button("Fix the chosen images", variant="primary", elem_id="mk-fix", scale=1)
        self.result = gr.Markdown(elem_id="mk-result")
        show.click(self.show, [folder, self.report], [self.gallery, self.table, self.images, self.result], api_name="marks_show")
        fix.click(self.fix, [folder, self.report, self.images, self.mode], [self.result, self.gallery, self.table, self.images],
                  api_name="marks_fix")

    # ---- handlers (plain functions: tested without a browser) ------------------------------------
    def show(self, folder: str, report: str) -> list[Any]:
        import json

        try:
            root = self.ctx.workspace.resolve(folder, "dataset folder")
            path = self.ctx.workspace.resolve(report, "check report")
            boxes_from_report(root, str(path))  # refuses a report naming files outside the folder, or malformed boxes
            gallery, table, names = marks_view(root, json.loads(path.read_text(encoding="utf-8")))
        except (ConfigError, OSError, ValueError) as e:
            return [[], pd.DataFrame(columns=COLUMNS), gr.update(choices=[], value=[]), f"**{e}**"]
        return [gallery, table, gr.update(choices=names, value=[]), f"{len(table)} finding(s) on {len(names)} image(s)"]

    def fix(self, folder: str, report: str, images: list[str] | None, mode: str) -> list[Any]:
        data = {"dataset_dir": folder, "report": report, "mode": mode, "images": list(images or [])}
        cfg, problems = validate(self.ctx, FixMarksConfig, data, ready=True)
        if cfg is None or problems:
            return [problems_markdown(problems), gr.skip(), gr.skip(), gr.skip()]
        try:
            result = run_fix_marks(cfg, NullReporter(), StopFlag())
            message = "\n".join(result.summary())
        except (ConfigError, OSError) as e:
            return [f"**{e}**", gr.skip(), gr.skip(), gr.skip()]
        gallery, table, names, _ = self.show(folder, report)
        return [f"```\n{message}\n```", gallery, table, names]
