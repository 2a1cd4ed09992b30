"""The dataset page: a folder's images with captions, tag frequencies and filters, batch and per-image edits
with undo, and the tagger, quality check, repeat-folder and video-frame jobs on the same folder.

Caption edits are quick and run in the app itself through `run_tags` (the function behind
`loratrain tags`), so every edit is journalled and `Undo` restores the files byte for byte; the
tagger and the other long tools run as jobs.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gradio as gr
import pandas as pd

from loratrain.core.errors import ConfigError
from loratrain.core.progress import NullReporter, StopFlag
from loratrain.dataset_tools.editor.caption_set import CaptionSet
from loratrain.dataset_tools.editor.config import TagsConfig
from loratrain.dataset_tools.editor.ops import EDIT_OPS
from loratrain.dataset_tools.editor.run import run_tags

from ..config import AppContext
from ..events import Snapshot
from ..forms import problems_markdown
from ..sections import JobSection, validate
from .dataset_marks import MarksPanel

MAX_SHOWN = 400  # images in the gallery at once (the filters narrow it down)
FREQ_COLUMNS = ["tag", "images", "share"]
HISTORY_COLUMNS = ["id", "time", "op", "files", "description"]


def split_list(text: str) -> list[str]:
    return [t.strip() for t in (text or "").split(",") if t.strip()]


@dataclass
class DatasetView:
    gallery: list[tuple[str, str]]
    freq: pd.DataFrame
    images: list[str]  # image paths relative to the folder, for the per-image editor
    status: str
    history: pd.DataFrame


def dataset_view(folder: Path, extension: str, recursive: bool, all_of: str, any_of: str, none_of: str) -> DatasetView:
    """What the page shows of a folder under the current filters."""
    from loratrain.dataset_tools.journal import Journal

    captions = CaptionSet.load(folder, extension, recursive)
    chosen = captions.select(split_list(all_of), split_list(any_of), split_list(none_of))
    freq = CaptionSet.frequency(chosen).most_common()
    n = max(1, len(chosen))
    table = pd.DataFrame([[t, c, f"{c / n:.0%}"] for t, c in freq], columns=FREQ_COLUMNS)
    gallery = [(str(e.image), captions.text(e) or "(no caption)") for e in chosen[:MAX_SHOWN]]
    images = [str(e.image.relative_to(folder)) for e in chosen]
    shown = f" (first {MAX_SHOWN} shown)" if len(chosen) > MAX_SHOWN else ""
    status = f"{len(chosen)} of {len(captions.entries)} image(s) selected{shown}; {len(freq)} distinct tags"
    history = pd.DataFrame([[h.get(c, "") for c in HISTORY_COLUMNS] for h in reversed(Journal(folder).history())],
                           columns=HISTORY_COLUMNS)
    return DatasetView(gallery, table, images, status, history)


def findings_images(snap: Snapshot) -> list[tuple[str, str]]:
    """Thumbnails of what the quality check flagged, captioned with the check and its message."""
    out = []
    for f in snap.data.get("findings", [])[:200]:
        if Path(f.get("path", "")).suffix.lower() in (".png", ".jpg", ".jpeg", ".webp", ".bmp") and Path(f["path"]).is_file():
            out.append((f["path"], f"{f['severity']} · {f['check']}: {f['message']}"))
    return out


def shot_images(snap: Snapshot, limit: int = 100) -> list[tuple[str, str]]:
    """Thumbnails of the images a face was found in, captioned with their shot class and view (the quality check's
    shot_balance section); the shot mix per concept is in the job's log, under the findings."""
    section = (snap.data.get("sections") or {}).get("shot_balance") or {}
    out = []
    for path, v in (section.get("images") or {}).items():
        if v.get("shot") not in (None, "no face") and Path(path).is_file():
            out.append((path, f"{v['shot']} · {v.get('view') or 'view unknown'} · face {v.get('face_height', 0):.0%} of the height"))
            if len(out) >= limit:
                break
    return out


class Page:
    def __init__(self, ctx: AppContext) -> None:
        self.ctx = ctx
        shared = ("dataset_dir",)
        self.sections = {
            "Tag (WD14)": JobSection(ctx, "tag", "tagger", shared=shared, title=lambda c: f"tag {Path(c.dataset_dir).name}",
                                     start_label="Tag images"),
            "Quality check": JobSection(ctx, "dataset check", "check", shared=shared,
                                        images=lambda snap: findings_images(snap) + shot_images(snap),
                                        images_label="flagged images, then shot classes", title=lambda c: f"check {Path(c.dataset_dir).name}",
                                        start_label="Check the dataset"),
            "Repeat folders": JobSection(ctx, "dataset prepare", "prepare", title=lambda c: f"prepare {Path(c.output_dir).name}",
                                         start_label="Prepare"),
            "Frames from a video": JobSection(ctx, "dataset frames", "frames", title=lambda c: f"frames of {Path(c.video).name}",
                                              start_label="Extract frames"),
        }
        self.panels = [s.panel for s in self.sections.values()]
        self.marks = MarksPanel(ctx)

    def render(self) -> None:
        gr.Markdown("Open a folder of images with `.txt` captions (the first line holds the tags). Edits are journalled: "
                    "**Undo** restores the caption files byte for byte.")
        with gr.Row():
            self.folder = gr.Textbox(label="dataset folder", elem_id="ds-folder", scale=4,
                                     value="demo/dataset" if self.ctx.demo_config else "")
            self.extension = gr.Textbox(label="caption extension", value=".txt", elem_id="ds-ext", scale=1)
            self.recursive = gr.Checkbox(label="subfolders", value=True, elem_id="ds-recursive", scale=1)
            open_btn = gr.Button("Open", variant="primary", elem_id="ds-open", scale=1)
        with gr.Row():
            self.all_of = gr.Textbox(label="has all of", elem_id="ds-all-of", placeholder="tag, tag")
            self.any_of = gr.Textbox(label="has any of", elem_id="ds-any-of")
            self.none_of = gr.Textbox(label="has none of", elem_id="ds-none-of")
            filter_btn = gr.Button("Filter", elem_id="ds-filter", scale=0)
        self.status = gr.Markdown(elem_id="ds-status")
        with gr.Row():
            with gr.Column(scale=3):
                self.gallery = gr.Gallery(label="images", elem_id="ds-gallery", columns=5, height=420, object_fit="contain",
                                          allow_preview=False)
            with gr.Column(scale=2):
                self.freq = gr.Dataframe(headers=FREQ_COLUMNS, label="tag frequency", interactive=False, elem_id="ds-freq",
                                         max_height=420)
        with gr.Accordion("Edit one caption", open=True):
            with gr.Row():
                self.image = gr.Dropdown(label="image", choices=[], elem_id="ds-image", scale=2)
                self.caption = gr.Textbox(label="caption (tags, comma separated)", elem_id="ds-caption", scale=5, lines=2)
                save = gr.Button("Save caption", elem_id="ds-save", scale=1)
        with gr.Accordion("Batch edit the selected images", open=False, elem_id="ds-batch"):
            with gr.Row():
                self.op = gr.Dropdown(EDIT_OPS.names(), value="add", label="edit", elem_id="ds-op")
                self.tags = gr.Textbox(label="tags (add / remove / move to front)", elem_id="ds-tags")
                self.front = gr.Checkbox(label="add at the front", elem_id="ds-front")
            with gr.Row():
                self.find = gr.Textbox(label="find (replace)", elem_id="ds-find")
                self.replace_with = gr.Textbox(label="replace with", elem_id="ds-replace-with")
                self.regex = gr.Checkbox(label="regular expression", elem_id="ds-regex")
                self.scope = gr.Radio(["tag", "caption"], value="tag", label="replace in", elem_id="ds-scope")
            with gr.Row():
                self.sort_by = gr.Dropdown(["alphabetical", "frequency", "length", "tokens"], value="alphabetical",
                                           label="sort by", elem_id="ds-sort-by")
                self.keep_first = gr.Number(0, precision=0, minimum=0, label="keep the first N tags", elem_id="ds-keep-first")
                self.max_tokens = gr.Number(75, precision=0, minimum=1, label="truncate to CLIP tokens", elem_id="ds-max-tokens")
            with gr.Row():
                preview = gr.Button("Preview", elem_id="ds-preview")
                apply = gr.Button("Apply", variant="primary", elem_id="ds-apply")
        with gr.Row():
            undo = gr.Button("Undo the last edit", elem_id="ds-undo")
        self.result = gr.Markdown(elem_id="ds-result")
        self.history = gr.Dataframe(headers=HISTORY_COLUMNS, label="edits that can be undone (newest first)",
                                    interactive=False, elem_id="ds-history", max_height=200)
        with gr.Tabs():
            for name, section in self.sections.items():
                with gr.Tab(name, elem_id=f"ds-tab-{section.prefix}"):
                    gr.Markdown(section.spec.help.capitalize() + ".")
                    section.render([self.folder] if section.shared else [])
        with gr.Accordion("Text and marks: crop or inpaint", open=False, elem_id="ds-marks"):
            self.marks.render(self.folder)

        where = [self.folder, self.extension, self.recursive, self.all_of, self.any_of, self.none_of]
        shown = [self.gallery, self.freq, self.image, self.status, self.history]
        open_btn.click(self.open, where, shown, api_name="dataset_open")
        filter_btn.click(self.open, where, shown)
        self.gallery.select(self.picked, [self.folder, self.extension, self.recursive, self.all_of, self.any_of, self.none_of],
                            [self.image, self.caption])
        self.image.change(self.caption_of, [self.folder, self.extension, self.recursive, self.image], [self.caption])
        save.click(self.save_caption, [*where, self.image, self.caption], [self.result, *shown], api_name="dataset_set")
        edit = [self.op, self.tags, self.front, self.find, self.replace_with, self.regex, self.scope, self.sort_by,
                self.keep_first, self.max_tokens]
        preview.click(lambda *v: self.edit(*v, dry_run=True), [*where, *edit], [self.result, *shown], api_name="dataset_preview")
        apply.click(self.edit, [*where, *edit], [self.result, *shown], api_name="dataset_edit")
        undo.click(self.undo, where, [self.result, *shown], api_name="dataset_undo")

    # ---- handlers (plain functions: tested without a browser) ------------------------------------
    def _tags(self, data: dict[str, Any]) -> tuple[TagsConfig | None, str]:
        cfg, problems = validate(self.ctx, TagsConfig, data, ready=True)
        return (cfg, "") if cfg is not None and not problems else (None, problems_markdown(problems))

    def _show(self, folder: str, ext: str, recursive: bool, all_of: str, any_of: str, none_of: str) -> list[Any]:
        try:
            path = self.ctx.workspace.resolve(folder, "dataset folder")
            if not path.is_dir():
                raise ConfigError(f"dataset folder: {folder!r} is not a folder")
            v = dataset_view(path, ext, recursive, all_of, any_of, none_of)
        except ConfigError as e:
            return [[], pd.DataFrame(columns=FREQ_COLUMNS), gr.update(choices=[], value=None), problems_markdown(e.problems),
                    pd.DataFrame(columns=HISTORY_COLUMNS)]
        return [v.gallery, v.freq, gr.update(choices=v.images), v.status, v.history]

    def open(self, folder: str, ext: str, recursive: bool, all_of: str, any_of: str, none_of: str) -> list[Any]:
        return self._show(folder, ext, recursive, all_of, any_of, none_of)

    def _run(self, where: tuple[Any, ...], data: dict[str, Any]) -> list[Any]:
        folder, ext, recursive, all_of, any_of, none_of = where
        cfg, message = self._tags({"dataset_dir": folder, "caption_extension": ext, "recursive": recursive, **data})
        if cfg is None:
            return [message, *[gr.skip()] * 5]
        try:
            result = run_tags(cfg, NullReporter(), StopFlag())
            message = "\n".join(result.summary())
        except (ConfigError, OSError) as e:
            message = f"**{e}**"
        return [f"```\n{message}\n```", *self._show(*where)]

    def edit(self, folder: str, ext: str, recursive: bool, all_of: str, any_of: str, none_of: str, op: str, tags: str,
             front: bool, find: str, replace_with: str, regex: bool, scope: str, sort_by: str, keep_first: float,
             max_tokens: float, dry_run: bool = False) -> list[Any]:
        data = {"op": op, "all_of": split_list(all_of), "any_of": split_list(any_of), "none_of": split_list(none_of),
                "tags": split_list(tags), "front": front, "find": find or "", "replace_with": replace_with or "", "regex": regex,
                "scope": scope, "sort_by": sort_by, "keep_first": int(keep_first or 0), "max_tokens": int(max_tokens or 75),
                "dry_run": dry_run}
        return self._run((folder, ext, recursive, all_of, any_of, none_of), data)

    def save_caption(self, folder: str, ext: str, recursive: bool, all_of: str, any_of: str, none_of: str, image: str,
                     caption: str) -> list[Any]:
        if not image:
            return ["choose an image first", *[gr.skip()] * 5]
        target = str(Path(folder) / image)
        return self._run((folder, ext, recursive, all_of, any_of, none_of), {"op": "set", "image": target, "caption": caption})

    def undo(self, folder: str, ext: str, recursive: bool, all_of: str, any_of: str, none_of: str) -> list[Any]:
        return self._run((folder, ext, recursive, all_of, any_of, none_of), {"op": "undo"})

    def caption_of(self, folder: str, ext: str, recursive: bool, image: str | None) -> Any:
        if not image:
            return gr.skip()
        try:
            root = self.ctx.workspace.resolve(folder, "dataset folder")
            captions = CaptionSet.load(root, ext, recursive)
            return captions.text(captions.entry(self.ctx.workspace.resolve(str(root / image), "image")))
        except ConfigError as e:
            return f"({e})"

    def picked(self, folder: str, ext: str, recursive: bool, all_of: str, any_of: str, none_of: str,
               event: gr.SelectData) -> list[Any]:
        try:
            root = self.ctx.workspace.resolve(folder, "dataset folder")
            v = dataset_view(root, ext, recursive, all_of, any_of, none_of)
        except ConfigError:
            return [gr.skip(), gr.skip()]
        index = event.index if isinstance(event.index, int) else event.index[0]
        if not 0 <= index < len(v.images):
            return [gr.skip(), gr.skip()]
        return [v.images[index], self.caption_of(folder, ext, recursive, v.images[index])]
