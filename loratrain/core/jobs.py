"""The job contract every long operation follows, so the CLI and the UI can drive any of them alike.

    run_<job>(cfg, reporter=None, stop=None) -> <Job>Result

`cfg` is the job's JobConfig, checked (every problem at once) before any work starts; `reporter`
receives phases, metrics, logs, images and finally the result (silent by default); `stop`, when
set, ends the job within one unit of work (a step, a tensor, an image) with nothing half-written.
The result says what was made, whether the job was stopped, and the lines a user wants to see.
"""
from __future__ import annotations

import errno
import functools
import inspect
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from .config import JobConfig
from .errors import ConfigError
from .progress import NullReporter, Reporter, StopFlag

R = TypeVar("R", bound="JobResult")
C = TypeVar("C", bound=JobConfig)


@dataclass(kw_only=True)
class JobResult:
    """Base of every job's result."""

    stopped: bool = False

    def summary(self) -> list[str]:
        """Lines a person wants to read when the job ends (the CLI prints them, the UI shows them)."""
        return []

    @property
    def exit_code(self) -> int:
        """0 done, 130 stopped (as after Ctrl-C); jobs whose findings are failures override it."""
        return 130 if self.stopped else 0


class Stopped(Exception):
    """Raised inside an output's writer when a stop is requested, so the temp file is removed on the way out."""


def job(fn: Callable[[C, Reporter, StopFlag], R]) -> Callable[..., R]:
    """Give `fn(cfg, reporter, stop)` the contract: defaults, `cfg.check()` first, the result reported last."""

    @functools.wraps(fn)
    def run(cfg: C, reporter: Reporter | None = None, stop: StopFlag | None = None, **kw: Any) -> R:
        reporter = reporter if reporter is not None else NullReporter()
        stop = stop if stop is not None else StopFlag()
        cfg.check()
        result = fn(cfg, reporter, stop, **kw)
        reporter.result(result)
        return result

    sig = inspect.signature(fn)
    params = list(sig.parameters.values())
    params[1] = params[1].replace(default=None, annotation="Reporter | None")
    params[2] = params[2].replace(default=None, annotation="StopFlag | None")
    run.__signature__ = sig.replace(parameters=params)  # what callers (and the UI) see
    return run


def describe_error(e: BaseException) -> str:
    """One line (or one per config problem) that names the path and says what to do: how the CLI prints a failed
    job and how the app's worker records one, so both tell a user the same thing."""
    if isinstance(e, OSError) and not isinstance(e, (FileNotFoundError,)) and e.errno is not None:
        where = e.filename or "the output"
        if e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
            return (f"cannot write {where}: {e.strerror}. Free some space (or choose another output folder) and run "
                    "again; nothing half-written was left behind")
        if isinstance(e, NotADirectoryError) or e.errno == errno.ENOTDIR:
            return f"{where}: a part of this path is a file, not a folder; choose another path"
        if isinstance(e, FileExistsError):
            return f"{where}: already exists and is not a folder; choose another path"
        if isinstance(e, IsADirectoryError):
            return f"{where}: is a folder, where a file was expected"
        if isinstance(e, PermissionError):
            return f"{where}: permission denied; choose a path you can write to"
        return f"{where}: {e.strerror}"
    text = str(e).strip()
    return text or e.__class__.__name__


def is_user_error(e: BaseException) -> bool:
    """Errors of the user's input or environment (one line: the CLI's exit 2, the app's error event) rather than
    our bugs (a traceback), decided in one place for both. Pillow's DecompressionBombError (an image of over ~179 megapixels in a dataset) is one, though no OSError or ValueError."""
    if isinstance(e, (ConfigError, ValueError, OSError, ImportError, RuntimeError, FloatingPointError)):
        return True
    pil = sys.modules.get("PIL.Image")  # loaded by whatever opened the image; never imported here for this check
    return pil is not None and isinstance(e, pil.DecompressionBombError)
