"""The face page: extract aligned faces from images or a video, browse and sort a faceset (setting other
people aside in `_other/`), label XSeg masks and train / apply a segmenter (face_masks.py), train a DF / LIAE
model with its live preview and loss curves, export it, fine-tune an identity-injection swapper (inswapper-style
.onnx) with its source | target | result preview and loss / likeness curves, and swap either onto a video with a
one-frame interactive preview.

Face swapping is dual use: the page states the consent rule before anything else.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import gradio as gr
import numpy as np

from loratrain.core.errors import ConfigError

from ..config import AppContext
from ..forms import problems_markdown
from ..sections import JobSection, validate
from .face_masks import MasksTab
from .face_plan import PlanView
from .face_report import WorstFacesTab

CONSENT = ("**Use only faces of people who have given their consent.** Everything made with these tools from a real "
           "person's face needs that person's permission; swap outputs are labelled as synthetic.")
MAX_FACES = 400
SWAPPER_HELP = ("Fine-tune an identity-injection swapper (an inswapper-style .onnx, FaceFusion's family) on one "
                "person's faceset, or train ours from scratch with **base** empty. The result is an .onnx that FaceFusion "
                "and the Swap tab's **swapper** load unchanged. The swapper, the face recogniser (ArcFace-style, for the "
                "identity loss) and any LPIPS network are yours to bring, with their licences: nothing is downloaded. "
                "Train only on faces of people who consented. **Inspect** lists a file's blocks for **freeze_until**.")


def faceset_gallery(folder: Path) -> tuple[list[tuple[str, str]], str]:
    from loratrain.facetrain.faceset import list_faces

    faces = list_faces(folder)
    other = folder / "_other"
    n_other = len(list_faces(other)) if other.is_dir() else 0
    shown = f" (first {MAX_FACES} shown)" if len(faces) > MAX_FACES else ""
    return [(str(p), p.name) for p in faces[:MAX_FACES]], f"{len(faces)} face(s){shown}; {n_other} in _other/"


def side_by_side(original: np.ndarray, *others: np.ndarray) -> np.ndarray:
    """The frame and the swap's output (and its mask) in one image. raw-predict's output is the model's small
    aligned prediction: it is enlarged by a whole factor (pixels kept sharp); the shorter images are padded.
    A grey (H x W) image is shown as RGB."""
    h = original.shape[0]
    images = [original]
    for img in others:
        img = np.repeat(img[..., None], 3, 2) if img.ndim == 2 else img
        k = max(1, h // max(img.shape[0], 1))
        if k > 1:
            img = np.repeat(np.repeat(img, k, 0), k, 1)
        images.append(img)
    top = max(a.shape[0] for a in images)
    return np.hstack([np.pad(a, [(0, top - a.shape[0]), (0, 0), (0, 0)]) for a in images])


class Page:
    def __init__(self, ctx: AppContext) -> None:
        self.ctx = ctx
        self.sections = {
            "Extract": JobSection(ctx, "face extract", "face-extract", title=lambda c: f"extract faces from {Path(c.input).name}",
                                  start_label="Extract faces"),
            "Sort": JobSection(ctx, "face sort", "face-sort", shared=("faceset",), title=lambda c: f"sort by {c.by}",
                               start_label="Sort"),
            "Train": JobSection(ctx, "face train", "face-train", plots=True, open_groups=("options",),
                                images=lambda snap: list(snap.samples[-1:]),
                                images_label="preview: src | predicted src | dst | predicted dst | swap",
                                title=lambda c: f"face train {Path(c.model_dir).name}", start_label="Train (resumes a model there)"),
            "Grow": JobSection(ctx, "face grow", "face-grow", title=lambda c: f"grow {Path(c.model).name}", start_label="Grow"),
            "Export": JobSection(ctx, "face export", "face-export", title=lambda c: f"export {Path(c.output).name}",
                                 start_label="Export"),
            "Swapper": JobSection(ctx, "face swapper train", "face-swapper", plots=True, open_groups=("data",),
                                  images=lambda snap: list(snap.samples[-1:]),
                                  images_label="preview: source | target | result",
                                  title=lambda c: f"swapper {Path(c.model).name}",
                                  start_label="Train (resumes the model there)"),
            "Swap": JobSection(ctx, "face swap", "face-swap", title=lambda c: f"swap onto {Path(c.input).name}",
                               start_label="Swap (resumes a stopped swap)"),
        }
        self.masks = MasksTab(ctx)  # the XSeg editor and the four XSeg jobs
        self.sections.update(self.masks.sections)
        self.worst = WorstFacesTab(ctx)  # the faces a trained model fails on (face_report.py)
        self.plan_view = PlanView(ctx)  # the plan, its current phase and end rule, under the Train form
        self.panels = [s.panel for s in self.sections.values()]

    def render(self) -> None:
        gr.Markdown(CONSENT, elem_id="face-consent")
        with gr.Tabs():
            with gr.Tab("Extract", elem_id="face-tab-extract"):
                gr.Markdown("Detect, landmark and align faces from a folder of images or a video.")
                self.sections["Extract"].render()
            with gr.Tab("Faceset", elem_id="face-tab-faceset"):
                with gr.Row():
                    folder = gr.Textbox(label="faceset folder", elem_id="faceset-folder", scale=4)
                    open_btn = gr.Button("Open", elem_id="faceset-open", scale=1)
                status = gr.Markdown(elem_id="faceset-status")
                gallery = gr.Gallery(label="faces (click to select)", elem_id="faceset-gallery", columns=8, height=380,
                                     allow_preview=False)
                with gr.Row():
                    selected = gr.Textbox(label="selected faces (one per line)", lines=3, elem_id="faceset-selected", scale=4)
                    move = gr.Button("Move selected to _other/", elem_id="faceset-move", variant="stop", scale=1)
                gr.Markdown("Sort renames faces with a rank prefix; by identity, other people move to `_other/`.")
                self.sections["Sort"].render([folder])
                open_btn.click(self.open, [folder], [gallery, status], api_name="faceset_open")
                gallery.select(self.pick, [selected], [selected])
                move.click(self.move, [folder, selected], [gallery, status, selected], api_name="faceset_move")
            with gr.Tab("Masks", elem_id="face-tab-masks"):
                self.masks.render()
            with gr.Tab("Worst faces", elem_id="face-tab-worst"):
                self.worst.render()
            for name in ("Train", "Grow", "Export"):
                with gr.Tab(name, elem_id=f"face-tab-{name.lower()}"):
                    gr.Markdown(self.sections[name].spec.help.capitalize() + ".")
                    self.sections[name].render()
                    if name == "Train":
                        self.plan_view.render(self.sections[name].form.components)
            with gr.Tab("Swapper", elem_id="face-tab-swapper"):
                gr.Markdown(SWAPPER_HELP)
                section = self.sections["Swapper"]
                section.render()
                with gr.Row():
                    inspect = gr.Button("Inspect (base, else model)", elem_id="face-swapper-inspect", scale=1)
                    blocks = gr.Textbox(label="swapper file: inputs, crop, blocks (for freeze_until)", lines=4,
                                        interactive=False, elem_id="face-swapper-info", scale=4)
                fields = section.form.components
                inspect.click(self.inspect_swapper, [fields["base"], fields["model"]], [blocks],
                              api_name="face_swapper_inspect")
            with gr.Tab("Swap", elem_id="face-tab-swap"):
                gr.Markdown("Put the trained face onto a video, frames or an image. Every output is labelled "
                            "AI-generated. Preview one frame with the options below, then start the whole swap.")
                section = self.sections["Swap"]
                section.render()
                with gr.Row():
                    frame_no = gr.Slider(0, 10000, value=0, step=1, label="preview frame", elem_id="face-swap-frame", scale=4)
                    show_mask = gr.Checkbox(False, label="show mask", elem_id="face-swap-show-mask", scale=1,
                                            info="the merge mask of the chosen mask mode, in grey, beside the swap")
                    show = gr.Button("Preview frame", elem_id="face-swap-preview", scale=1)
                shown = gr.Image(label="frame | swapped (| mask)", elem_id="face-swap-preview-image", interactive=False)
                note = gr.Markdown(elem_id="face-swap-preview-note")
                show.click(self.show_preview, [frame_no, show_mask, *section.form.inputs()], [shown, note],
                           api_name="face_swap_preview")

    # ---- handlers ------------------------------------------------------------------------------
    def preview(self, frame_no: float, *values: Any) -> list[Any]:
        """The swap options applied to one frame, side by side with the original (DFL's interactive merger)."""
        return self.show_preview(frame_no, False, *values)

    def show_preview(self, frame_no: float, show_mask: bool, *values: Any) -> list[Any]:
        """The preview, with the merge mask of the chosen mask mode as a third, grey image when `show_mask`."""
        section = self.sections["Swap"]
        data = section.data(list(values))
        data["output"] = data.get("output") or "preview.png"
        cfg, problems = validate(self.ctx, section.cfg_cls, data, ready=True)
        if cfg is None or problems:
            return [None, problems_markdown(problems)]
        try:
            from loratrain.facetrain.swap.preview import preview

            got = preview(cfg, int(frame_no))  # type: ignore[arg-type]
        except (ConfigError, ValueError, OSError) as e:
            return [None, f"**{e}**"]
        images = (got.original, got.output, got.mask) if show_mask else (got.original, got.output)
        note = f"frame {int(frame_no)}: {got.faces} face(s) swapped"
        if got.occluded:
            note += "; XSeg: " + ", ".join(f"{share:.0%}" for share in got.occluded) + " of the face covered"
        return [side_by_side(*images), note]

    def inspect_swapper(self, base: str, model: str) -> str:
        """`face swapper info` on the Swapper form's base (or, without one, the model being trained): the block
        names freeze_until takes. Plain text (a Textbox), so nothing read from the file can add markup."""
        name, value = ("base", base) if (base or "").strip() else ("model", model)
        if not (value or "").strip():
            return "set base (a swapper .onnx) or model (one trained before) to inspect it"
        try:
            from loratrain.facetrain.swapper.config import SwapperInfoConfig
            from loratrain.facetrain.swapper.info import run_swapper_info

            path = self.ctx.workspace.resolve(value, name)  # type: ignore[attr-defined]
            if not path.is_file():
                return f"{name}: {value}: no such file"
            return "\n".join(run_swapper_info(SwapperInfoConfig(model=str(path))).summary())
        except (ConfigError, OSError, ValueError) as e:
            return str(e)
        except ImportError as e:
            return f"inspecting a swapper needs onnx and torch: pip install 'loratrain[face]' ({e.name})"

    def open(self, folder: str) -> list[Any]:
        try:
            path = self.ctx.workspace.resolve(folder, "faceset folder")  # type: ignore[attr-defined]
            images, text = faceset_gallery(path)
        except (ConfigError, OSError) as e:
            return [[], f"**{e}**"]
        except ImportError as e:
            return [[], f"**the face tools need OpenCV: pip install 'loratrain[face]' ({e.name})**"]
        return [images, text]

    def pick(self, selected: str, event: gr.SelectData) -> str:
        name = Path(str((event.value or {}).get("caption") or "")).name if isinstance(event.value, dict) else ""
        names = [n for n in (selected or "").splitlines() if n.strip()]
        if name and name not in names:
            names.append(name)
        return "\n".join(names)

    def move(self, folder: str, selected: str) -> list[Any]:
        names = [n.strip() for n in (selected or "").splitlines() if n.strip()]
        if not names:
            return [gr.skip(), "select faces first (click them in the gallery)", gr.skip()]
        try:
            from loratrain.facetrain.faceset import FacesetError, move_to_other

            path = self.ctx.workspace.resolve(folder, "faceset folder")  # type: ignore[attr-defined]
            try:
                moved = move_to_other(path, names)
            except FacesetError as e:
                return [gr.skip(), f"**{e}**", gr.skip()]
            images, text = faceset_gallery(path)
        except (ConfigError, OSError) as e:
            return [gr.skip(), f"**{e}**", gr.skip()]
        return [images, f"moved {len(moved)} face(s) to _other/. {text}", ""]
