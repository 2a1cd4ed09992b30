"""The training page: every trainer option from the schema, a simple mode, the step plan, and the live job."""
from __future__ import annotations

import shlex
from pathlib import Path
from typing import Any

import gradio as gr
import tomli_w

from loratrain.core.errors import ConfigError, Problem
from loratrain.core.paths import check_name, confine
from loratrain.core.safe_io import atomic_write_text
from loratrain.training.config import DATA, MODEL, NET, OPTIM, TrainConfig
from loratrain.training.options.flux import FLUX
from loratrain.training.options.sd3 import SD3
from loratrain.training.simple import KINDS, simple_plan

from ..config import AppContext
from ..forms import Form, problems_markdown
from ..sections import validate
from ..widgets import JobPanel


def free_gpu_bytes() -> int | None:
    """Free memory of the first GPU, None without one (the simple mode's batch suggestion)."""
    try:
        import torch

        return int(torch.cuda.mem_get_info()[0]) if torch.cuda.is_available() else None
    except Exception:  # a broken driver is no reason to refuse the form
        return None


def simple_settings(kind: str, model: str, images: str, trigger: str, name: str, out_root: Path,
                    free_bytes: int | None = None) -> tuple[dict[str, Any], list[str]]:
    """The full form's values for the simple page and the reason for each choice (training/simple.py), writing a
    dataset TOML when the folder holds plain images."""
    from loratrain.core.images import list_images

    if kind not in KINDS:
        raise ConfigError(f"what is trained: choose one of {', '.join(KINDS)}")
    if not (model and images and trigger and name):
        raise ConfigError("fill in the base model, the image folder, the trigger word and the output name")
    check_name(name, "output name")  # it names files in out_root/output: one name, never a path
    trigger = _checked_trigger(trigger)
    folder = Path(images)
    kohya = [p for p in folder.iterdir() if p.is_dir() and p.name.split("_", 1)[0].isdigit()]
    n_images = len(list_images(folder, recursive=bool(kohya)))
    if not n_images:  # said now, before a dataset TOML is written for it
        raise ConfigError(f"image folder {folder}: no images in it" + (" or its <repeats>_<tokens> folders" if kohya else ""))
    plan = simple_plan(kind, n_images, trigger, free_bytes)
    values = {**plan.values, "pretrained_model_name_or_path": model, "output_name": name, "output_dir": str(out_root / "output")}
    steps = values["max_train_steps"]
    values.update(save_every_n_steps=max(1, steps // 4), save_last_n_steps=2)
    if kohya:  # already kohya <repeats>_<tokens> folders: their repeats stand
        values.update(train_data_dir=str(folder), dataset_config="")
        reasons = [r if not r.startswith("repeats") else "repeats from the folder names (<repeats>_<tokens>)" for r in plan.reasons]
        return values, reasons
    toml = confine(out_root / "output" / f"{name}_dataset.toml", "dataset TOML", write=True)  # read below: never through a link out
    if toml.exists() and not toml.read_text(encoding="utf-8", errors="replace").startswith("# Written by the app's simple mode."):
        raise ConfigError(f"{toml} exists and was not written by the simple mode; choose another output name")
    subset = {"image_dir": str(folder), "class_tokens": trigger, "trigger_word": trigger, "num_repeats": plan.repeats,
              "keep_tokens": 1, "caption_extension": ".txt"}
    atomic_write_text(toml, "# Written by the app's simple mode.\n" + tomli_w.dumps(
        {"general": {"shuffle_caption": True, "caption_extension": ".txt"}, "datasets": [{"subsets": [subset]}]}))
    values.update(dataset_config=str(toml), train_data_dir="")
    return values, plan.reasons


def _checked_trigger(trigger: str) -> str:
    """The trigger word as the trainer will take it (the folder options' own checks, with the captions the simple mode
    writes: shuffled, comma-separated), or a ConfigError saying what is wrong with it."""
    from pydantic import ValidationError

    from loratrain.training.options.data import SubsetOptions

    try:
        opts = SubsetOptions(trigger_word=trigger, shuffle_caption=True, keep_tokens=1)
    except ValidationError as e:
        raise ConfigError(f"trigger word {trigger!r}: {e.errors()[0]['msg'].removeprefix('Value error, ')}") from None
    problems = opts.problems()
    if problems:
        raise ConfigError(f"trigger word: {problems[0][1]}")
    return opts.trigger_word


def command_line(cfg: TrainConfig) -> str:
    """The `loratrain train ...` that runs exactly this (options left at their defaults are omitted)."""
    defaults = TrainConfig().model_dump()
    parts = ["loratrain", "train"]
    for name, value in cfg.model_dump().items():
        if value == defaults.get(name) or value is None:
            continue
        if isinstance(value, bool):
            parts.append(f"--{name}" if value else f"--no-{name}")
        elif isinstance(value, list):
            parts += [f"--{name}", *map(str, value)]
        else:
            parts += [f"--{name}", str(value)]
    return " ".join(shlex.quote(p) for p in parts)


def step_plan(cfg: TrainConfig) -> str:
    """The sd-scripts step formula for this dataset (reads folders and captions, loads no model)."""
    from loratrain.training.data.dataset import TrainData
    from loratrain.training.trainer import build_specs

    logs: list[str] = []
    data = TrainData(build_specs(cfg, logs.append), log=logs.append)
    plan = data.plan(cfg.gradient_accumulation_steps, cfg.max_train_steps, cfg.max_train_epochs)
    text = plan.describe([s.batch_size for s in data.specs])
    triggers = sorted({(s.trigger_word, s.keep_tokens) for spec in data.specs for s in spec.subsets if s.trigger_word})
    text += "".join(f" Trigger word '{w}' first in every caption" + (f" (keep_tokens {k} keeps it there)." if k else
                    " (keep_tokens 0: shuffled captions may move it; set keep_tokens 1).") for w, k in triggers)
    return "**Step plan:** " + text + "".join(f"\n\n{line.splitlines()[0]}" for line in logs)


def model_family(ctx: AppContext, value: str) -> tuple[str, str]:
    """(family, a line for the form) of the base model a path names: "flux" (FLUX.1 / Chroma), "sd3", "sd" or ""
    (empty, not found, outside the workspace). Headers only, inside the workspace's roots like every other read."""
    from loratrain.core import paths
    from loratrain.core.models.flux_loading import is_flux_model
    from loratrain.core.models.sd3_loading import is_sd3_model

    text = str(value or "").strip()
    if not text:
        return "", ""
    ws = ctx.workspace
    try:
        path = ws.resolve(text, "base model")
    except ConfigError as e:
        return "", f"**Base model:** {e}"
    if not path.exists():
        return "", ""
    with paths.confined(ws.roots, ws.denied, base=ws.home):
        if is_flux_model(path):
            return "flux", (f"**{path.name}: a FLUX.1 / Chroma transformer.** Its parts (clip_l, t5xxl, ae; the T5 "
                            f"tokenizer ships with loratrain) and options are in the **{FLUX}** group; SD-only options "
                            "are refused by name.")
        if is_sd3_model(path):
            return "sd3", (f"**{path.name}: an SD3 / SD3.5 MMDiT.** Its parts are clip_l, t5xxl (**{FLUX}** group), "
                           f"clip_g (**{SD3}** group) and vae, unless the file holds them; SD3's options are in the "
                           f"**{SD3}** group.")
        sd, why = _sd_family(path)
    if not sd:
        return "", f"**{path.name}:** {why}"
    return "sd", f"**{path.name}: an {sd} model** (the {FLUX} and {SD3} groups do not apply)."


def _sd_family(path: Path) -> tuple[str, str]:
    """("SD1" / "SD2" / "SDXL", "") for an SD checkpoint file or diffusers folder, else ("", why not): from the header
    or model_index.json only, like the trainer's own check."""
    from loratrain.core.models.families import detect_family

    if path.is_dir():
        return ("SD1 / SD2 / SDXL", "") if (path / "model_index.json").is_file() else \
            ("", "a folder without model_index.json: not a diffusers model")
    if not path.is_file() or path.suffix.lower() not in (".safetensors", ".ckpt", ".pt", ".bin"):
        return "", "not a model file (.safetensors, or a diffusers folder)"
    if path.suffix.lower() != ".safetensors":
        return "SD1 / SD2 / SDXL (pickle)", ""
    try:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            keys = set(f.keys())
        return detect_family(keys, path.name).name.upper(), ""
    except Exception as e:  # noqa: BLE001 - a damaged or foreign file: said in the line, never raised
        return "", " ".join(str(e).split())[:200] or "not a readable .safetensors file"


class TrainPage:
    def __init__(self, ctx: AppContext) -> None:
        self.ctx = ctx
        self.form = Form(TrainConfig, "train", open_groups=(MODEL, DATA, NET, OPTIM), defaults=ctx.demo_config)
        self.panel = JobPanel(ctx, "train", kinds=("train",), lr=True, images_label="samples")

    def render(self) -> None:
        ws = self.ctx.workspace
        gr.Markdown("Train a LoRA / LoCon. Every option of `loratrain train`; paths are inside the workspace "
                    f"({ws.describe()}). **Check** shows the step plan and every problem at once.")
        mode = gr.Radio(["Simple", "Full"], value="Full" if self.ctx.demo_config else "Simple", label="mode",
                        elem_id="train-mode")
        with gr.Column(visible=not self.ctx.demo_config, elem_id="train-simple") as simple:
            with gr.Row():
                s_model = gr.Textbox(label="base model", elem_id="simple-model", info="a .safetensors checkpoint or diffusers folder")
                s_images = gr.Textbox(label="image folder", elem_id="simple-images", info="images with .txt captions")
            with gr.Row():
                s_trigger = gr.Textbox(label="trigger word", elem_id="simple-trigger")
                s_kind = gr.Radio(list(KINDS), value="character", label="what is trained", elem_id="simple-kind")
                s_name = gr.Textbox(label="output name", value="my_lora", elem_id="simple-name")
            s_apply = gr.Button("Fill the full form with these", elem_id="simple-apply")
        with gr.Row(equal_height=False):
            with gr.Column(scale=3):
                with gr.Column(visible=bool(self.ctx.demo_config), elem_id="train-full") as full:
                    family = gr.Markdown(elem_id="train-family")
                    self.form.render()
                with gr.Accordion("Config file and command line", open=False):
                    with gr.Row():
                        cfg_path = gr.Textbox(label="config TOML", value="output/train.toml", elem_id="train-config-path")
                        load = gr.Button("Load", elem_id="train-load")
                        save = gr.Button("Save", elem_id="train-save")
                    command = gr.Textbox(label="the same run from the CLI", lines=3, interactive=False, elem_id="train-command")
            with gr.Column(scale=2):
                with gr.Row():
                    check = gr.Button("Check", elem_id="train-check")
                    start = gr.Button("Start", variant="primary", elem_id="train-start")
                    resume = gr.Button("Resume (latest state)", elem_id="train-resume")
                plan = gr.Markdown(elem_id="train-plan")
                self.panel.render()

        inputs = self.form.inputs()
        groups = [self.form.groups[g] for g in (FLUX, SD3)]
        self.form.components["pretrained_model_name_or_path"].change(self.family, [self.form.components[
            "pretrained_model_name_or_path"]], [family, *groups], api_name="train_family")
        mode.change(lambda m: (gr.update(visible=m == "Simple"), gr.update(visible=m == "Full")), [mode], [simple, full])
        s_apply.click(self.apply_simple, [s_kind, s_model, s_images, s_trigger, s_name, *inputs],
                      [*inputs, plan, mode, simple, full], api_name="train_simple")
        check.click(self.check, inputs, [*inputs, plan, command], api_name="train_check")
        start.click(self.start, inputs, [*inputs, plan, command, self.panel.job], api_name="train_start")
        resume.click(self.resume, inputs, [*inputs, plan, command, self.panel.job], api_name="train_resume")
        save.click(self.save, [cfg_path, *inputs], [plan], api_name="train_save")
        load.click(self.load, [cfg_path], [*inputs, plan], api_name="train_load")

    # ---- handlers (plain functions of the form values: tested without a browser) ----------------
    def family(self, model: str) -> list[Any]:
        """The model's family in a line above the form, and its option group opened."""
        kind, text = model_family(self.ctx, model)
        return [text, *[gr.update(open=True) if kind == k else gr.skip() for k in ("flux", "sd3")]]

    def validate(self, values: list[Any], ready: bool) -> tuple[TrainConfig | None, list[Problem]]:
        cfg, problems = validate(self.ctx, TrainConfig, self.form.to_dict(values), ready)
        if cfg is not None and ready:
            problems += self._dataset_outside(cfg)
        return cfg, problems  # type: ignore[return-value]

    def _dataset_outside(self, cfg: TrainConfig) -> list[Problem]:
        """A dataset TOML may name image folders anywhere: the app reads only inside the workspace."""
        if not cfg.dataset_config or not Path(cfg.dataset_config).is_file():
            return []
        from loratrain.training.data.subsets import specs_from_toml

        try:
            specs = specs_from_toml(cfg.dataset_config, {})
        except ConfigError as e:
            return [("dataset_config", str(e))]
        return [("dataset_config", f"image_dir {s.image_dir} is outside the workspace")
                for spec in specs for s in spec.subsets if not self.ctx.workspace.contains(s.image_dir)]

    def check(self, *values: Any) -> list[Any]:
        cfg, problems = self.validate(list(values), ready=True)
        text = problems_markdown(problems)
        if cfg is not None and not problems:
            try:
                text = step_plan(cfg)
            except ConfigError as e:
                problems = e.problems
                text = problems_markdown(problems)
        return [*self.form.field_updates(problems), text, command_line(cfg) if cfg is not None else ""]

    def start(self, *values: Any, resume: bool = False) -> list[Any]:
        values = list(values)
        if resume:
            values[self.form.names.index("resume")] = "latest"
        cfg, problems = self.validate(values, ready=True)
        job = gr.skip()
        if cfg is not None and not problems:
            try:
                job = self.ctx.runner.submit("train", cfg, title=f"train {cfg.output_name}").id  # type: ignore[attr-defined]
                text = f"started job {job}"
            except ConfigError as e:
                problems, text = e.problems, problems_markdown(e.problems)
        else:
            text = problems_markdown(problems)
        return [*self.form.field_updates(problems), text, command_line(cfg) if cfg is not None else "", job]

    def resume(self, *values: Any) -> list[Any]:
        return self.start(*values, resume=True)

    def apply_simple(self, kind: str, model: str, images: str, trigger: str, name: str, *values: Any) -> list[Any]:
        ws = self.ctx.workspace
        try:
            model_p, images_p = ws.resolve(model, "base model"), ws.resolve(images, "image folder")
            if not images_p.is_dir():
                raise ConfigError(f"image folder not found: {images}")
            settings, reasons = simple_settings(kind, str(model_p), str(images_p), trigger.strip(), name.strip(), ws.home,
                                                free_gpu_bytes())
        except (ConfigError, OSError) as e:
            return [*[gr.skip()] * len(values), problems_markdown([("", str(e))]), gr.skip(), gr.skip(), gr.skip()]
        data = {**self.form.to_dict(list(values)), **settings}
        why = "".join(f"\n- {r}" for r in reasons)
        return [*self.form.to_values(data), f"Filled in for a {kind}; these are the values that will run, and why:{why}",
                "Full", gr.update(visible=False), gr.update(visible=True)]

    def save(self, path: str, *values: Any) -> str:
        cfg, problems = self.validate(list(values), ready=False)
        if cfg is None:
            return problems_markdown(problems)
        try:
            target = self.ctx.workspace.resolve(path, "config TOML")
            if target.suffix.lower() != ".toml":  # never a model, an image or any other file a user has there
                raise ConfigError(f"config TOML: {path!r} must end in .toml")
            atomic_write_text(target, cfg.to_toml())
        except (ConfigError, OSError) as e:
            return problems_markdown([("", str(e))])
        return f"saved {target} (`loratrain train --config_file {target}` runs it)"

    def load(self, path: str) -> list[Any]:
        try:
            source = self.ctx.workspace.resolve(path, "config TOML")
            cfg = TrainConfig.from_toml(source, check=False)
        except ConfigError as e:
            return [*[gr.skip()] * len(self.form.names), problems_markdown(e.problems)]
        return [*self.form.to_values(cfg.model_dump()), f"loaded {source}"]
