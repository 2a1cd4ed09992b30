"""Every job of the app, newest first, and any one of them in full (also after the app restarted)."""
from __future__ import annotations

import time
from typing import Any

import gradio as gr
import pandas as pd

from loratrain.jobs import JOBS

from ..config import AppContext
from ..panel import duration
from ..widgets import JobPanel

COLUMNS = ["id", "job", "title", "state", "started", "took", "message"]


def jobs_table(ctx: AppContext) -> pd.DataFrame:
    rows = []
    for r in ctx.runner.store.all():  # type: ignore[attr-defined]
        took = duration((r.ended or time.time()) - r.started) if r.started else ""
        state = r.state
        if state == "queued" and JOBS.get(r.job).gpu:
            state = f"queued ({ctx.runner.queue_position(r.id)})"  # type: ignore[attr-defined]
        rows.append([r.id, r.job, r.title, state, time.strftime("%H:%M:%S", time.localtime(r.started)) if r.started else "",
                     took, r.message])
    return pd.DataFrame(rows, columns=COLUMNS)


class JobsPage:
    def __init__(self, ctx: AppContext) -> None:
        self.ctx = ctx
        self.panel = JobPanel(ctx, "jobs", kinds=tuple(JOBS), lr=False)

    def render(self) -> None:
        gr.Markdown("Jobs run in their own processes: closing the page does not stop them, and a job that fails never "
                    "takes the app down. GPU jobs run one at a time; the others wait in order.")
        table = gr.Dataframe(jobs_table(self.ctx), headers=COLUMNS, interactive=False, elem_id="jobs-table", wrap=True)
        with gr.Row():
            pick = gr.Textbox(label="job id", elem_id="jobs-pick", scale=3)
            show = gr.Button("Show", elem_id="jobs-show", scale=1)
        self.panel.render()
        timer = gr.Timer(2.0)
        timer.tick(lambda: jobs_table(self.ctx), outputs=[table], show_progress="hidden")
        table.select(self.selected, inputs=None, outputs=[pick, self.panel.job])
        show.click(lambda job_id: job_id.strip() or None, [pick], [self.panel.job], api_name="jobs_show")

    def selected(self, event: gr.SelectData) -> list[Any]:
        row = event.index[0] if isinstance(event.index, (list, tuple)) else event.index
        table = jobs_table(self.ctx)
        job_id = table.iloc[row]["id"] if 0 <= row < len(table) else None
        return [job_id or "", job_id]
