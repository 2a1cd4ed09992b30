"""What a job looks like in a terminal: a tqdm bar per phase, log lines, the result's summary, Ctrl-C.

This is the app layer's side of the job contract; the library never prints or handles signals.
"""
from __future__ import annotations

import os
import signal
import sys
import time
from typing import Any

from loratrain.core.progress import StopFlag


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    h, rem = divmod(seconds, 3600)
    return f"{h}:{rem // 60:02d}:{rem % 60:02d}" if h else f"{rem // 60}:{rem % 60:02d}"


class ConsoleReporter:
    """tqdm bars on a terminal; on a pipe (CI, a log file), one plain line per phase instead of bar redraws, then a
    progress line every `every` seconds (step, rate, the latest metrics, ETA): a wrapper or a person tailing a log
    sees a long run move, not `0/N` until the first save."""

    EVERY = 30.0

    def __init__(self, quiet: bool = False, stream: Any = None, every: float | None = None) -> None:
        self.quiet = quiet
        self.stream = stream or sys.stderr
        self.every = every if every is not None else float(os.environ.get("LORATRAIN_PROGRESS_EVERY") or self.EVERY)
        self.clock = time.monotonic
        self._bar: Any = None
        self._phase: dict[str, Any] = {}

    def _interactive(self) -> bool:
        return bool(getattr(self.stream, "isatty", lambda: False)())

    def start(self, total: int, desc: str, initial: int = 0, unit: str = "it") -> None:
        from tqdm.auto import tqdm

        self.close()
        if not self.quiet and not self._interactive():
            self.log(f"{desc}: {initial}/{total} {unit}")
            now = self.clock()
            self._phase = {"desc": desc, "total": total, "unit": unit, "step": initial, "first": initial, "t0": now,
                           "last": now, "metrics": {}}
        self._bar = tqdm(total=total, desc=desc, initial=initial, unit=unit, dynamic_ncols=True, file=self.stream,
                         disable=self.quiet or not self._interactive())

    def advance(self, n: int = 1, **metrics: float) -> None:
        if self._bar is not None:
            if metrics:
                self._bar.set_postfix({k: f"{v:.4g}" for k, v in metrics.items()}, refresh=False)
            self._bar.update(n)
        p = self._phase
        if p:
            p["step"] += n
            p["metrics"].update(metrics)
            now = self.clock()
            if now - p["last"] >= self.every:
                p["last"] = now
                self.log(self._progress_line(now))

    def _progress_line(self, now: float) -> str:
        p = self._phase
        done, elapsed = p["step"] - p["first"], max(now - p["t0"], 1e-9)
        rate = done / elapsed
        parts = [f"{p['desc']}: {p['step']}/{p['total']} {p['unit']}", f"{rate:.3g} {p['unit']}/s"]
        parts += [f"{k} {v:.4g}" for k, v in p["metrics"].items()]
        if rate > 0 and p["total"]:
            parts.append(f"ETA {_duration((p['total'] - p['step']) / rate)}")
        return " · ".join(parts)

    def log(self, text: str) -> None:
        if self._bar is not None and not self._bar.disable:
            self._bar.write(text, file=sys.stdout)
        elif not self.quiet:
            print(text, flush=True)

    def sample(self, paths: list[str], captions: list[str]) -> None:
        if not self.quiet:
            for p in paths:
                self.log(f"image: {p}")

    def done(self, status: str) -> None:
        self.close()
        if status and not self.quiet:
            print(status, flush=True)

    def result(self, result: Any) -> None:
        self.close()
        for line in result.summary():
            print(line, flush=True)

    def close(self) -> None:
        self._phase = {}
        if self._bar is not None:
            self._bar.close()
            self._bar = None


def quiet_irrelevant_library_messages() -> None:
    """Silence one known message, not whole libraries.

    Importing diffusers' SD pipelines makes transformers resolve `CLIPImageProcessor` (the pipelines'
    optional safety-checker input, which we never use) and, without torchvision, announce its PIL
    fallback. Only that module's logger is raised to ERROR; every other warning still shows.
    """
    import logging

    logging.getLogger("transformers.utils.import_utils").setLevel(logging.ERROR)


def ctrl_c_stop(what: str = "after the current item") -> StopFlag:
    """A StopFlag set by the first Ctrl-C (the job finishes its unit of work and saves); the second aborts."""
    stop = StopFlag()

    def handler(signum: int, frame: Any) -> None:
        if stop.is_set():
            raise KeyboardInterrupt
        stop.set()
        print(f"\nstopping {what} (Ctrl-C again to abort)", file=sys.stderr, flush=True)

    signal.signal(signal.SIGINT, handler)
    return stop
