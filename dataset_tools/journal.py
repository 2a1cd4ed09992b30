"""Write-ahead journal of caption edits, so every bulk edit (and every tagging run) can be undone.

Before a file is changed, its exact previous bytes (or "did not exist") and the hash of the new bytes
are appended to the operation's journal and fsynced; only then is the file replaced atomically. A
crash therefore leaves each file either as it was or as intended, and undo can restore all of them
byte for byte. The first time a caption is changed, its original is also copied to `backup/`, which
is never overwritten.
"""
from __future__ import annotations

import base64
import hashlib
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

from loratrain.core.config import ConfigError
from loratrain.core.images import STATE_DIR
from loratrain.core.safe_io import atomic_write_bytes


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _read(path: Path) -> bytes | None:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        return None


class Journal:
    """The journal of one dataset folder (`<root>/.loratrain/`)."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root).resolve()
        self.state = self.root / STATE_DIR
        self.journal_dir = self.state / "journal"
        self.backup_dir = self.state / "backup"

    def begin(self, op: str, description: str) -> "Operation":
        self.journal_dir.mkdir(parents=True, exist_ok=True)
        numbers = [int(p.name.split(".")[0]) for p in self.journal_dir.glob("*.jsonl") if p.name.split(".")[0].isdigit()]
        path = self.journal_dir / f"{max(numbers, default=0) + 1:06d}.jsonl"
        header = {"op": op, "description": description, "time": time.strftime("%Y-%m-%d %H:%M:%S")}
        with open(path, "x", encoding="utf-8") as fh:
            fh.write(json.dumps(header) + "\n")
            fh.flush()
            os.fsync(fh.fileno())
        return Operation(self, path)

    def relative(self, path: Path) -> str:
        try:
            return Path(path).resolve().relative_to(self.root).as_posix()
        except ValueError:
            raise ConfigError(f"{path} is outside the dataset folder {self.root}") from None

    def entries(self) -> list[Path]:
        """Operations that can still be undone, newest last."""
        if not self.journal_dir.is_dir():
            return []
        return sorted(p for p in self.journal_dir.glob("*.jsonl") if p.name.split(".")[0].isdigit() and p.name.count(".") == 1)

    def history(self) -> list[dict]:
        out = []
        for path in self.entries():
            header, records = _read_entry(path)
            out.append({**header, "id": path.stem, "files": len({r["path"] for r in records})})
        return out

    def undo(self, force: bool = False) -> "UndoResult":
        """Restore every file of the newest operation to its bytes before it."""
        entries = self.entries()
        if not entries:
            raise ConfigError(f"{self.root}: nothing to undo (no journalled edits)")
        path = entries[-1]
        header, records = _read_entry(path)
        before: dict[str, str | None] = {}
        after: dict[str, str] = {}
        for r in records:
            before.setdefault(r["path"], r["before"])
            after[r["path"]] = r["after"]
        conflicts = []
        for rel, want in after.items():
            current = _read(self.root / rel)
            old = before[rel]
            old_bytes = None if old is None else base64.b64decode(old)
            if current == old_bytes:
                continue  # never written (crash before the write) or already restored
            if current is None or _sha(current) != want:
                conflicts.append(rel)
        if conflicts and not force:
            raise ConfigError(
                f"{len(conflicts)} caption(s) changed since '{header.get('description')}' ({', '.join(conflicts[:5])}"
                f"{', ...' if len(conflicts) > 5 else ''}); undo would lose those changes. Pass --force to undo anyway "
                f"(originals are also kept in {self.backup_dir})")
        restored = 0
        for rel, old in before.items():
            target = self.root / rel
            if old is None:
                if target.exists():
                    target.unlink()
                    restored += 1
            else:
                data = base64.b64decode(old)
                if _read(target) != data:
                    atomic_write_bytes(target, data)
                    restored += 1
        os.replace(path, path.with_name(path.stem + ".undone.jsonl"))
        return UndoResult(header=header, restored=restored, files=len(before))


@dataclass
class UndoResult:
    header: dict
    restored: int
    files: int


@dataclass
class Operation:
    """One journalled bulk edit; `write` is the only way its files change."""

    journal: Journal
    path: Path
    written: int = 0
    recorded: int = 0
    _backed_up: set[str] = field(default_factory=set)

    def write(self, changes: dict[Path, bytes]) -> int:
        """Journal the previous state of `changes`' files, then replace each atomically."""
        records = []
        todo = []
        for target, data in changes.items():
            target = Path(target)
            old = _read(target)
            if old == data:
                continue
            rel = self.journal.relative(target)
            if old is not None and rel not in self._backed_up:
                backup = self.journal.backup_dir / rel
                if not backup.exists():
                    atomic_write_bytes(backup, old)
                self._backed_up.add(rel)
            records.append({"path": rel, "before": None if old is None else base64.b64encode(old).decode("ascii"),
                            "after": _sha(data)})
            todo.append((target, data))
        if not records:
            return 0
        with open(self.path, "a", encoding="utf-8") as fh:
            fh.write("".join(json.dumps(r) + "\n" for r in records))
            fh.flush()
            os.fsync(fh.fileno())
        self.recorded += len(records)
        for target, data in todo:
            atomic_write_bytes(target, data)
        self.written += len(todo)
        return len(todo)

    def finish(self) -> None:
        """An operation that recorded nothing leaves no journal entry behind."""
        if self.recorded == 0:
            self.path.unlink(missing_ok=True)


def _read_entry(path: Path) -> tuple[dict, list[dict]]:
    lines = path.read_text(encoding="utf-8").splitlines()
    header = json.loads(lines[0]) if lines else {}
    records = []
    for line in lines[1:]:
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            break  # a torn last line from a crash: its file was never written
    return header, records
