"""`loratrain ui`: the Gradio app. `build_app(ctx)` makes the Blocks (no server), `serve(cfg)` runs them.

Safe by default: it listens on 127.0.0.1 (another address needs --auth), never makes a share link,
and reads and writes only inside its workspace roots: every path a form takes is checked, and the
files it can serve to a browser are limited to the same roots.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from loratrain.core import paths
from loratrain.core.errors import ConfigError

from .config import AppContext, UiConfig

TITLE = "loratrain"


def build_app(ctx: AppContext) -> Any:
    import gradio as gr

    from .pages.jobs import JobsPage
    from .pages.train import TrainPage
    from .widgets import refresh_all, refusal

    pages = {"Train": TrainPage(ctx), "Jobs": JobsPage(ctx)}
    for name, module in (("Dataset", "dataset"), ("Merge", "merge"), ("XY grid", "grid"), ("Face", "face")):
        page = _optional_page(module, ctx)
        if page is not None:
            pages[name] = page
    order = ["Train", "Dataset", "Merge", "XY grid", "Face", "Jobs"]
    with gr.Blocks(title=TITLE, analytics_enabled=False) as app:
        gr.Markdown(f"# {TITLE}\nWorkspace: `{ctx.workspace.describe()}`")  # type: ignore[attr-defined]
        with gr.Tabs(elem_id="tabs"):
            for name in order:
                if name in pages:
                    with gr.Tab(name, id=name.lower().replace(" ", "-"), elem_id=f"tab-{name.lower().replace(' ', '-')}"):
                        pages[name].render()
        panels = [p.panel for p in pages.values() if hasattr(p, "panel")] + [
            panel for p in pages.values() for panel in getattr(p, "panels", [])]
        refresh_all(panels)
        app.load(lambda: [panel.latest() for panel in panels], outputs=[panel.job for panel in panels])

        def job_status_api(job_id: str) -> dict:
            try:
                return job_status(ctx, job_id)
            except ConfigError as e:
                raise refusal("job_status", str(e)) from None

        def start_job_api(job: str, config: dict) -> str:
            """Queue any job with a config dict (paths checked like the forms'); returns the job id."""
            try:
                if not isinstance(config, dict):
                    raise ConfigError(f"config must be a JSON object of options, not {type(config).__name__}")
                return submit_checked(ctx, job, config).id
            except ConfigError as e:
                raise refusal("start_job", "; ".join(f"{f}: {t}" if f else t for f, t in e.problems)) from None
            except (OSError, ValueError, TypeError) as e:  # a value no check foresaw: still one line, never a traceback
                raise refusal("start_job", f"{type(e).__name__}: {e}"[:2000]) from None

        gr.api(job_status_api, api_name="job_status", queue=False)  # a cheap read: never waits behind queued events
        gr.api(start_job_api, api_name="start_job")
    return app


def job_status(ctx: AppContext, job_id: str) -> dict[str, Any]:
    """A job's state as JSON, for scripts and `gradio_client` (what the pages show, without the pixels)."""
    runner = ctx.runner
    record, snap = runner.store.get(job_id), runner.snapshot(job_id)  # type: ignore[attr-defined]
    return {"id": record.id, "job": record.job, "state": record.state, "message": record.message, "phase": snap.phase,
            "step": snap.step, "total": snap.total, "metrics": snap.metrics[-5:], "n_metrics": len(snap.metrics),
            "samples": [p for p, _ in snap.samples], "summary": snap.summary, "error": snap.error,
            "outputs": snap.outputs, "position": runner.queue_position(job_id), "peak_rss_mib": snap.peak_rss_mib, "cpu_s": snap.cpu_s,
            "started": record.started, "ended": record.ended}  # type: ignore[attr-defined]


def submit_checked(ctx: AppContext, job: str, config: dict[str, Any], title: str = "") -> Any:
    """Check a job's config against the workspace (every path inside a root) and queue it."""
    from loratrain.jobs import JOBS

    spec = JOBS.get(job)
    cls = spec.config_class()
    config = dict(config)
    if config.get("config_file"):  # as on the command line: the file's options, the request's over them
        from loratrain.core import paths

        path = ctx.workspace.resolve(str(config.pop("config_file")), "config_file")  # type: ignore[attr-defined]
        with paths.confined(ctx.workspace.roots, ctx.workspace.denied):  # type: ignore[attr-defined]
            config = {**cls.read_config_file(path), **config}
    config = {**config, **spec.fixed}
    resolved, refused = ctx.workspace.check_config(cls, cls.build(config, source="the request", check=False).model_dump())  # type: ignore[attr-defined]
    if refused:
        raise ConfigError(problems=refused)
    cfg = cls.build(resolved, source="the request", check=False)
    return ctx.runner.submit(spec.name, cfg, title=title)  # type: ignore[attr-defined]


def _optional_page(module: str, ctx: AppContext) -> Any:
    import importlib

    try:
        mod = importlib.import_module(f".pages.{module}", __package__)
    except ModuleNotFoundError as e:
        if e.name and e.name.startswith("loratrain.ui.pages"):
            return None
        raise
    return mod.Page(ctx)


def quiet_queue(app: Any) -> None:
    """Let Gradio's event queue poll every 20 ms when idle instead of every 1 ms.

    At 1 ms an idle app burns ~6 % of a core (measured: 0.65 CPU-s per 10 s), taken from the training
    job beside it on a small machine; 20 ms only delays the start of a click's handler. Gradio has no
    public option for it, so this sets the queue's attributes where they exist and leaves it alone otherwise.
    """
    queue = getattr(app, "_queue", None)
    if queue is not None and hasattr(queue, "sleep_when_free"):
        queue.sleep_when_free = max(queue.sleep_when_free, 0.02)
    if queue is not None and hasattr(queue, "progress_update_sleep_when_free"):
        queue.progress_update_sleep_when_free = max(queue.progress_update_sleep_when_free, 0.1)


def make_context(cfg: UiConfig) -> AppContext:
    from .runner import JobRunner, JobStore
    from .workspace import Workspace

    workspace = Workspace(cfg.root)
    jobs_dir = Path(cfg.jobs_dir) if cfg.jobs_dir else workspace.home / ".loratrain" / "ui" / "jobs"
    workspace.resolve(str(jobs_dir), "jobs_dir")
    workspace = Workspace(cfg.root, denied=[jobs_dir])  # no job may read or write the app's own records
    runner = JobRunner(JobStore(jobs_dir, roots=workspace.roots), gpu_slots=cfg.gpu_slots, cwd=workspace.home)
    # the app's own handlers (gallery, captions, facesets, previews) open files under the same rules as its jobs;
    # its own records are the one place outside them it writes
    paths.confine_to(workspace.roots, denied=[jobs_dir], base=workspace.home)
    demo = None
    if cfg.demo:
        from loratrain.training.demo import demo_train_config

        demo = demo_train_config(workspace.home / "demo", steps=300).model_dump()
    return AppContext(workspace=workspace, runner=runner, demo_config=demo)


def serve(cfg: UiConfig, block: bool = True) -> tuple[Any, AppContext, str]:
    """Start the app; returns (Blocks, context, local URL). `block=False` returns at once (tests)."""
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    cfg.check()
    ctx = make_context(cfg)
    app = build_app(ctx)
    quiet_queue(app)
    roots = [str(r) for r in ctx.workspace.roots]  # type: ignore[attr-defined]
    ctx.runner.start()  # type: ignore[attr-defined]
    try:
        _, url, _ = app.launch(server_name=cfg.listen, server_port=cfg.port, auth=cfg.credentials(), share=False,
                               allowed_paths=roots, blocked_paths=[str(ctx.runner.store.real)], prevent_thread_lock=True, ssr_mode=False, quiet=True,
                               footer_links=[], mcp_server=False)
    except OSError as e:
        raise ConfigError(f"cannot serve on {cfg.listen}:{cfg.port} ({e.strerror or e}); choose another --port") from None
    if block:
        print(f"loratrain ui: {url} (workspace {ctx.workspace.describe()}); Ctrl-C stops the app, not the jobs")  # type: ignore[attr-defined]
        try:
            app.block_thread()
        except KeyboardInterrupt:
            pass
        finally:
            ctx.runner.close()  # type: ignore[attr-defined]
            app.close()
            paths.unconfine()
    return app, ctx, url
