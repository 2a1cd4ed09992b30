"""The job panel every page shares: status, plots, images, log, Stop and Kill, refreshed from the job's events.

The panel remembers which job it shows per browser session; on page load it picks the newest job of
its kind, so a reloaded page (or a second tab) reattaches to a job that kept running meanwhile.
"""
from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

import gradio as gr

from loratrain.core.errors import ConfigError

from .config import AppContext
from .events import Snapshot
from .panel import view
from .runner import JobRunner


def refusal(api: str, message: str) -> Exception:
    """A request the app refuses: one line on the app's console (not Gradio's traceback), the message to the caller."""
    line = " ".join(message.split())
    print(f"loratrain ui: refused /{api}: {line[:500]}", file=sys.stderr, flush=True)
    return gr.Error(message, print_exception=False)


def plotted_series(snap: Snapshot | None) -> tuple[str, ...]:
    """The loss plot's series, in order of first appearance (panel.view plots every metric but the lr ones)."""
    if snap is None:
        return ()
    return tuple(dict.fromkeys(k for row in snap.metrics for k in row if k != "step" and not k.startswith("lr")))


class JobPanel:
    def __init__(self, ctx: AppContext, prefix: str, kinds: tuple[str, ...], plots: bool = True, lr: bool = False,
                 images_label: str = "images", images: Callable[[Snapshot], list[tuple[str, str]]] | None = None) -> None:
        self.ctx, self.prefix, self.kinds, self.images_of = ctx, prefix, kinds, images
        self.plots, self.lr, self.images_label = plots, lr, images_label
        self.runner: JobRunner = ctx.runner  # type: ignore[assignment]

    def render(self) -> None:
        p = self.prefix
        # The job id is a visible component (not a State) so scripts calling the page's events get it back too.
        self.job = gr.Textbox(label="job", interactive=False, elem_id=f"{p}-job", max_lines=1)
        self.seen = gr.State(None)  # what the page shows already: unchanged ticks send nothing
        self.status = gr.Markdown("no job yet", elem_id=f"{p}-status")
        with gr.Row():
            self.stop_btn = gr.Button("Stop (saves first)", elem_id=f"{p}-stop", variant="secondary", size="sm")
            self.kill_btn = gr.Button("Kill now", elem_id=f"{p}-kill", variant="stop", size="sm")
        self.loss = self.lr_plot = None
        if self.plots:
            self.loss = gr.LinePlot(None, x="step", y="value", color="series", label="loss (per step and moving average)",
                                    elem_id=f"{p}-loss")
            if self.lr:
                self.lr_plot = gr.LinePlot(None, x="step", y="value", color="series", label="learning rate",
                                           elem_id=f"{p}-lr")
        self.images = gr.Gallery(label=self.images_label, elem_id=f"{p}-images", columns=4, height=300, object_fit="contain")
        self.log = gr.Textbox(label="log", lines=8, max_lines=8, interactive=False, autoscroll=True, elem_id=f"{p}-log")
        self.stop_btn.click(self.stop, inputs=[self.job], outputs=[self.status], api_name=f"{p}_stop")
        self.kill_btn.click(self.kill, inputs=[self.job], outputs=[self.status], api_name=f"{p}_kill")

    def outputs(self) -> list[Any]:
        return [c for c in (self.status, self.loss, self.lr_plot, self.images, self.log) if c is not None]

    def latest(self) -> str:
        """The job this panel shows after a page load: the newest running or queued one of its kinds, else the newest."""
        jobs = [r for r in self.runner.store.all() if r.job in self.kinds]
        live = [r for r in jobs if not r.finished]
        return (live or jobs)[0].id if (live or jobs) else ""

    def refresh(self, job_id: str | None, seen: Any) -> list[Any]:
        job_id = (job_id or "").strip() or None
        record = snap = None
        if job_id:
            try:
                record, snap = self.runner.store.get(job_id), self.runner.snapshot(job_id)
            except ConfigError:
                record = None
        marker = (job_id, record.state if record else None, snap.step if snap else 0, len(snap.logs) if snap else 0,
                  len(snap.samples) if snap else 0, len(snap.metrics) if snap else 0, snap.error if snap else "",
                  snap.exit_code if snap else None, plotted_series(snap))
        # Gradio's LinePlot keeps the series (colours) of the chart it built from its first data and then only swaps
        # the data: a series that starts later (a validation metric) stayed undrawn until a reload. A new legend list
        # rebuilds the chart, but from the data the browser held before that update, so it is sent one tick after the
        # data with the new series. The marker's last item is the chart: (series it was built with, legend list sent).
        prev = seen if isinstance(seen, tuple) and len(seen) == len(marker) + 1 else None
        series = marker[-1]
        built, legend = (series, ()) if prev is None else prev[-1]
        if prev is not None and not prev[-2]:
            built = series  # an empty plot builds its chart from the first data it gets
        rebuild = bool(series) and prev is not None and prev[-2] == series and (built != series or legend not in ((), series))
        marker += ((series, series) if rebuild else (built, legend),)
        quiet = self.runner.quiet_for(job_id) if record and record.state == "running" else 0.0
        if marker == seen and quiet < 60:
            return [gr.skip() for _ in self.outputs()] + [seen]
        v = view(record, snap, self.runner.queue_position(job_id) if job_id else None, quiet)
        if self.images_of is not None and snap is not None:
            v.images = self.images_of(snap)
        out: list[Any] = [v.status]
        if self.loss is not None:
            out.append(gr.update(value=v.loss, colors_in_legend=list(series)) if rebuild else v.loss)
        if self.lr_plot is not None:
            out.append(v.lr)
        out += [v.images, v.log]
        return out + [marker]

    def stop(self, job_id: str | None) -> str:
        if not job_id:
            return "no job to stop"
        try:
            record = self.runner.stop(job_id)
        except ConfigError as e:
            raise refusal(f"{self.prefix}_stop", str(e)) from None
        return f"**{record.title}**: stopping after the current step (a resumable state is saved)" \
            if record.state == "running" else f"**{record.title}**: {record.state}"

    def kill(self, job_id: str | None) -> str:
        if not job_id:
            return "no job to kill"
        try:
            record = self.runner.kill(job_id)
        except ConfigError as e:
            raise refusal(f"{self.prefix}_kill", str(e)) from None
        return f"**{record.title}**: {record.state} · {record.message}"


def refresh_all(panels: list[JobPanel], every: float = 1.0) -> None:
    """One timer for every panel of the app (one request a second per tab, whatever the number of pages);
    a panel whose job did not change sends nothing."""
    timer = gr.Timer(every)
    inputs = [c for p in panels for c in (p.job, p.seen)]
    outputs = [c for p in panels for c in (*p.outputs(), p.seen)]

    def tick(*values: Any) -> list[Any]:
        out: list[Any] = []
        for i, panel in enumerate(panels):
            out += panel.refresh(values[2 * i], values[2 * i + 1])
        return out

    timer.tick(tick, inputs=inputs, outputs=outputs, show_progress="hidden", queue=False)
