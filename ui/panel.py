"""What a page shows of a job: status line, progress, metric plots, images and the log tail.

`view()` is a pure function of the job's record and snapshot, so it is tested without a browser; the
pages only wire its values into components.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import pandas as pd

from .events import Snapshot
from .runner import QUIET_AFTER, JobRecord

MAX_POINTS = 2000


def duration(seconds: float | None) -> str:
    if seconds is None:
        return "?"
    seconds = int(seconds)
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


@dataclass
class JobView:
    status: str
    state: str
    loss: pd.DataFrame | None
    lr: pd.DataFrame | None
    images: list[tuple[str, str]]
    log: str
    running: bool


def _frame(rows: list[dict[str, float]], keep: Callable[[str], bool]) -> pd.DataFrame | None:
    """The points of a plot, or None while there are none: Gradio 6's LinePlot fixes its colour scale (and axis
    types) on the first frame it gets, so an empty frame would leave every later line without a colour."""
    points = [{"step": r["step"], "value": v, "series": k} for r in rows for k, v in r.items() if k != "step" and keep(k)]
    if not points:
        return None
    frame = pd.DataFrame(points, columns=["step", "value", "series"])
    if len(frame) > MAX_POINTS:
        frame = frame.iloc[:: max(1, len(frame) // MAX_POINTS)]
    return frame


def view(record: JobRecord | None, snap: Snapshot | None, position: int | None = None, quiet_for: float = 0.0) -> JobView:
    """Everything a job panel shows, from the job's record (state) and its folded events."""
    if record is None or snap is None:
        return JobView("no job yet", "", None, None, [], "", False)
    title = f"**{record.title}** ({record.id})"
    if record.state == "queued":
        where = f" (position {position} in the GPU queue)" if position else ""
        status = f"{title}: queued{where}"
    elif record.state == "running":
        rate = f" · {snap.rate:.2f} {snap.unit}/s · ETA {duration(snap.eta)}" if snap.rate else ""
        phase = f"{snap.phase}: {snap.step}/{snap.total} {snap.unit}" if snap.phase else "starting"
        status = f"{title}: running · {phase}{rate}"
        if quiet_for > QUIET_AFTER:
            status += f"\n\n⚠ no progress for {duration(quiet_for)}: the job may hang (Kill ends it)"
    else:
        line = (snap.summary[-1] if snap.summary else "") or record.message or snap.error
        status = f"{title}: {record.state}" + (f" · {line}" if line else "")
        if record.started and record.ended:
            status += f" ({duration(record.ended - record.started)}"
            status += f", peak memory {snap.peak_rss_mib:.0f} MiB)" if snap.peak_rss_mib else ")"
    loss = _frame(snap.metrics, lambda k: not k.startswith("lr"))
    lr = _frame(snap.metrics, lambda k: k.startswith("lr"))
    log_lines = list(snap.logs) + ([f"error: {snap.error}"] if snap.error else []) + list(snap.summary)
    return JobView(status=status, state=record.state, loss=loss, lr=lr, images=list(reversed(snap.samples[-48:])),
                   log="\n".join(log_lines[-200:]), running=record.state in ("queued", "running"))
