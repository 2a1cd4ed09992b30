"""The face page's "Worst faces" tab: the faces a trained model fails on, as thumbnails with their loss, worst first,
and a button that sets chosen ones aside in the faceset's `_other/` (docs/face-model.md#per-face-diagnosis-and-hard-samples).

It reads the per-face table `face train` keeps beside the model (`<model_name>.faces.json`, through
facetrain/face_report.py, which checks every name in it). Nothing a browser sends is used as a path: the model
folder is resolved inside the workspace, the faceset folder named in the table is resolved inside the workspace
too, and a face is found again by name among that faceset's own faces (move_to_other refuses any other name).
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import gradio as gr

from loratrain.core.errors import ConfigError

from ..config import AppContext

HELP = ("The faces the model fails on, worst first, from the per-face table training keeps beside the model "
        "(`<model_name>.faces.json`). A src face far above the rest (the recipes use **loss > 0.5**) usually has a bad "
        "mask or crop: look at it, and move bad ones aside to `_other/` (nothing is deleted). `loratrain face report` "
        "prints the same ranking.")
SEP = " · "  # between a face's name and its figures in a caption


def _count(value: Any) -> int:
    """The slider's 'faces shown' as sent by a browser (any JSON value): a whole number in 1..400, else 48."""
    try:
        n = float(value)
    except (TypeError, ValueError, OverflowError):
        return 48
    return max(1, min(400, int(n))) if math.isfinite(n) else 48


class WorstFacesTab:
    """The worst-faces view and its move-aside button (handlers are plain methods, tested without a browser)."""

    def __init__(self, ctx: AppContext) -> None:
        self.ctx = ctx

    def render(self) -> None:
        from loratrain.facetrain.face_report import SORT_KEYS

        gr.Markdown(HELP)
        with gr.Row():
            model = gr.Textbox(label="model folder", elem_id="face-worst-model", scale=4)
            name = gr.Textbox("face", label="model name", elem_id="face-worst-name", scale=1)
            side = gr.Radio(["src", "dst"], value="src", label="faceset", elem_id="face-worst-side", scale=1)
        with gr.Row():
            threshold = gr.Number(0.5, label="flag above loss", elem_id="face-worst-threshold", minimum=0)
            sort_by = gr.Dropdown(list(SORT_KEYS), value="loss", label="rank by", elem_id="face-worst-sort")
            count = gr.Slider(8, 400, value=48, step=8, label="faces shown", elem_id="face-worst-count")
            show = gr.Button("Show worst faces", elem_id="face-worst-show", variant="primary")
        status = gr.Markdown(elem_id="face-worst-status")
        gallery = gr.Gallery(label="worst first (click to select)", elem_id="face-worst-gallery", columns=8, height=420,
                             allow_preview=False)
        with gr.Row():
            selected = gr.Textbox(label="selected faces (one per line)", lines=3, elem_id="face-worst-selected", scale=4)
            with gr.Column(scale=1):
                flagged = gr.Button("Select the flagged ones", elem_id="face-worst-flagged")
                move = gr.Button("Move selected to _other/", elem_id="face-worst-move", variant="stop")
        inputs = [model, name, side, threshold, sort_by, count]
        show.click(self.show, inputs, [gallery, status, selected], api_name="face_worst_show")
        gallery.select(self.pick, [selected], [selected])
        flagged.click(self.flagged, inputs, [selected], api_name="face_worst_flagged")
        move.click(self.move, [*inputs, selected], [gallery, status, selected], api_name="face_worst_move")

    # ---- handlers ------------------------------------------------------------------------------
    def _ranked(self, model: str, name: str, side: str, threshold: Any, sort_by: str) -> tuple[Any, Path, list]:
        """(table, faceset folder, ranked rows): everything re-read and re-checked on every event."""
        from loratrain.core.paths import check_name
        from loratrain.facetrain.face_report import rank_faces, read_stats, stats_path

        if side not in ("src", "dst"):
            raise ConfigError(f"side {side!r}: src or dst")
        folder = self.ctx.workspace.resolve(model, "model folder")  # type: ignore[attr-defined]
        stats = read_stats(stats_path(folder, check_name(str(name or "face"), "model name")))
        faceset = stats.sides.get(side)
        if faceset is None or not faceset.faceset:
            raise ConfigError(f"the table has no {side} faces yet (train a few iterations first)")
        where = self.ctx.workspace.resolve(faceset.faceset, f"{side} faceset named in the table")  # type: ignore[attr-defined]
        try:
            limit = float(threshold) if threshold is not None else 0.5
        except (TypeError, ValueError, OverflowError):
            limit = 0.5
        if not math.isfinite(limit):
            limit = 0.5
        return stats, where, rank_faces(stats, side, limit, sort_by if isinstance(sort_by, str) else "loss")

    def show(self, model: str, name: str, side: str, threshold: Any, sort_by: str, count: Any) -> list[Any]:
        try:
            stats, folder, rows = self._ranked(model, name, side, threshold, sort_by)
            from loratrain.facetrain.faceset import list_faces

            faces = {p.name: p for p in list_faces(folder)}
        except (ValueError, OSError, OverflowError) as e:  # ValueError includes ConfigError: one line, no traceback
            return [[], f"**{e}**", gr.skip()]
        n = _count(count)
        present = [r for r in rows if r.face in faces]
        shown = [(str(faces[r.face]), f"{r.face}{SEP}loss {r.loss:.3f}{SEP}mask {r.mask_diff:.3f}{' !!' if r.flagged else ''}")
                 for r in present[:n]]
        gone = len(rows) - len(present)
        flagged = sum(r.flagged for r in present)
        text = (f"{len(present)} {side} face(s) ranked at iteration {stats.iteration}, {flagged} above the threshold "
                f"(marked !!); showing {len(shown)}. Faceset: `{folder}`" + (f"; {gone} no longer in it" if gone else ""))
        return [shown, text, ""]

    def pick(self, selected: str, event: gr.SelectData) -> str:
        caption = str((event.value or {}).get("caption") or "") if isinstance(event.value, dict) else ""
        name = Path(caption.split(SEP)[0]).name
        names = [n for n in (selected or "").splitlines() if n.strip()]
        if name and name not in names:
            names.append(name)
        return "\n".join(names)

    def flagged(self, model: str, name: str, side: str, threshold: Any, sort_by: str, count: Any) -> str:
        try:
            _, _, rows = self._ranked(model, name, side, threshold, sort_by)
        except (ValueError, OSError, OverflowError):
            return gr.skip()
        return "\n".join(r.face for r in rows if r.flagged)

    def move(self, model: str, name: str, side: str, threshold: Any, sort_by: str, count: Any, selected: str) -> list[Any]:
        names = [n.strip() for n in (selected or "").splitlines() if n.strip()]
        if not names:
            return [gr.skip(), "select faces first (click them, or select the flagged ones)", gr.skip()]
        try:
            from loratrain.facetrain.faceset import FacesetError, move_to_other

            _, folder, _ = self._ranked(model, name, side, threshold, sort_by)
            moved = move_to_other(folder, names)
        except FacesetError as e:
            return [gr.skip(), f"**{e}**", gr.skip()]
        except (ValueError, OSError, OverflowError) as e:
            return [gr.skip(), f"**{e}**", gr.skip()]
        gallery, text, _ = self.show(model, name, side, threshold, sort_by, count)
        return [gallery, f"moved {len(moved)} face(s) to `_other/` (nothing deleted). {text}", ""]
