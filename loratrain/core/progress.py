"""What a long job tells the outside world, and how it is asked to stop.

Jobs take a Reporter and a StopFlag and never print, draw bars or install signal handlers: the CLI
passes a console reporter and a Ctrl-C flag, the UI one that streams events, tests a recording one.
"""
from __future__ import annotations

import threading
from typing import Any, Protocol


class Reporter(Protocol):
    def start(self, total: int, desc: str, initial: int = 0, unit: str = "it") -> None:
        """A new phase ("caching latents", "training") of `total` units begins."""

    def advance(self, n: int = 1, **metrics: float) -> None:
        """`n` units of the current phase are done; metrics (loss, lr, ...) belong to that point."""

    def log(self, text: str) -> None:
        """A line for the user (warnings, plans, notes)."""

    def sample(self, paths: list[str], captions: list[str]) -> None:
        """Images made along the way: sample images, face previews, grid cells."""

    def done(self, status: str) -> None:
        """The current phase ended; `status` is an optional line about it."""

    def result(self, result: Any) -> None:
        """The job's final result (a JobResult), once, just before the job returns."""


class NullReporter:
    """The library's default: jobs run silently unless the caller asks to hear about them."""

    def start(self, total: int, desc: str, initial: int = 0, unit: str = "it") -> None:
        pass

    def advance(self, n: int = 1, **metrics: float) -> None:
        pass

    def log(self, text: str) -> None:
        pass

    def sample(self, paths: list[str], captions: list[str]) -> None:
        pass

    def done(self, status: str) -> None:
        pass

    def result(self, result: Any) -> None:
        pass


class StopFlag:
    """Set by Ctrl-C, a UI button or a test; a job checks it once per unit of work and saves before leaving."""

    def __init__(self) -> None:
        self._event = threading.Event()

    def set(self) -> None:
        self._event.set()

    def is_set(self) -> bool:
        return self._event.is_set()


class RecordingReporter:
    """Keeps everything in memory, in order: for tests and for the UI's job state."""

    def __init__(self) -> None:
        self.total = 0
        self.step = 0
        self.phase = ""
        self.phases: list[tuple[str, int]] = []
        self.metrics: list[dict[str, float]] = []
        self.lines: list[str] = []
        self.samples: list[tuple[str, str]] = []
        self.status = ""
        self.final: Any = None
        self._lock = threading.Lock()

    def start(self, total: int, desc: str, initial: int = 0, unit: str = "it") -> None:
        with self._lock:
            self.total, self.step, self.phase = total, initial, desc
            self.phases.append((desc, total))

    def advance(self, n: int = 1, **metrics: float) -> None:
        with self._lock:
            self.step += n
            if metrics:
                self.metrics.append({"step": float(self.step), **metrics})

    def log(self, text: str) -> None:
        with self._lock:
            self.lines.append(text)

    def sample(self, paths: list[str], captions: list[str]) -> None:
        with self._lock:
            self.samples.extend(zip(paths, captions))

    def done(self, status: str) -> None:
        with self._lock:
            self.status = status

    def result(self, result: Any) -> None:
        with self._lock:
            self.final = result
