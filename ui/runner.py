"""Jobs of the app: each in its own process, listed on disk, one GPU job at a time, the rest queued.

A job is a folder under the app's state folder: `job.json` (what to run), `state.json` (queued,
running with its pid, or how it ended), `events.jsonl` (what it reported) and `worker.log`. Because
everything is on disk, a reloaded page or a second tab shows the same jobs, finished jobs stay listed
after the app restarts, and a job whose process outlives the app is picked up again. A job that
crashes, is killed for memory or stops reporting never takes the app down: its state says so.
"""
from __future__ import annotations

import json
import os
import secrets
import signal
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from loratrain.core import paths
from loratrain.core.config import JobConfig
from loratrain.core.errors import ConfigError
from loratrain.core.paths import JOB_ID
from loratrain.core.safe_io import atomic_write_json
from loratrain.jobs import JOBS

from . import signing
from .events import EVENTS, EventFollower, Snapshot, append_event
from .worker import JOBS_DIR_ENV, ROOTS_ENV, STOP_FILE

FINISHED = ("done", "stopped", "failed", "crashed", "cancelled")
QUIET_AFTER = 600.0  # seconds without an event before a running job is shown as possibly hung


@dataclass
class JobRecord:
    id: str
    job: str  # the job's name in loratrain/jobs.py ("train", "lora bake", ...)
    title: str
    created: float
    state: str = "queued"  # queued | running | done | stopped | failed | crashed | cancelled
    pid: int | None = None
    started: float | None = None
    ended: float | None = None
    exit_code: int | None = None
    message: str = ""
    config: dict[str, Any] = field(default_factory=dict)
    pid_start: int | None = None  # the process's start time (clock ticks since boot): a reused pid is never signalled

    @property
    def finished(self) -> bool:
        return self.state in FINISHED


class JobStore:
    """The jobs folder: one subfolder per job, newest first."""

    def __init__(self, root: str | Path, roots: list[str | Path] = ()) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.real = Path(os.path.realpath(self.root))  # where it is now: a link swapped in later is refused, not followed
        self.roots = [str(r) for r in roots]  # the workspace: every job is confined to it in its own process
        self.key = signing.app_key()

    def folder(self, job_id: str) -> Path:
        """A job's folder; `job_id` must be one the app made (anything else, `../x` included, is no job)."""
        if not isinstance(job_id, str) or not JOB_ID.fullmatch(job_id):
            raise ConfigError(f"no job {str(job_id)[:80]!r} (job ids look like 20261206-104433-a1b2c3)")
        if Path(os.path.realpath(self.root)) != self.real:
            raise ConfigError(f"the jobs folder {self.root} was replaced (now a link to {os.path.realpath(self.root)}); "
                              "the app does not follow it: restart the app")
        return self.real / job_id

    def create(self, job: str, config: dict[str, Any], title: str) -> JobRecord:
        job_id = time.strftime("%Y%m%d-%H%M%S-") + secrets.token_hex(3)
        record = JobRecord(id=job_id, job=job, title=title, created=time.time(), config=config)
        folder = self.folder(job_id)
        folder.mkdir(parents=True)
        with paths.trusted():  # the app's own records, in its own folder (no handler may write there)
            atomic_write_json(folder / "job.json", signing.signed({"id": job_id, "job": job, "config": config}, self.key))
        self.save(record)
        return record

    def save(self, record: JobRecord) -> None:
        with paths.trusted():
            atomic_write_json(self.folder(record.id) / "state.json", signing.signed(asdict(record), self.key))

    def get(self, job_id: str) -> JobRecord:
        """The record the app wrote; anything else in the jobs folder (a forged or planted record) is no job."""
        try:
            data = json.loads((self.folder(job_id) / "state.json").read_text())
            if not signing.verified(data, self.key) or data.get("id") != job_id:
                raise ValueError("not signed by this app")
            data.pop(signing.SIG)
            return JobRecord(**data)
        except (OSError, ValueError, TypeError):
            raise ConfigError(f"no job {job_id!r}") from None

    def all(self) -> list[JobRecord]:
        out = []
        for folder in sorted(self.root.iterdir(), reverse=True):
            if JOB_ID.fullmatch(folder.name) and not folder.is_symlink() and (folder / "state.json").is_file():
                try:
                    out.append(self.get(folder.name))
                except ConfigError:
                    continue
        return out


def start_ticks(pid: int) -> int | None:
    """When process `pid` started (clock ticks since boot, /proc/PID/stat field 22), or None when it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return int(fh.read().rsplit(")", 1)[1].split()[19])
    except (OSError, ValueError, IndexError):
        return None


def ours(record: JobRecord) -> bool:
    """Whether `record.pid` is still the process this app started for it (same start time, leading its own group).
    A record without a start time (written before it was kept, or by someone else) is never ours to signal."""
    if not record.pid or record.pid <= 1 or record.pid_start is None:
        return False
    if start_ticks(record.pid) != record.pid_start:
        return False
    try:
        return os.getpgid(record.pid) == record.pid
    except OSError:
        return False


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie (exited, not yet reaped by its parent) is not running
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return True


class JobRunner:
    """Starts queued jobs (GPU jobs one at a time, in order), follows them and records how they end."""

    def __init__(self, store: JobStore, gpu_slots: int = 1, poll: float = 1.0, cwd: str | Path | None = None) -> None:
        self.store, self.gpu_slots, self.poll = store, gpu_slots, poll
        self.cwd = Path(cwd) if cwd else None  # the workspace: a relative path a job opens means one inside it
        self._procs: dict[str, subprocess.Popen] = {}
        self._followers: dict[str, EventFollower] = {}
        self._lock = threading.RLock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._recover()

    # ---- submitting ---------------------------------------------------------------------------
    def submit(self, job: str, cfg: JobConfig, title: str = "") -> JobRecord:
        """Queue a job whose config is complete and checked (every problem raised here, before it is queued)."""
        spec = JOBS.get(job)
        with self._lock:
            clash = self.collision(spec.name, cfg)  # first: "job X is stopped and waiting for Resume" says the most
        if clash:
            raise ConfigError(problems=[clash])
        with paths.confined(self.store.roots, [self.store.root], base=self.cwd):  # the rules its worker will apply
            cfg.check()
            refused = paths.config_problems(cfg)
        if refused:
            raise ConfigError(problems=refused)
        with self._lock:
            clash = self.collision(spec.name, cfg)  # again: a job may have been queued while this one was checked
            if clash:
                raise ConfigError(problems=[clash])
            record = self.store.create(spec.name, cfg.model_dump(), title or spec.name)
        self.tick()
        return self.store.get(record.id)

    def claims(self, job: str, values: dict[str, Any]) -> list[tuple[str, Path, bool]]:
        """(option, real path, is a name stem) of what a job writes: its output options, and for a training job every
        file named after output_name in output_dir (NAME.safetensors, NAME-step*.safetensors, NAME-state/ ...): two
        runs may share a folder, not a name."""
        cls = JOBS.get(job).config_class()
        base = self.cwd or Path.cwd()
        out = []
        for name in cls.model_fields:
            value = values.get(name)
            if cls.extra(name).get("path") == "output" and isinstance(value, str) and value and name != "logging_dir":
                if name == "output_dir" and values.get("output_name"):
                    out.append(("output_name", paths.real(Path(value) / str(values["output_name"]), base), True))
                else:
                    out.append((name, paths.real(value, base), False))
        return out

    @staticmethod
    def _overlap(a: tuple[str, Path, bool], b: tuple[str, Path, bool]) -> bool:
        (_, pa, stem_a), (_, pb, stem_b) = a, b
        if pa == pb or paths.within(pa, pb) or paths.within(pb, pa):
            return True
        for (p, stem), (q, _) in (((pa, stem_a), (pb, stem_b)), ((pb, stem_b), (pa, stem_a))):
            if stem:  # q is one of the files named after the stem p, or lies inside one (NAME-state/...)
                for part in (q, *q.parents):
                    if part.parent == p.parent and part.name.startswith((p.name + ".", p.name + "-")):
                        return True
        return False

    def collision(self, job: str, cfg: JobConfig) -> tuple[str, str] | None:
        """The first queued, running or stopped (resumable) job that writes where `cfg` would, as a problem."""
        values = cfg.model_dump()
        mine = self.claims(job, values)
        for record in self.store.all():
            if record.state not in ("queued", "running", "stopped"):
                continue
            if record.state == "stopped" and (values.get("resume") or values.get("overwrite")):
                continue  # resuming (or knowingly replacing) the stopped run is what was asked
            try:
                theirs = self.claims(record.job, record.config)
            except (KeyError, ValueError, AttributeError):
                continue
            for claim in mine:
                if any(self._overlap(claim, other) for other in theirs):
                    waiting = " and waiting for Resume" if record.state == "stopped" else ""
                    return (claim[0], f"{claim[1]} is written by job {record.id} ({record.title}, {record.state}{waiting}); "
                                      "choose another name or folder" + (", or pass overwrite" if record.state == "stopped" else ""))
        return None

    def stop(self, job_id: str) -> JobRecord:
        """Ask a running job to stop after its current unit (it saves first); a queued one is cancelled."""
        with self._lock:
            record = self.store.get(job_id)
            if record.state == "queued":
                record.state, record.ended, record.message = "cancelled", time.time(), "cancelled before it started"
                self.store.save(record)
            elif record.state == "running":
                (self.store.folder(job_id) / STOP_FILE).touch()
            return record

    def kill(self, job_id: str) -> JobRecord:
        """End a running job at once (its process group); nothing it writes is ever half-written at a final path."""
        with self._lock:
            record = self.store.get(job_id)
            if record.state == "running" and ours(record):
                try:
                    os.killpg(record.pid, signal.SIGKILL)
                except (ProcessLookupError, PermissionError):
                    pass
                append_event(self.store.folder(job_id), {"type": "error", "message": "killed from the app"})
            self.tick()
            return self.store.get(job_id)

    # ---- following ----------------------------------------------------------------------------
    def snapshot(self, job_id: str) -> Snapshot:
        with self._lock:
            follower = self._followers.get(job_id)
            if follower is None:
                follower = self._followers[job_id] = EventFollower(self.store.folder(job_id) / EVENTS)
            return follower.poll()

    def queue_position(self, job_id: str) -> int | None:
        """1 for the next GPU job to start, 2 after it...; None when not waiting."""
        if self.store.get(job_id).state != "queued":  # the common case (every poll of a running job): one record read
            return None
        queued = [r for r in reversed(self.store.all()) if r.state == "queued" and JOBS.get(r.job).gpu]
        ids = [r.id for r in queued]
        return ids.index(job_id) + 1 if job_id in ids else None

    def quiet_for(self, job_id: str) -> float:
        """Seconds since a running job last reported anything (a hang shows as a growing number)."""
        snap = self.snapshot(job_id)
        record = self.store.get(job_id)
        since = max(snap.last_event, record.started or 0.0)
        return time.time() - since if record.state == "running" and since else 0.0

    # ---- the scheduler ------------------------------------------------------------------------
    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="job-runner", daemon=True)
            self._thread.start()

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self.tick()
            except Exception:  # the scheduler must outlive any single bad job folder
                pass
            self._stop.wait(self.poll)

    def tick(self) -> None:
        with self._lock:
            records = self.store.all()
            for record in records:
                if record.state == "running":
                    self._reap(record)  # may change its state on disk and in `record`
            running_gpu = sum(1 for r in records if r.state == "running" and JOBS.get(r.job).gpu)
            for record in sorted((r for r in records if r.state == "queued"), key=lambda r: r.created):
                if JOBS.get(record.job).gpu:
                    if running_gpu >= self.gpu_slots:
                        continue
                    running_gpu += 1
                self._launch(record)

    def _launch(self, record: JobRecord) -> None:
        folder = self.store.folder(record.id)
        log = open(folder / "worker.log", "ab")
        scratch = folder / "tmp"  # the job's temp files stay in its own folder (the worker may write nowhere else outside the roots)
        scratch.mkdir(exist_ok=True)
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "TMPDIR": str(scratch),
               # the roots travel from the app to its worker, never through a file in the workspace
               ROOTS_ENV: json.dumps(self.store.roots), JOBS_DIR_ENV: str(self.store.real)}
        if self.store.roots:  # our own caches (the merge's hash cache) stay in the workspace the job is confined to
            env["LORATRAIN_CACHE"] = str(Path(self.store.roots[0]) / ".loratrain" / "cache")
        proc = subprocess.Popen([sys.executable, "-P", "-m", "loratrain.ui.worker", str(folder)], stdout=log, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True, env=env, cwd=self.cwd)
        log.close()
        self._procs[record.id] = proc
        record.state, record.pid, record.started = "running", proc.pid, time.time()
        record.pid_start = start_ticks(proc.pid)
        self.store.save(record)
        # the end of a job is recorded the moment its process exits (and the next queued job starts), not at the next poll
        threading.Thread(target=self._on_exit, args=(proc,), name=f"wait-{record.id}", daemon=True).start()

    def _on_exit(self, proc: subprocess.Popen) -> None:
        proc.wait()
        try:
            self.tick()
        except Exception:  # the scheduler loop tries again
            pass

    def _reap(self, record: JobRecord) -> None:
        proc = self._procs.get(record.id)
        if proc is not None:
            code = proc.poll()
            if code is None:
                return
            del self._procs[record.id]
        elif ours(record) and _alive(record.pid):
            return  # a job started by an earlier run of the app: still running, followed through its events
        else:
            code = None
        snap = self.snapshot(record.id)
        record.ended, record.exit_code = time.time(), code if code is not None else snap.exit_code
        if snap.exit_code is not None:
            record.state = "stopped" if snap.stopped else ("done" if snap.exit_code == 0 else "failed")
            record.message = snap.summary[-1] if snap.summary else ""
        elif snap.error:
            record.state, record.message = "failed", snap.error
        else:
            reason = f"signal {-code}" if code is not None and code < 0 else f"exit code {code}"
            record.state = "crashed"
            record.message = (f"the job's process ended without a result ({reason}); killed for lack of memory?"
                              if code in (-9, 137) else f"the job's process ended without a result ({reason})")
            append_event(self.store.folder(record.id), {"type": "error", "message": record.message})
        self.store.save(record)

    def _recover(self) -> None:
        """After an app restart: jobs whose process is gone are marked; live ones are followed again."""
        for record in self.store.all():
            if record.state == "running" and not (ours(record) and _alive(record.pid)):
                self._reap(record)
