"""The merge page: checkpoints A/B(/C) with a method, a plain weight or 25 block sliders, presets that move the
sliders, precision and VAE; and the LoRA bake / merge / extract and convert forms."""
from __future__ import annotations

from typing import Any

import gradio as gr

from loratrain.core.lora.blocks import block_names
from loratrain.core.models.families import FAMILIES
from loratrain.merge.config import PRECISIONS, MergeConfig
from loratrain.merge.methods import MERGE_METHODS
from loratrain.merge.presets import merge_preset, merge_presets

from ..config import AppContext
from ..forms import problems_markdown
from ..sections import JobSection, submit, validate
from ..widgets import JobPanel

BLOCKS = block_names(FAMILIES["sd1"])  # IN00..IN11, M00, OUT00..OUT11
CUSTOM = "(custom)"
CHECKPOINTS = (".safetensors",)


def weights_text(values: list[float]) -> str:
    """The --weights value of the sliders (what the CLI takes; shown so a run can be repeated there)."""
    return ",".join(f"{float(v):g}" for v in values)


def merge_data(model_a: str, model_b: str, model_c: str, method: str, mode: str, alpha: float, base_alpha: float,
               sliders: list[float], output: str, precision: str, vae: str, prune: bool, overwrite: bool) -> dict[str, Any]:
    """The MergeConfig values of the page (block mode: the sliders as --weights, whichever preset set them)."""
    data: dict[str, Any] = {"model_a": model_a or "", "model_b": model_b or "", "model_c": model_c or "", "method": method,
                            "output": output or "", "save_precision": precision, "vae": vae or "", "prune": bool(prune),
                            "overwrite": bool(overwrite)}
    if mode == "block weights":
        data.update(weights=weights_text(sliders), base_alpha=float(base_alpha))
    else:
        data.update(alpha=float(alpha))
    return data


def preset_values(name: str) -> list[float] | None:
    if not name or name == CUSTOM:
        return None
    return merge_preset(name)


class Page:
    def __init__(self, ctx: AppContext) -> None:
        self.ctx = ctx
        self.panel = JobPanel(ctx, "merge", kinds=("merge",), plots=False)
        self.lora_sections = {
            "LoRA bake": JobSection(ctx, "lora bake", "bake", title=lambda c: f"bake into {c.model}"),
            "LoRA merge": JobSection(ctx, "lora merge", "loramerge", title=lambda c: f"merge {len(c.loras)} LoRAs"),
            "LoRA extract": JobSection(ctx, "lora extract", "extract", title=lambda c: "extract a LoRA"),
            "(IA)^3 to LoRA": JobSection(ctx, "lora convert-ia3", "ia3lora", title=lambda c: f"convert {c.lora} to a LoRA"),
            "Convert": JobSection(ctx, "convert", "convert", title=lambda c: f"convert {c.source}"),
        }
        self.panels = [s.panel for s in self.lora_sections.values()]

    def render(self) -> None:
        ws = self.ctx.workspace
        with gr.Tabs():
            with gr.Tab("Checkpoints", elem_id="merge-tab-checkpoints"):
                self._render_merge(ws)
            for name, section in self.lora_sections.items():
                with gr.Tab(name, elem_id=f"merge-tab-{section.prefix}"):
                    gr.Markdown(section.spec.help.capitalize() + ".")
                    section.render()

    def _render_merge(self, ws: Any) -> None:
        files = ws.files(CHECKPOINTS)
        gr.Markdown("Streaming merge: **w is always the share of model B** (weighted sum A·(1−w) + B·w, add difference "
                    "A + (B−C)·w). Block weights follow the block-weighted merge extension: IN00–IN11, M00, OUT00–OUT11, "
                    "and base_alpha for the text encoder, VAE and other keys.")
        with gr.Row():
            pick = dict(choices=files, allow_custom_value=True, value=None)
            self.model_a = gr.Dropdown(label="model A", elem_id="merge-model-a", **pick)
            self.model_b = gr.Dropdown(label="model B", elem_id="merge-model-b", **pick)
            self.model_c = gr.Dropdown(label="model C (add difference)", elem_id="merge-model-c", **pick)
            refresh = gr.Button("↻", elem_id="merge-refresh", size="sm", scale=0, min_width=40)
        with gr.Row():
            self.method = gr.Dropdown(MERGE_METHODS.names(), value="weighted_sum", label="method", elem_id="merge-method")
            self.mode = gr.Radio(["plain", "block weights"], value="plain", label="weights", elem_id="merge-mode")
            self.alpha = gr.Slider(0, 1, value=0.5, step=0.01, label="alpha (w for every key)", elem_id="merge-alpha")
        with gr.Column(visible=False, elem_id="merge-blocks") as blocks:
            with gr.Row():
                self.preset = gr.Dropdown([CUSTOM, *sorted(merge_presets())], value=CUSTOM, label="preset (moves the sliders)",
                                          elem_id="merge-preset")
                self.base_alpha = gr.Slider(0, 1, value=0.0, step=0.01, label="base_alpha (text encoder, VAE, other keys)",
                                            elem_id="merge-base-alpha")
            self.sliders = []
            with gr.Row(equal_height=False):  # the U-Net's shape: input blocks down the left, output blocks up the right
                for column in (BLOCKS[:12], BLOCKS[12:13], BLOCKS[13:]):
                    with gr.Column(min_width=260):
                        for name in column:
                            self.sliders.append(gr.Slider(0, 1, value=0.5, step=0.01, label=name, elem_id=f"merge-{name}"))
            self.weights = gr.Textbox(weights_text([0.5] * len(BLOCKS)), label="--weights", interactive=False,
                                      elem_id="merge-weights")
        with gr.Row():
            self.output = gr.Textbox(label="output (.safetensors)", value="output/merged.safetensors", elem_id="merge-output")
            self.precision = gr.Dropdown(list(PRECISIONS), value="auto", label="save precision", elem_id="merge-precision")
            self.vae = gr.Dropdown(label="bake VAE (optional)", elem_id="merge-vae", **pick)
        with gr.Row():
            self.prune = gr.Checkbox(label="drop EMA weights", value=False, elem_id="merge-prune")
            self.overwrite = gr.Checkbox(label="replace the output if it exists", value=False, elem_id="merge-overwrite")
        start = gr.Button("Merge", variant="primary", elem_id="merge-start")
        self.message = gr.Markdown(elem_id="merge-message")
        self.panel.render()

        refresh.click(lambda: [gr.update(choices=ws.files(CHECKPOINTS))] * 4, None,
                      [self.model_a, self.model_b, self.model_c, self.vae])
        self.mode.change(lambda m: (gr.update(visible=m == "block weights"), gr.update(visible=m == "plain")),
                         [self.mode], [blocks, self.alpha])
        self.preset.change(self.apply_preset, [self.preset], [*self.sliders, self.weights], api_name="merge_preset")
        for slider in self.sliders:  # a hand-moved slider makes the weights custom
            slider.input(lambda *v: (CUSTOM, weights_text(list(v))), self.sliders, [self.preset, self.weights])
        inputs = [self.model_a, self.model_b, self.model_c, self.method, self.mode, self.alpha, self.base_alpha, *self.sliders,
                  self.output, self.precision, self.vae, self.prune, self.overwrite]
        start.click(self.start, inputs, [self.message, self.panel.job], api_name="merge_start")

    # ---- handlers ------------------------------------------------------------------------------
    def apply_preset(self, name: str) -> list[Any]:
        values = preset_values(name)
        if values is None:
            return [gr.skip()] * (len(BLOCKS) + 1)
        return [*values, weights_text(values)]

    def start(self, model_a: str, model_b: str, model_c: str, method: str, mode: str, alpha: float, base_alpha: float,
              *rest: Any) -> list[Any]:
        sliders, (output, precision, vae, prune, overwrite) = list(rest[:len(BLOCKS)]), rest[len(BLOCKS):]
        data = merge_data(model_a, model_b, model_c, method, mode, alpha, base_alpha, sliders, output, precision, vae, prune,
                          overwrite)
        cfg, problems = validate(self.ctx, MergeConfig, data, ready=True)
        if cfg is None or problems:
            return [problems_markdown(problems), gr.skip()]
        job = submit(self.ctx, "merge", cfg, f"merge → {cfg.output}")
        cli = "loratrain merge " + " ".join(f"--{k} {v}" for k, v in data.items() if v not in ("", False, None))
        return [f"started job {job}\n\nCLI: `{cli}`", job]
