"""A job's life as JSON lines: the reporter a worker process writes, and the snapshot the app reads back.

Each job runs in its own process (a crash, an out-of-memory kill or a hang never takes the app down,
and each job gets fresh torch/accelerate state); everything it reports is appended to
`events.jsonl` in its folder, one JSON object per line, flushed at once. The app never parses
human-readable output: it folds these events into a `Snapshot`.
"""
from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import IO, Any

EVENTS = "events.jsonl"


class JsonlReporter:
    """Reporter that appends one JSON object per event; progress without metrics is batched to ~10 lines/s."""

    def __init__(self, path: str | Path) -> None:
        self._fh: IO[str] = open(path, "a", encoding="utf-8", buffering=1)
        self._unsent = 0
        self._last = 0.0

    def _emit(self, event: dict[str, Any]) -> None:
        event["t"] = round(time.time(), 3)
        self._fh.write(json.dumps(event, default=str) + "\n")

    def _flush_advance(self) -> None:
        if self._unsent:
            self._emit({"type": "advance", "n": self._unsent, "metrics": {}})
            self._unsent = 0

    def start(self, total: int, desc: str, initial: int = 0, unit: str = "it") -> None:
        self._flush_advance()
        self._emit({"type": "start", "total": total, "desc": desc, "initial": initial, "unit": unit})

    def advance(self, n: int = 1, **metrics: float) -> None:
        if metrics:
            self._flush_advance()
            self._emit({"type": "advance", "n": n, "metrics": {k: float(v) for k, v in metrics.items()}})
            return
        self._unsent += n
        now = time.monotonic()
        if now - self._last >= 0.1:
            self._last = now
            self._flush_advance()

    def log(self, text: str) -> None:
        self._flush_advance()
        self._emit({"type": "log", "text": text})

    def sample(self, paths: list[str], captions: list[str]) -> None:
        self._flush_advance()
        self._emit({"type": "sample", "paths": [str(p) for p in paths], "captions": list(captions)})

    def done(self, status: str) -> None:
        self._flush_advance()
        self._emit({"type": "done", "status": status})

    def result(self, result: Any) -> None:
        self._flush_advance()
        self._emit({"type": "result", "summary": result.summary(), "exit_code": result.exit_code, "stopped": result.stopped,
                    "outputs": outputs_of(result), "data": result_data(result), "peak_rss_mib": peak_rss_mib(),
                    "cpu_s": cpu_seconds()})

    def close(self) -> None:
        self._flush_advance()
        self._fh.close()


MAX_DATA = 1 << 20


def cpu_seconds() -> float:
    """CPU time the job process (and the children it waited for) used so far, user + system."""
    import resource

    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return round(own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime, 3)


def peak_rss_mib() -> float | None:
    """The job process's highest resident memory so far (Linux VmHWM), shown with its result."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return round(int(line.split()[1]) / 1024, 1)
    except OSError:
        pass
    return None


def result_data(result: Any) -> dict[str, Any]:
    """The result's fields as JSON (a quality report's findings, a tagging run's counts) for pages that show
    more than the summary; left out when larger than 1 MiB."""
    try:
        data = json.loads(json.dumps(asdict(result), default=str))
    except (TypeError, ValueError):
        return {}
    return data if len(json.dumps(data)) <= MAX_DATA else {}


def outputs_of(result: Any) -> list[str]:
    """Files and folders a result names (for the UI's links), found by field name, never parsed from text."""
    out: list[str] = []
    for name in ("lora_path", "output", "model_path", "preview_path", "image", "toml", "onnx_path", "output_dir"):
        value = getattr(result, name, None)
        if value:
            out.append(str(value))
    for grid in getattr(result, "grids", []) or []:
        out.append(str(grid))
    return out


@dataclass
class Snapshot:
    """Everything a page shows about one job, folded from its events."""

    phase: str = ""
    unit: str = "it"
    step: int = 0
    total: int = 0
    rate: float = 0.0  # units per second over the recent window
    eta: float | None = None
    metrics: list[dict[str, float]] = field(default_factory=list)  # {"step": ..., "loss": ...} per metric event
    logs: list[str] = field(default_factory=list)
    samples: list[tuple[str, str]] = field(default_factory=list)
    summary: list[str] = field(default_factory=list)
    exit_code: int | None = None
    stopped: bool = False
    outputs: list[str] = field(default_factory=list)
    error: str = ""
    data: dict[str, Any] = field(default_factory=dict)  # the result's fields (see result_data)
    peak_rss_mib: float | None = None
    cpu_s: float | None = None
    last_event: float = 0.0
    _ticks: list[tuple[float, int]] = field(default_factory=list, repr=False)

    def apply(self, event: dict[str, Any]) -> None:
        kind, t = event.get("type"), float(event.get("t", 0.0))
        self.last_event = max(self.last_event, t)
        if kind == "start":
            self.phase, self.total, self.unit = event["desc"], int(event["total"]), event.get("unit", "it")
            self.step = int(event.get("initial", 0))
            self._ticks = [(t, self.step)]
        elif kind == "advance":
            self.step += int(event.get("n", 1))
            self._ticks = (self._ticks + [(t, self.step)])[-50:]
            if event.get("metrics"):
                self.metrics.append({"step": float(self.step), **event["metrics"]})
        elif kind == "log":
            self.logs = (self.logs + [event["text"]])[-500:]
        elif kind == "sample":
            self.samples.extend(zip(event["paths"], event["captions"]))
        elif kind == "error":
            self.error = str(event.get("message", ""))
        elif kind == "result":
            self.summary, self.exit_code = list(event["summary"]), int(event["exit_code"])
            self.stopped, self.outputs = bool(event["stopped"]), list(event.get("outputs", []))
            self.data = dict(event.get("data") or {})
            self.peak_rss_mib, self.cpu_s = event.get("peak_rss_mib"), event.get("cpu_s")
        self._update_rate()

    def _update_rate(self) -> None:
        if len(self._ticks) >= 2 and self._ticks[-1][0] > self._ticks[0][0]:
            (t0, s0), (t1, s1) = self._ticks[0], self._ticks[-1]
            self.rate = (s1 - s0) / (t1 - t0)
            self.eta = (self.total - self.step) / self.rate if self.rate > 0 and self.total else None


class EventFollower:
    """Reads a job's events file incrementally: each call folds only the lines appended since the last one."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.offset = 0
        self.snapshot = Snapshot()
        self._partial = ""

    def poll(self) -> Snapshot:
        try:
            with open(self.path, encoding="utf-8") as fh:
                fh.seek(self.offset)
                chunk = fh.read()
                self.offset = fh.tell()
        except FileNotFoundError:
            return self.snapshot
        lines = (self._partial + chunk).split("\n")
        self._partial = lines.pop()  # an incomplete last line is read again next time
        for line in lines:
            if line.strip():
                try:
                    self.snapshot.apply(json.loads(line))
                except (ValueError, KeyError):
                    continue  # a torn line from a killed job
        return self.snapshot


def append_event(folder: str | Path, event: dict[str, Any]) -> None:
    """An event written by the app itself (a crash it noticed, a kill it made)."""
    event["t"] = round(time.time(), 3)
    with open(Path(folder) / EVENTS, "a", encoding="utf-8") as fh:
        fh.write(json.dumps(event) + "\n")
        fh.flush()
        os.fsync(fh.fileno())
