"""Pinned snapshots of a face model: `face snapshot save | list | restore` (docs/face-model.md#snapshots).

Backups in `backups/` rotate away; a recipe says "back up before every switch" and "roll back to the best",
which needs copies that stay. A snapshot is a folder MODEL_DIR/snapshots/NAME/ holding the model, its optimizer
state and the plan state as they were, plus `snapshot.json` (when, at which iteration, why). Nothing prunes it.

Restoring first pins the current files as `before-restore-<time>`, so a restore is itself undone by restoring
that snapshot. Each file is copied to a temp file beside its target and only then renamed over it (all copies
are made before the first rename), and files the snapshot lacks (a plan state made later) are removed, so the
model folder ends up exactly as it was when the snapshot was taken.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

from loratrain.core.config import JobConfig, opt
from loratrain.core.errors import ConfigError, Problem
from loratrain.core.jobs import JobResult, job
from loratrain.core.paths import check_name, confine
from loratrain.core.progress import Reporter, StopFlag
from loratrain.core.safe_io import atomic_dir, temp_name

FOLDER = "snapshots"
INFO = "snapshot.json"
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")
OPS = ("save", "list", "restore")


def model_files(model_name: str) -> list[str]:
    """The files that make a model's resumable state: weights, optimizer state, plan state."""
    return [f"{model_name}.safetensors", f"{model_name}.state.safetensors", f"{model_name}.plan_state.json"]


def snapshot_name(name: str) -> str:
    """`name` when it can be a snapshot folder: one path component of letters, digits, `.`, `_`, `-` (no leading
    dot: temp folders start with one)."""
    check_name(name, "snapshot name")
    if not NAME.match(name or ""):
        raise ConfigError(f"snapshot name {name!r}: use letters, digits, '.', '_' and '-' (up to 100, not starting "
                          "with '.' or '-')")
    return name


def slug(text: str) -> str:
    """A phase name as a snapshot name part: `Warp off!` -> `warp-off`."""
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:60] or "phase"


def free_name(model_dir: Path, name: str) -> str:
    """`name`, or `name-2`, `name-3`, ... when a snapshot of that name exists (pinned snapshots are never replaced)."""
    base, k = name, 1
    while (model_dir / FOLDER / name).exists():
        k += 1
        name = f"{base}-{k}"
    return name


def _iteration(path: Path) -> int | None:
    from .train.state import CONFIG_KEY

    try:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            return int(json.loads((f.metadata() or {})[CONFIG_KEY])["iteration"])
    except Exception:
        return None


def save_snapshot(model_dir: str | Path, name: str, model_name: str = "face", note: str = "") -> Path:
    """Pin the model's current files under snapshots/NAME/ (refused when NAME exists: snapshots are never replaced)."""
    folder = confine(model_dir, "model folder")
    name, model_name = snapshot_name(name), check_name(model_name, "model_name")
    model = folder / f"{model_name}.safetensors"
    if not model.is_file():
        raise ConfigError(f"{model}: no model to snapshot (train one first, or give --model_name)")
    target = folder / FOLDER / name
    if target.exists():
        raise ConfigError(f"snapshot {name!r} exists in {folder / FOLDER}; snapshots are never replaced: choose another name")
    files = [f for f in model_files(model_name) if (folder / f).is_file()]
    sources = {f: confine(folder / f, "model file") for f in files}  # a model file linking out is refused, not read
    with atomic_dir(confine(target, "snapshot", write=True)) as tmp:
        for f in files:
            shutil.copy2(sources[f], tmp / f)
        info = {"name": name, "created": time.time(), "iteration": _iteration(model), "model_name": model_name,
                "files": files, "note": note[:500]}
        (tmp / INFO).write_text(json.dumps(info, indent=1), encoding="utf-8")
    return target


def list_snapshots(model_dir: str | Path) -> list[dict]:
    """Every snapshot of the folder, oldest first: name, created (epoch seconds), iteration, note."""
    folder = confine(model_dir, "model folder") / FOLDER
    out = []
    for entry in sorted(folder.iterdir()) if folder.is_dir() else []:
        if not entry.is_dir() or not NAME.match(entry.name):
            continue
        try:
            info = json.loads((entry / INFO).read_text(encoding="utf-8"))
            info = info if isinstance(info, dict) else {}
        except (OSError, ValueError):
            info = {}
        created = info.get("created")
        out.append({"name": entry.name, "created": float(created) if isinstance(created, (int, float)) else entry.stat().st_mtime,
                    "iteration": info.get("iteration") if isinstance(info.get("iteration"), int) else None,
                    "note": str(info.get("note", ""))[:500]})
    return sorted(out, key=lambda s: (s["created"], s["name"]))


def restore_snapshot(model_dir: str | Path, name: str, model_name: str = "face") -> tuple[Path, str | None]:
    """Put snapshot NAME's files back (after pinning the current ones as `before-restore-<time>`).

    Returns the snapshot folder and the name of the undo snapshot (None when there was no model to keep)."""
    folder = confine(model_dir, "model folder")
    name, model_name = snapshot_name(name), check_name(model_name, "model_name")
    source = folder / FOLDER / name
    if not source.is_dir():
        known = ", ".join(s["name"] for s in list_snapshots(folder)) or "none"
        raise ConfigError(f"no snapshot {name!r} in {folder / FOLDER} (snapshots: {known})")
    wanted = model_files(model_name)
    present = [f for f in wanted if (source / f).is_file()]
    # a snapshot's files are input like any other: one linking out of the workspace is refused, not copied in,
    # and the weights must be a face model of ours (a restore must leave a loadable model)
    sources = {f: confine(source / f, "snapshot file") for f in present}
    for f in present:
        if (source / f).is_symlink():
            raise ConfigError(f"{source / f}: a link inside a snapshot; snapshots hold plain files only")
    if f"{model_name}.safetensors" not in present:
        raise ConfigError(f"snapshot {name!r} holds no {model_name}.safetensors (another --model_name?)")
    if _iteration(sources[f"{model_name}.safetensors"]) is None:
        raise ConfigError(f"{source / (model_name + '.safetensors')}: not a loratrain face model; nothing was restored")
    undo = None
    if (folder / f"{model_name}.safetensors").is_file():
        undo = free_name(folder, time.strftime("before-restore-%Y%m%d-%H%M%S"))
        save_snapshot(folder, undo, model_name, note=f"the files before restoring {name}")
    staged: list[tuple[Path, Path]] = []
    try:
        for f in present:  # every copy made and synced before the first rename
            tmp = temp_name(folder / f)
            shutil.copy2(sources[f], tmp)
            with open(tmp, "rb") as fh:
                os.fsync(fh.fileno())
            staged.append((tmp, folder / f))
        for tmp, target in staged:
            os.replace(tmp, target)
        for f in set(wanted) - set(present):
            (folder / f).unlink(missing_ok=True)
    finally:
        for tmp, _ in staged:
            tmp.unlink(missing_ok=True)
    return source, undo


# ---------------------------------------------------------------- the jobs


class SnapshotConfig(JobConfig):
    op: str = opt("list", "save, list or restore", choices=OPS)
    model_dir: str = opt("", "folder of the face model", positional=True, path="dir")
    name: str = opt("", "snapshot name (one path component: letters, digits, . _ -)", positional=True, path="name")
    model_name: str = opt("face", "file name stem of the model (as in face train)", path="name")
    note: str = opt("", "why this snapshot was taken (shown by list)")

    def problems(self) -> list[Problem]:
        if self.name and not NAME.match(self.name):
            return [("name", f"{self.name!r}: use letters, digits, '.', '_' and '-' (not starting with '.' or '-')")]
        return []

    def requirements(self) -> list[Problem]:
        out = [] if self.model_dir else [("model_dir", "is required")]
        if self.op != "list" and not self.name:
            out.append(("name", f"is required for snapshot {self.op}"))
        if self.op == "list" and self.model_dir and not Path(self.model_dir).is_dir():  # not "no snapshots": a typo
            out.append(("model_dir", f"folder not found: {self.model_dir}"))
        return out


@dataclass
class SnapshotResult(JobResult):
    lines: list[str] = field(default_factory=list)
    snapshots: list[dict] = field(default_factory=list)

    def summary(self) -> list[str]:
        return list(self.lines)


@job
def run_face_snapshot(cfg: SnapshotConfig, reporter: Reporter, stop: StopFlag) -> SnapshotResult:
    """Save, list or restore pinned snapshots of a face model.

    reporter: one log line per action. stop: not used (each action is one short copy).
    Result: what was done, and the snapshots (for list).
    """
    result = SnapshotResult()
    if cfg.op == "save":
        path = save_snapshot(cfg.model_dir, cfg.name, cfg.model_name, cfg.note)
        result.lines.append(f"snapshot {cfg.name} saved: {path}")
    elif cfg.op == "restore":
        _, undo = restore_snapshot(cfg.model_dir, cfg.name, cfg.model_name)
        result.lines.append(f"restored snapshot {cfg.name} into {cfg.model_dir}")
        if undo:
            result.lines.append(f"the files before it are snapshot {undo} (undo: face snapshot restore {cfg.model_dir} {undo})")
    result.snapshots = list_snapshots(cfg.model_dir)
    if cfg.op == "list":
        result.lines += [f"{s['name']}\titeration {s['iteration'] if s['iteration'] is not None else '?'}\t"
                         f"{time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(s['created']))}"
                         + (f"\t{s['note']}" if s["note"] else "") for s in result.snapshots] or ["no snapshots"]
    for line in result.lines if cfg.op != "list" else []:  # a listing is the summary: printed once
        reporter.log(line)
    return result
