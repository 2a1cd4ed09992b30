"""Options of `loratrain ui` (the Gradio app), and the context every page is built with."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from loratrain.core.config import JobConfig, opt
from loratrain.core.errors import ConfigError, Problem

LOOPBACK = ("127.0.0.1", "localhost", "::1")


class UiConfig(JobConfig):
    root: list[str] = opt(["."], "workspace folders: every path a form takes must lie inside one of them (the first is "
                                 "where relative paths start and the app keeps its jobs)")
    listen: str = opt("127.0.0.1", "address to serve on; anything but loopback needs --auth")
    port: int = opt(7860, "port", ge=1, le=65535)
    auth: str = opt("", "user:password, or a file holding one user:password per line (required with --listen)")
    demo: bool = opt(False, "create (or reuse) the tiny demo model, dataset and prompts and open the training page with them")
    jobs_dir: str = opt("", "where jobs are kept (default: <first root>/.loratrain/ui/jobs)")
    gpu_slots: int = opt(1, "GPU jobs (training, sampling) running at once; the rest queue", ge=1)

    def problems(self) -> list[Problem]:
        if self.listen not in LOOPBACK and not self.auth:
            return [("auth", f"--listen {self.listen} serves beyond this machine: give --auth user:password (or a file)")]
        return []

    def credentials(self) -> list[tuple[str, str]] | None:
        if not self.auth:
            return None
        path = Path(self.auth).expanduser()
        lines = path.read_text(encoding="utf-8").splitlines() if path.is_file() else [self.auth]
        pairs = []
        for line in lines:
            if line.strip():
                user, sep, password = line.strip().partition(":")
                if not sep or not user or not password:
                    raise ConfigError("auth: expected user:password")
                pairs.append((user, password))
        return pairs


@dataclass
class AppContext:
    """What pages share: the workspace (path checks), the job runner and the app's own folders."""

    workspace: object  # ui.workspace.Workspace
    runner: object  # ui.runner.JobRunner
    demo_config: dict | None = None  # the training form's values for --demo
