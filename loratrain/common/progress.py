"""Progress reporting and stop requests shared by the CLI (tqdm) and the UI (gr.Progress).

Long jobs take a Reporter and a StopFlag; they never import a UI toolkit.
"""
from __future__ import annotations

import threading
from typing import Any, Protocol


class Reporter(Protocol):
    def start(self, total: int, desc: str, initial: int = 0, unit: str = "it") -> None: ...
    def advance(self, n: int = 1, **metrics: float) -> None: ...
    def log(self, text: str) -> None: ...
    def sample(self, paths: list[str], captions: list[str]) -> None: ...
    def done(self, status: str) -> None: ...


class StopFlag:
    """Set by Ctrl-C or a UI button; a job checks it at safe points and saves before leaving."""

    def __init__(self) -> None:
        self._event = threading.Event()

    def set(self) -> None:
        self._event.set()

    def is_set(self) -> bool:
        return self._event.is_set()


def ctrl_c_stop(what: str = "after the current item") -> StopFlag:
    """A StopFlag set by the first Ctrl-C (the job finishes its step and saves); the second aborts at once."""
    import signal

    stop = StopFlag()

    def handler(signum, frame):  # noqa: ANN001
        if stop.is_set():
            raise KeyboardInterrupt
        stop.set()
        print(f"\nstopping {what} (Ctrl-C again to abort)", flush=True)

    signal.signal(signal.SIGINT, handler)
    return stop


class TqdmReporter:
    def __init__(self, quiet: bool = False) -> None:
        self.quiet = quiet
        self._bar: Any = None

    def start(self, total: int, desc: str, initial: int = 0, unit: str = "it") -> None:
        from tqdm.auto import tqdm

        self.close()
        self._bar = tqdm(total=total, desc=desc, initial=initial, unit=unit, disable=self.quiet, dynamic_ncols=True)

    def advance(self, n: int = 1, **metrics: float) -> None:
        if self._bar is not None:
            if metrics:
                self._bar.set_postfix({k: f"{v:.4g}" for k, v in metrics.items()}, refresh=False)
            self._bar.update(n)

    def log(self, text: str) -> None:
        if self._bar is not None:
            self._bar.write(text)
        elif not self.quiet:
            print(text, flush=True)

    def sample(self, paths: list[str], captions: list[str]) -> None:
        for p in paths:
            self.log(f"sample: {p}")

    def done(self, status: str) -> None:
        self.close()
        if status and not self.quiet:
            print(status, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None


class RecordingReporter:
    """Keeps everything in memory: for tests and for the UI's job state."""

    def __init__(self) -> None:
        self.total = 0
        self.step = 0
        self.metrics: list[dict[str, float]] = []
        self.lines: list[str] = []
        self.samples: list[tuple[str, str]] = []
        self.status = ""
        self._lock = threading.Lock()

    def start(self, total: int, desc: str, initial: int = 0, unit: str = "it") -> None:
        with self._lock:
            self.total, self.step = total, initial

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
