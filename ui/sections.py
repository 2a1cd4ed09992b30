"""One job on a page: its form (generated from the schema), Check and Start, every problem at once, and the job panel.

Pages are built from these sections, so every tool's form takes exactly the options of its CLI
command and starts the same library job. Fields a page shares between sections (the dataset
folder of the Dataset page) are passed in as components and left out of the generated form.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

import gradio as gr

from loratrain.core.config import JobConfig
from loratrain.core.errors import ConfigError, Problem
from loratrain.jobs import JOBS, missing_extras

from .config import AppContext
from .events import Snapshot
from .forms import Form, problems_markdown
from .widgets import JobPanel


def validate(ctx: AppContext, cfg_cls: type[JobConfig], data: dict[str, Any], ready: bool) -> tuple[JobConfig | None, list[Problem]]:
    """The config of these values with every path resolved inside the workspace, and every problem found.

    `ready` adds what must be filled in before the job can start (required inputs, files that exist).
    """
    try:
        cfg = cfg_cls.build(data, source="the form", check=False)
    except ConfigError as e:
        return None, e.problems
    resolved, refused = ctx.workspace.check_config(cfg_cls, cfg.model_dump())  # type: ignore[attr-defined]
    if refused:
        return None, refused
    cfg = cfg_cls.build(resolved, source="the form", check=False)
    problems = cfg.problems() + (cfg.requirements() if ready else [])
    return cfg, problems


def submit(ctx: AppContext, job: str, cfg: JobConfig, title: str) -> str:
    return ctx.runner.submit(job, cfg, title=title).id  # type: ignore[attr-defined]


class JobSection:
    """Form + Check/Start + problems + panel for one job (`job` as named in loratrain/jobs.py)."""

    def __init__(self, ctx: AppContext, job: str, prefix: str, shared: tuple[str, ...] = (), exclude: tuple[str, ...] = (),
                 open_groups: tuple[str, ...] = (), defaults: dict[str, Any] | None = None, plots: bool = False,
                 images: Callable[[Snapshot], list[tuple[str, str]]] | None = None, images_label: str = "images",
                 title: Callable[[JobConfig], str] | None = None, start_label: str = "Start") -> None:
        self.ctx, self.spec, self.prefix = ctx, JOBS.get(job), prefix
        self.cfg_cls: type[JobConfig] = self.spec.config_class()
        self.shared = shared
        hidden = (*shared, *exclude, *self.spec.fixed, "quiet")
        self.form = Form(self.cfg_cls, prefix, exclude=tuple(n for n in hidden if n in self.cfg_cls.model_fields),
                         open_groups=open_groups, defaults=defaults)
        self.panel = JobPanel(ctx, prefix, kinds=(self.spec.name,), plots=plots, images=images, images_label=images_label)
        self.title = title or (lambda cfg: self.spec.name)
        self.start_label = start_label

    def render(self, shared: list[gr.Component] = ()) -> None:
        """Create the components; `shared` are the components of the `shared` fields, in that order."""
        self.shared_inputs = list(shared)
        with gr.Row(equal_height=False):
            with gr.Column(scale=3):
                self.form.render()
            with gr.Column(scale=2):
                with gr.Row():
                    check = gr.Button("Check", elem_id=f"{self.prefix}-check")
                    start = gr.Button(self.start_label, variant="primary", elem_id=f"{self.prefix}-start")
                self.message = gr.Markdown(elem_id=f"{self.prefix}-message")
                self.panel.render()
        inputs = [*self.shared_inputs, *self.form.inputs()]
        check.click(self.check, inputs, [*self.form.inputs(), self.message], api_name=f"{self.prefix}_check")
        start.click(self.start, inputs, [*self.form.inputs(), self.message, self.panel.job], api_name=f"{self.prefix}_start")

    # ---- handlers (plain functions of the values: tested without a browser) ---------------------
    def data(self, values: list[Any]) -> dict[str, Any]:
        n = len(self.shared)
        out = self.form.to_dict(list(values[n:]))
        out.update({name: ("" if v is None else v) for name, v in zip(self.shared, values[:n])})
        out.update(self.spec.fixed)
        return out

    def validate(self, values: list[Any], ready: bool) -> tuple[JobConfig | None, list[Problem]]:
        cfg, problems = validate(self.ctx, self.cfg_cls, self.data(values), ready)
        hint = missing_extras(self.spec) if ready else None
        return cfg, problems + ([("", hint)] if hint else [])

    def check(self, *values: Any) -> list[Any]:
        cfg, problems = self.validate(list(values), ready=True)
        text = problems_markdown(problems) or "ready to start"
        return [*self.form.field_updates(problems), text]

    def start(self, *values: Any) -> list[Any]:
        cfg, problems = self.validate(list(values), ready=True)
        job: Any = gr.skip()
        if cfg is not None and not problems:
            try:
                job = submit(self.ctx, self.spec.name, cfg, self.title(cfg))
                text = f"started job {job}"
            except ConfigError as e:
                problems, text = e.problems, problems_markdown(e.problems)
        else:
            text = problems_markdown(problems)
        return [*self.form.field_updates(problems), text, job]
