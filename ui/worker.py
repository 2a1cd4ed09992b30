"""`python -m loratrain.ui.worker JOB_DIR`: run one job in its own process, reporting to JOB_DIR/events.jsonl.

JOB_DIR/job.json names the job (as `loratrain/jobs.py` lists it) and holds its config. A file
`JOB_DIR/stop` (or SIGTERM) asks the job to stop at its next unit of work, exactly like Ctrl-C in the
CLI. Whatever happens, the last event says how it ended: a `result`, or an `error` with the one-line
message the CLI would print (the traceback of an unexpected failure goes to JOB_DIR/worker.log).
"""
from __future__ import annotations

import json
import os
import signal
import sys
import threading
import time
import traceback
from pathlib import Path

from loratrain.core.progress import StopFlag

from .events import EVENTS, JsonlReporter, append_event

STOP_FILE = "stop"
ROOTS_ENV = "LORATRAIN_WORKER_ROOTS"  # JSON list of the app's workspace roots ("[]": not confined, a bare runner)
JOBS_DIR_ENV = "LORATRAIN_WORKER_JOBS_DIR"


def watch_stop(job_dir: Path, stop: StopFlag) -> None:
    def loop() -> None:
        while not stop.is_set():
            if (job_dir / STOP_FILE).exists():
                stop.set()
                return
            time.sleep(0.2)

    threading.Thread(target=loop, name="stop-watch", daemon=True).start()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())


def main(job_dir: str) -> int:
    from loratrain.console import quiet_irrelevant_library_messages
    from loratrain.core import paths
    from loratrain.core.errors import ConfigError
    from loratrain.core.jobs import describe_error, is_user_error
    from loratrain.jobs import JOBS

    folder = Path(job_dir)
    quiet_irrelevant_library_messages()
    from . import signing

    key = signing.app_key()  # read before the guard: it lives outside the workspace
    roots = json.loads(os.environ.get(ROOTS_ENV) or "[]")
    if roots:  # the app's workspace, from the app itself: every file the job opens is checked in this process
        paths.confine_to(roots, denied=[os.environ.get(JOBS_DIR_ENV) or folder.parent], scratch=[folder])
        paths.install_guard()
    spec_data = json.loads((folder / "job.json").read_text())
    if not signing.verified(spec_data, key) or spec_data.get("id") != folder.name:
        append_event(folder, {"type": "error", "message": f"{folder / 'job.json'} was not written by this app; not run"})
        return 2
    stop = StopFlag()
    watch_stop(folder, stop)
    reporter = JsonlReporter(folder / EVENTS)
    try:
        spec = JOBS.get(spec_data["job"])
        cfg = spec.config_class().build(spec_data["config"], source="the form", check=False)
        refused = paths.config_problems(cfg)
        if refused:
            raise ConfigError(problems=refused)
        result = spec.run_function()(cfg, reporter, stop)
        return result.exit_code
    except BaseException as e:  # the traceback for the log, one line for the page
        reporter.close()
        traceback.print_exc()
        if is_user_error(e):
            append_event(folder, {"type": "error", "message": describe_error(e)})
            return 2
        append_event(folder, {"type": "error", "message": f"{type(e).__name__}: {e} (the traceback is in worker.log)"})
        return 3
    finally:
        try:
            reporter.close()
        except ValueError:
            pass


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
