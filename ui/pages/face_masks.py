"""The face page's Masks tab: DeepFaceLab's XSeg editor in the browser, and the XSeg jobs on the same faceset.

Label by hand: click points on the enlarged face, close them as an include or exclude polygon (saved at
once, atomically, into the face's metadata in DFL's `seg_ie_polys` structure, so `face export-dfl` and
DFL's own editor read them), step through the faces, and see the resulting mask shaded over the face.
Then train a segmenter on the labelled faces, apply it to the faceset, remove its masks or undo.

The editor state (faceset, current face, points being drawn) lives in a per-session gr.State, but the
faceset is re-resolved inside the workspace and the face found again by name among the faceset's own
faces on every event: nothing a browser sends is used as a path.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import gradio as gr
import numpy as np

from loratrain.core.errors import ConfigError

from ..config import AppContext
from ..sections import JobSection

DISPLAY = 512  # a smaller face is enlarged to this many pixels on screen
INCLUDE_RGB, EXCLUDE_RGB, DRAWING_RGB = (40, 220, 40), (235, 45, 45), (255, 220, 0)
OUTSIDE_SHADE = 0.4  # brightness kept outside the mask
HELP = ("Click points on the face, then close them as an **include** polygon (part of the face) or an **exclude** "
        "polygon (hair, hands, glasses over it). Each polygon is saved into the face file at once, in "
        "DeepFaceLab's format. The face outside the mask is shaded. Label a few dozen varied faces, then train.")


# ---- pure helpers (tested without a browser) ------------------------------------------------------
def display_scale(size: int, display: int = DISPLAY) -> float:
    """How much a face of `size` pixels is enlarged on screen: a small face fills `display` pixels, so one click
    lands within a fraction of a face pixel; a face already that large is shown 1:1. (A browser that shows
    the image smaller does not matter: Gradio reports clicks in the shown image's own pixels.)"""
    return display / size if 0 < size < display else 1.0


def to_face(index: Any, scale: float, width: int, height: int) -> list[float] | None:
    """A click on the shown image (Gradio's `SelectData.index`: [x, y] in the shown image's pixels) as a point in
    the face's pixels, or None when it is not one. Shown pixel i covers face pixels [i/scale, (i+1)/scale):
    its centre maps to (i + 0.5) / scale - 0.5, so pixel centres line up at any scale (scale 1 maps i to i)."""
    if not isinstance(index, (list, tuple)) or len(index) != 2:
        return None
    try:
        x, y = (float(v) for v in index)
    except (TypeError, ValueError):
        return None
    if not (math.isfinite(x) and math.isfinite(y)) or scale <= 0:
        return None
    fx = min(max((x + 0.5) / scale - 0.5, 0.0), width - 1.0)
    fy = min(max((y + 0.5) / scale - 0.5, 0.0), height - 1.0)
    return [round(fx, 2), round(fy, 2)]


def to_display(pts: Any, scale: float) -> np.ndarray:
    """Face pixel positions on the shown image (the inverse of `to_face`), as int32 for OpenCV's drawing."""
    a = np.asarray(pts, np.float64).reshape(-1, 2)
    return np.round((a + 0.5) * scale - 0.5).astype(np.int32)


def draw_face(face_bgr: np.ndarray, polys: list, points: list[list[float]], mask: np.ndarray | None,
              scale: float, shade: bool = True) -> np.ndarray:
    """The face as the editor shows it (RGB uint8, enlarged by `scale`): outside `mask` shaded, include polygons
    green, exclude red (each numbered as the delete picker numbers it), the polygon being drawn yellow."""
    import cv2

    from loratrain.facetrain.xseg.polys import INCLUDE

    rgb = cv2.cvtColor(face_bgr, cv2.COLOR_BGR2RGB)
    h, w = rgb.shape[:2]
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    shown = rgb.copy() if scale == 1 else cv2.resize(rgb, size, interpolation=cv2.INTER_CUBIC if scale > 1 else cv2.INTER_AREA)
    if shade and mask is not None:
        m = cv2.resize(mask.astype(np.float32), size, interpolation=cv2.INTER_LINEAR)[..., None]
        shown = (shown.astype(np.float32) * (OUTSIDE_SHADE + (1 - OUTSIDE_SHADE) * np.clip(m, 0, 1)) + 0.5).astype(np.uint8)
    thick = max(1, round(min(size) / 256))
    for k, poly in enumerate(polys):
        colour = INCLUDE_RGB if poly.type == INCLUDE else EXCLUDE_RGB
        pts = to_display(poly.pts, scale)
        if len(pts):
            cv2.polylines(shown, [pts], True, colour, thick, cv2.LINE_AA)
            x, y = pts[0]
            cv2.putText(shown, str(k + 1), (int(x) + 4, int(y) - 4), cv2.FONT_HERSHEY_SIMPLEX, 0.4 * thick + 0.1, colour,
                        thick, cv2.LINE_AA)
    if points:
        pts = to_display(points, scale)
        cv2.polylines(shown, [pts], False, DRAWING_RGB, thick, cv2.LINE_AA)
        for x, y in pts:
            cv2.circle(shown, (int(x), int(y)), 2 + thick, DRAWING_RGB, -1, cv2.LINE_AA)
    return shown


def face_mask(meta: Any, polys: list, size: int) -> np.ndarray | None:
    """What the face's mask is now: its polygons' (DFL's rule), else a segmenter's or DFL's stored mask, else none."""
    from loratrain.facetrain.xseg.polys import polys_mask

    if any(len(p.pts) >= 3 for p in polys):
        return polys_mask(polys, size)
    return meta.xseg_mask(size)


def poly_choices(polys: list) -> list[tuple[str, int]]:
    from loratrain.facetrain.xseg.polys import INCLUDE

    return [(f"{k + 1}: {'include' if p.type == INCLUDE else 'exclude'}, {len(p.pts)} points", k) for k, p in enumerate(polys)]


def one_name(name: Any) -> str:
    """A face name from the session, checked as one plain path component (it is then looked up among the faceset's
    own faces, never joined to a path)."""
    text = str(name or "")
    if not text or text in (".", "..") or Path(text).name != text or "\\" in text or "\0" in text:
        raise ConfigError(f"face name {text[:80]!r} is not one file name")
    return text


class MasksTab:
    """The Masks tab's editor and its four job sections (which share the faceset folder box)."""

    def __init__(self, ctx: AppContext) -> None:
        self.ctx = ctx
        shared = ("faceset",)
        self.sections = {
            "XSeg train": JobSection(ctx, "face xseg train", "face-xseg-train", shared=shared, plots=True,
                                     images=lambda snap: list(snap.samples[-1:]),
                                     images_label="preview: face | predicted mask | label (unlabelled faces, then held-out ones)",
                                     title=lambda c: f"xseg train {Path(c.model).name}",
                                     start_label="Train (resumes the model there)"),
            "XSeg apply": JobSection(ctx, "face xseg apply", "face-xseg-apply", shared=shared,
                                     title=lambda c: f"xseg apply to {Path(c.faceset).name}", start_label="Apply masks"),
            "XSeg remove": JobSection(ctx, "face xseg remove", "face-xseg-remove", shared=shared,
                                      title=lambda c: f"xseg remove from {Path(c.faceset).name}", start_label="Remove masks"),
            "XSeg undo": JobSection(ctx, "face xseg undo", "face-xseg-undo", shared=shared,
                                    title=lambda c: f"xseg undo on {Path(c.faceset).name}", start_label="Undo last apply / remove"),
        }

    def render(self) -> None:
        gr.Markdown(HELP)
        with gr.Row():
            folder = gr.Textbox(label="faceset folder", elem_id="face-masks-folder", scale=4)
            open_btn = gr.Button("Open", elem_id="face-masks-open", scale=1)
        state = gr.State({})
        with gr.Tabs():
            with gr.Tab("Label", elem_id="face-masks-tab-label"):
                with gr.Row(equal_height=False):
                    with gr.Column(scale=3):
                        image = gr.Image(label="face (click to add a point)", elem_id="face-masks-image", interactive=False,
                                         format="png", type="numpy", show_label=True)
                    with gr.Column(scale=2):
                        status = gr.Markdown("open a faceset", elem_id="face-masks-status")
                        note = gr.Markdown(elem_id="face-masks-note")
                        with gr.Row():
                            include = gr.Button("Close as include", variant="primary", elem_id="face-masks-include")
                            exclude = gr.Button("Close as exclude", variant="stop", elem_id="face-masks-exclude")
                        undo = gr.Button("Undo point", elem_id="face-masks-undo-point")
                        with gr.Row():
                            picker = gr.Dropdown(choices=[], label="polygon", elem_id="face-masks-poly", scale=2)
                            delete = gr.Button("Delete polygon", elem_id="face-masks-delete", scale=1)
                        clear = gr.Button("Clear face", elem_id="face-masks-clear", variant="stop")
                        with gr.Row():
                            prev = gr.Button("Previous", elem_id="face-masks-prev")
                            nxt = gr.Button("Next", elem_id="face-masks-next")
                        unlabelled = gr.Button("Next unlabelled", elem_id="face-masks-next-unlabelled")
                        shade = gr.Checkbox(True, label="shade outside the mask", elem_id="face-masks-shade")
            for name, section in self.sections.items():
                with gr.Tab(name, elem_id=f"face-masks-tab-{section.prefix.rsplit('-', 1)[1]}"):
                    gr.Markdown(section.spec.help.capitalize() + ".")
                    section.render([folder])
        outs = [image, status, note, picker, state]
        # one queue for every editor event: a click and a button pressed right after it never race on the state
        one = {"concurrency_id": "face-masks", "concurrency_limit": 1}
        open_btn.click(self.open, [folder, shade], outs, api_name="face_masks_open", **one)
        image.select(self.click, [state, shade], outs, **one)
        for btn, fn, api in ((include, self.close_include, "include"), (exclude, self.close_exclude, "exclude"),
                             (undo, self.undo_point, "undo_point"), (clear, self.clear, "clear"),
                             (prev, self.prev, "prev"), (nxt, self.next, "next"),
                             (unlabelled, self.next_unlabelled, "next_unlabelled")):
            btn.click(fn, [state, shade], outs, api_name=f"face_masks_{api}", **one)
        delete.click(self.delete, [state, shade, picker], outs, api_name="face_masks_delete", **one)
        shade.change(self.show_only, [state, shade], outs, **one)

    # ---- handlers: plain functions of (state, shade, ...) returning the five outputs ------------------------
    def open(self, folder: str, shade: bool = True) -> list[Any]:
        try:
            path = self.ctx.workspace.resolve(folder, "faceset folder")  # type: ignore[attr-defined]
            faces = self._faces(str(path))
            if not faces:
                return self._fail(f"no faces in {path}")
            state = {"folder": str(path), "name": faces[0].name, "index": 0, "points": [],
                     "labelled": self._count_labelled(faces)}
            return self._show(state, faces, shade, f"opened {path.name}")
        except ImportError as e:
            return self._fail(f"the face tools need OpenCV: pip install 'loratrain[face]' ({e.name})")
        except (ConfigError, ValueError, OSError) as e:
            return self._fail(str(e))

    def click(self, state: dict, shade: bool, event: gr.SelectData) -> list[Any]:
        def add(s: dict, path: Path, img: np.ndarray, polys: list) -> str:
            from loratrain.facetrain.xseg.polys import MAX_POINTS

            h, w = img.shape[:2]
            point = to_face(event.index, display_scale(max(h, w)), w, h)
            if point is None:
                return "click on the face itself"
            if len(s["points"]) + sum(len(p.pts) for p in polys) >= MAX_POINTS:
                return f"a face holds at most {MAX_POINTS} polygon points"
            s["points"] = [*s["points"], point]
            return f"point {len(s['points'])} at ({point[0]:g}, {point[1]:g})"
        return self._act(state, shade, add)

    def close_include(self, state: dict, shade: bool = True) -> list[Any]:
        from loratrain.facetrain.xseg.polys import INCLUDE

        return self._close(state, shade, INCLUDE)

    def close_exclude(self, state: dict, shade: bool = True) -> list[Any]:
        from loratrain.facetrain.xseg.polys import EXCLUDE

        return self._close(state, shade, EXCLUDE)

    def undo_point(self, state: dict, shade: bool = True) -> list[Any]:
        def undo(s: dict, path: Path, img: np.ndarray, polys: list) -> str:
            if not s["points"]:
                return "no point to undo"
            s["points"] = s["points"][:-1]
            return f"{len(s['points'])} point(s) drawn"
        return self._act(state, shade, undo)

    def delete(self, state: dict, shade: bool, pick: Any) -> list[Any]:
        def remove(s: dict, path: Path, img: np.ndarray, polys: list) -> str:
            try:
                k = int(pick)
            except (TypeError, ValueError):
                return "pick the polygon to delete"
            if not 0 <= k < len(polys):
                return f"this face has no polygon {k + 1}"
            self._save(s, path, polys[:k] + polys[k + 1:])
            return f"deleted polygon {k + 1}"
        return self._act(state, shade, remove)

    def clear(self, state: dict, shade: bool = True) -> list[Any]:
        def wipe(s: dict, path: Path, img: np.ndarray, polys: list) -> str:
            s["points"] = []
            if not polys:
                return "this face has no polygons"
            self._save(s, path, [])
            return f"removed {len(polys)} polygon(s)"
        return self._act(state, shade, wipe)

    def prev(self, state: dict, shade: bool = True) -> list[Any]:
        return self._move(state, shade, -1)

    def next(self, state: dict, shade: bool = True) -> list[Any]:
        return self._move(state, shade, 1)

    def next_unlabelled(self, state: dict, shade: bool = True) -> list[Any]:
        """The next face without an include polygon, searching on from the current one and round to the start."""
        from loratrain.facetrain.faceset import FacesetError, read_meta
        from loratrain.facetrain.xseg.polys import is_labelled

        def find(s: dict, faces: list[Path], index: int) -> str:
            for step in range(1, len(faces) + 1):
                k = (index + step) % len(faces)
                try:
                    labelled = is_labelled(read_meta(faces[k]))
                except (FacesetError, OSError):
                    continue  # a face that cannot be read is not one to label
                if not labelled:
                    return self._goto(s, faces, k)
            return "every face of the set is labelled"
        return self._nav(state, shade, find)

    def show_only(self, state: dict, shade: bool = True) -> list[Any]:
        return self._act(state, shade, lambda s, path, img, polys: "")

    # ---- internals ---------------------------------------------------------------------------------------
    def _faces(self, folder: str) -> list[Path]:
        from loratrain.facetrain.faceset import list_faces

        return list_faces(self.ctx.workspace.resolve(folder, "faceset folder"))  # type: ignore[attr-defined]

    @staticmethod
    def _count_labelled(faces: list[Path]) -> int:
        from loratrain.facetrain.faceset import FacesetError, read_meta
        from loratrain.facetrain.xseg.polys import is_labelled

        n = 0
        for p in faces:
            try:
                n += is_labelled(read_meta(p))
            except (FacesetError, OSError):
                pass
        return n

    def _locate(self, state: dict) -> tuple[dict, list[Path], int]:
        """A copy of the state, the faceset's faces (listed again), and the current face's index: found by name (a
        face sorted or moved meanwhile is followed), else the same position."""
        if not isinstance(state, dict) or not state.get("folder"):
            raise ConfigError("open a faceset first")
        s = {"folder": str(state["folder"]), "name": one_name(state.get("name")), "index": int(state.get("index") or 0),
             "points": [list(p) for p in state.get("points") or []], "labelled": int(state.get("labelled") or 0)}
        faces = self._faces(s["folder"])
        if not faces:
            raise ConfigError(f"no faces left in {s['folder']}")
        names = [p.name for p in faces]
        if s["name"] in names:
            index = names.index(s["name"])
        else:
            index, s["points"] = min(max(s["index"], 0), len(faces) - 1), []
            s["name"] = names[index]
        s["index"] = index
        return s, faces, index

    def _act(self, state: dict, shade: bool, action: Any) -> list[Any]:
        """Run `action(state, face path, face image, polygons) -> note` on the current face, then show it."""
        try:
            from loratrain.facetrain.faceset import load_face
            from loratrain.facetrain.xseg.polys import face_polys

            s, faces, index = self._locate(state)
            path = faces[index]
            img, meta = load_face(path)
            note = action(s, path, img, face_polys(meta, str(path)))
            return self._show(s, faces, shade, note)
        except (ConfigError, ValueError, OSError) as e:
            return self._fail(str(e))

    def _nav(self, state: dict, shade: bool, action: Any) -> list[Any]:
        try:
            s, faces, index = self._locate(state)
            note = action(s, faces, index)
            return self._show(s, faces, shade, note)
        except (ConfigError, ValueError, OSError) as e:
            return self._fail(str(e))

    def _move(self, state: dict, shade: bool, step: int) -> list[Any]:
        def move(s: dict, faces: list[Path], index: int) -> str:
            k = index + step
            if not 0 <= k < len(faces):
                return "this is the last face" if step > 0 else "this is the first face"
            return self._goto(s, faces, k)
        return self._nav(state, shade, move)

    @staticmethod
    def _goto(s: dict, faces: list[Path], k: int) -> str:
        dropped = len(s["points"])
        s.update(index=k, name=faces[k].name, points=[])
        return f"{dropped} unclosed point(s) dropped" if dropped else ""

    def _close(self, state: dict, shade: bool, kind: int) -> list[Any]:
        def close(s: dict, path: Path, img: np.ndarray, polys: list) -> str:
            from loratrain.facetrain.xseg.polys import INCLUDE, Poly

            if len(s["points"]) < 3:
                return f"a polygon needs at least 3 points ({len(s['points'])} drawn)"
            self._save(s, path, [*polys, Poly(kind, s["points"])])
            s["points"] = []
            return f"saved {'include' if kind == INCLUDE else 'exclude'} polygon {len(polys) + 1}"
        return self._act(state, shade, close)

    @staticmethod
    def _save(s: dict, path: Path, polys: list) -> None:
        """Write the face's polygons (atomic; pixels untouched) and keep the set's labelled count up to date."""
        from loratrain.facetrain.faceset import read_meta
        from loratrain.facetrain.xseg.polys import is_labelled, set_face_polys

        before = is_labelled(read_meta(path))
        after = is_labelled(set_face_polys(path, polys))
        s["labelled"] = max(0, s["labelled"] + int(after) - int(before))

    @staticmethod
    def _show(s: dict, faces: list[Path], shade: bool, note: str) -> list[Any]:
        """The five outputs for the state's face (read again: what was just saved is what is shown)."""
        from loratrain.facetrain.faceset import load_face
        from loratrain.facetrain.xseg.polys import INCLUDE, face_polys

        path = faces[s["index"]]
        img, meta = load_face(path)
        polys = face_polys(meta, str(path))
        h, w = img.shape[:2]
        shown = draw_face(img, polys, s["points"], face_mask(meta, polys, max(h, w)), display_scale(max(h, w)), shade)
        n_inc = sum(p.type == INCLUDE for p in polys)
        drawing = f" · drawing: {len(s['points'])} point(s)" if s["points"] else ""
        mask_note = " · segmenter mask" if not polys and meta.extra.get("xseg_mask") else ""
        status = (f"face **{s['index'] + 1}** of {len(faces)} · `{path.name}` · polygons: {n_inc} include, "
                  f"{len(polys) - n_inc} exclude{mask_note}{drawing} · labelled: {s['labelled']} of {len(faces)} faces")
        picker = gr.update(choices=poly_choices(polys), value=None)
        return [shown, status, note, picker, s]

    @staticmethod
    def _fail(message: str) -> list[Any]:
        return [gr.skip(), gr.skip(), f"**{message}**", gr.skip(), gr.skip()]
