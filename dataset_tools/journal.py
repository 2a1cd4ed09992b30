"""Write-ahead journal of caption edits, so every bulk edit (and every tagging run) can be undone.

Before a file is changed, its exact previous bytes (or "did not exist") and the hash of the new bytes
are appended to the operation's journal and fsynced; only then is the file replaced atomically. A
crash therefore leaves each file either as it was or as intended, and undo can restore all of them
byte for byte. The first time a caption is changed, its original is also copied to `backup/`, which
is never overwritten. An operation whose every file was written ends with a commit line; one that
failed or was interrupted has none and is listed as incomplete, and undo still restores what it changed.

A journal arrives with the dataset (a downloaded folder can bring one), so every entry is untrusted
input: it is parsed and checked whole (each path relative, normalised, inside the dataset folder with
every link followed) before undo writes anything, and a bad entry is refused with a message naming it.
"""
from __future__ import annotations

import base64
import binascii
import hashlib
import json
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

from loratrain.core.errors import ConfigError
from loratrain.core.images import STATE_DIR
from loratrain.core.safe_io import atomic_write_bytes

#: entries of this format end with a {"commit": true} line once every file was written; older ones never do
FORMAT = 2
_SHA256 = re.compile(r"^[0-9a-f]{64}$")


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _read(path: Path) -> bytes | None:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        return None


def _printable(text: str) -> str:
    """`text` with control characters escaped, so a journal's text cannot drive the terminal it is printed to."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def _within(path: Path, folder: Path) -> bool:
    return path == folder or folder in path.parents


def _text_problem(rel: str) -> bool:
    """Whether `rel` is anything but a plain, normalised, relative path of the dataset (never its state folder)."""
    if not rel or "\x00" in rel or "\\" in rel or rel.startswith(("/", "~")) or os.path.isabs(rel):
        return True
    parts = rel.split("/")
    return any(p in ("", ".", "..") for p in parts) or parts[0] == STATE_DIR


@dataclass
class Entry:
    """One journal file, parsed and checked: its records name only files inside the dataset."""

    id: str
    path: Path
    header: dict
    records: list[dict]
    committed: bool
    failed: str | None = None

    @property
    def incomplete(self) -> bool:
        return self.header.get("format", 1) >= FORMAT and not self.committed


class Journal:
    """The journal of one dataset folder (`<root>/.loratrain/`)."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(os.path.realpath(root))
        self.state = self.root / STATE_DIR
        self.journal_dir = self.state / "journal"
        self.backup_dir = self.state / "backup"

    # ---- paths ---------------------------------------------------------------------------------------------
    def escapes(self, rel: str) -> bool:
        """Whether `root/rel`, or any folder or link on the way to it, resolves outside the dataset folder."""
        path = self.root
        for part in rel.split("/"):
            path = path / part
            if not _within(Path(os.path.realpath(path)), self.root):
                return True
        return False

    def _check_state(self) -> None:
        for folder in (self.state, self.journal_dir, self.backup_dir):
            if self.escapes(folder.relative_to(self.root).as_posix()):
                raise ConfigError(f"{folder} links outside the dataset folder {self.root}; refusing to use it (remove the link)")

    def relative(self, path: Path) -> str:
        try:
            return Path(path).resolve().relative_to(self.root).as_posix()
        except ValueError:
            raise ConfigError(f"{path} is outside the dataset folder {self.root}") from None

    # ---- writing -------------------------------------------------------------------------------------------
    def begin(self, op: str, description: str) -> Operation:
        self._check_state()
        self.journal_dir.mkdir(parents=True, exist_ok=True)
        numbers = [int(p.name.split(".")[0]) for p in self.journal_dir.glob("*.jsonl") if p.name.split(".")[0].isdigit()]
        path = self.journal_dir / f"{max(numbers, default=0) + 1:06d}.jsonl"
        header = {"op": op, "description": description, "time": time.strftime("%Y-%m-%d %H:%M:%S"), "format": FORMAT}
        with open(path, "x", encoding="utf-8") as fh:
            fh.write(json.dumps(header) + "\n")
            fh.flush()
            os.fsync(fh.fileno())
        return Operation(self, path)

    # ---- reading -------------------------------------------------------------------------------------------
    def entries(self) -> list[Path]:
        """Operations that can still be undone, newest last."""
        if not self.journal_dir.is_dir():
            return []
        return sorted(p for p in self.journal_dir.glob("*.jsonl") if p.name.split(".")[0].isdigit() and p.name.count(".") == 1)

    def load(self, path: Path) -> Entry:
        """Parse and check one entry; a ConfigError naming it if anything in it is malformed or names a file outside."""
        entry = _parse(path)
        for r in entry.records:
            if _text_problem(r["path"]) or self.escapes(r["path"]):
                raise ConfigError(f"journal entry {entry.id} names a file outside the dataset: {r['path']!r}; nothing was "
                                  f"changed (delete {path} if this edit was not made here)")
        return entry

    def history(self) -> list[dict]:
        self._check_state()
        out = []
        for path in self.entries():
            entry = self.load(path)
            item = {**entry.header, "id": entry.id, "files": len({r["path"] for r in entry.records}),
                    "status": "incomplete" if entry.incomplete else "done"}
            if entry.incomplete:
                why = f"failed: {entry.failed}" if entry.failed else "interrupted, or still running"
                item["description"] = f"{entry.header['description']} [incomplete: {why}; undo restores the files it changed]"
            out.append(item)
        return out

    def undo(self, force: bool = False) -> UndoResult:
        """Restore every file of the newest operation to its bytes before it."""
        self._check_state()
        entries = self.entries()
        if not entries:
            raise ConfigError(f"{self.root}: nothing to undo (no journalled edits)")
        path = entries[-1]
        entry = self.load(path)  # every record checked before anything is written
        header = entry.header
        before: dict[str, bytes | None] = {}
        after: dict[str, str] = {}
        for r in entry.records:
            before.setdefault(r["path"], r["before"])
            after[r["path"]] = r["after"]
        conflicts = []
        for rel, want in after.items():
            current = _read(self.root / rel)
            if current == before[rel]:
                continue  # never written (crash or failure before the write) or already restored
            if current is None or _sha(current) != want:
                conflicts.append(rel)
        if conflicts and not force:
            raise ConfigError(
                f"{len(conflicts)} caption(s) changed since '{header['description']}' ({', '.join(map(_printable, conflicts[:5]))}"
                f"{', ...' if len(conflicts) > 5 else ''}); undo would lose those changes. Pass --force to undo anyway "
                f"(originals are also kept in {self.backup_dir})")
        restored = 0
        for rel, old in before.items():
            if self.escapes(rel):  # checked above; again right before the write, in case a link changed meanwhile
                raise ConfigError(f"journal entry {entry.id} names a file outside the dataset: {rel!r}; {restored} file(s) "
                                  "were restored before this was noticed")
            target = self.root / rel
            if old is None:
                if target.exists() or target.is_symlink():
                    target.unlink()
                    restored += 1
            elif _read(target) != old:
                atomic_write_bytes(target, old)
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
    failed: BaseException | None = None
    _backed_up: set[str] = field(default_factory=set)

    def write(self, changes: dict[Path, bytes]) -> int:
        """Journal the previous state of `changes`' files, then replace each atomically.

        If anything fails, the operation is marked failed (history lists it as incomplete) and the error raised."""
        if self.failed is not None:
            raise RuntimeError(f"journal operation {self.path.stem} already failed ({self.failed}); begin a new one")
        try:
            return self._write(changes)
        except BaseException as e:
            self.failed = e
            if self.recorded:
                try:  # best effort (the disk may be full): history then says why it is incomplete
                    self._append([{"failed": str(e) or e.__class__.__name__}])
                except OSError:
                    pass
            raise

    def _write(self, changes: dict[Path, bytes]) -> int:
        records = []
        todo = []
        for target, data in changes.items():
            target = Path(target)
            old = _read(target)
            if old == data:
                continue
            rel = self.journal.relative(target)
            if _text_problem(rel):  # the journal's own folder (or the dataset itself): undo would refuse such a record
                raise ConfigError(f"{target}: inside the dataset's {STATE_DIR}/ folder (its undo journal and backups) or "
                                  "not a file of it; refusing to change it")
            if old is not None and rel not in self._backed_up:
                backup = self.journal.backup_dir / rel
                if self.journal.escapes(f"{STATE_DIR}/backup/{rel}"):
                    raise ConfigError(f"{backup} links outside the dataset folder {self.journal.root}; refusing to write it")
                if not backup.exists():
                    atomic_write_bytes(backup, old)
                self._backed_up.add(rel)
            records.append({"path": rel, "before": None if old is None else base64.b64encode(old).decode("ascii"),
                            "after": _sha(data)})
            todo.append((target, data))
        if not records:
            return 0
        self._append(records)
        self.recorded += len(records)
        for target, data in todo:
            atomic_write_bytes(target, data)
            self.written += 1
        return len(todo)

    def finish(self) -> None:
        """Mark the operation complete (or, if it recorded nothing, leave no journal entry behind).

        An operation that failed gets no commit line: history lists it as incomplete, undo restores what it changed."""
        if self.recorded == 0:
            self.path.unlink(missing_ok=True)
        elif self.failed is None:
            try:
                self._append([{"commit": True}])
            except OSError:
                pass  # every file is written; the entry only shows as incomplete, and undo works the same

    def _append(self, lines: list[dict]) -> None:
        with open(self.path, "a", encoding="utf-8") as fh:
            fh.write("".join(json.dumps(r) + "\n" for r in lines))
            fh.flush()
            os.fsync(fh.fileno())


def _parse(path: Path) -> Entry:
    """An entry's header and records, every field checked; paths are checked by `Journal.load`."""
    eid = path.name.split(".")[0]

    def bad(why: str) -> ConfigError:
        return ConfigError(f"journal entry {eid} is malformed: {why}; nothing was changed (delete {path} if this edit "
                           "was not made here)")

    if path.is_symlink():
        raise bad("it is a link")
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError:
        raise bad("it is not UTF-8 text") from None
    except OSError as e:
        raise ConfigError(f"journal entry {eid} cannot be read: {e.strerror or e} ({path})") from None
    lines = text.split("\n")
    torn = lines.pop()  # "" when the file ends with a newline, else a line a crash cut short
    if torn:
        try:
            json.loads(torn)
            lines.append(torn)  # complete after all, only its newline is missing
        except json.JSONDecodeError:
            pass  # torn by a crash while it was appended: the files it names were not written yet
    objects = []
    for n, line in enumerate(lines, 1):
        try:
            obj = json.loads(line)
        except (json.JSONDecodeError, RecursionError):
            raise bad(f"line {n} is not valid JSON") from None
        if not isinstance(obj, dict):
            raise bad(f"line {n} is not a JSON object")
        objects.append((n, obj))
    if not objects:  # a crash while the header was written: the operation never began
        header: dict = {"op": "?", "description": "(interrupted before it began)", "time": "?", "format": FORMAT}
        return Entry(eid, path, header, [], committed=False)
    _, header = objects[0]
    for key in ("op", "description", "time"):
        if not isinstance(header.get(key), str):
            raise bad(f"line 1 (the header) has no text '{key}'")
        header[key] = _printable(header[key])
    if not isinstance(header.get("format", 1), int) or isinstance(header.get("format"), bool):
        raise bad("line 1 (the header) has a 'format' that is not a number")
    records: list[dict] = []
    committed = False
    failed = None
    for n, obj in objects[1:]:
        if committed:
            raise bad(f"line {n} follows the commit line")
        if "commit" in obj:
            if obj != {"commit": True}:
                raise bad(f"line {n} is not a valid commit line")
            committed = True
            continue
        if "failed" in obj:
            if not isinstance(obj["failed"], str) or len(obj) != 1:
                raise bad(f"line {n} is not a valid failure line")
            failed = _printable(obj["failed"])
            continue
        records.append(_record(obj, n, bad))
    return Entry(eid, path, header, records, committed=committed, failed=failed)


def _record(obj: dict, n: int, bad) -> dict:
    """{"path": str, "before": bytes | None, "after": sha256 hex} of one checked record line."""
    for key in ("path", "before", "after"):
        if key not in obj:
            raise bad(f"line {n} has no '{key}'")
    rel, before, after = obj["path"], obj["before"], obj["after"]
    if not isinstance(rel, str):
        raise bad(f"line {n}: 'path' is not text")
    if not isinstance(after, str) or not _SHA256.match(after):
        raise bad(f"line {n}: 'after' is not a SHA-256 hex digest")
    if before is not None:
        if not isinstance(before, str):
            raise bad(f"line {n}: 'before' is neither text nor null")
        try:
            before = base64.b64decode(before, validate=True)
        except (binascii.Error, ValueError):
            raise bad(f"line {n}: 'before' is not valid base64") from None
    return {"path": rel, "before": before, "after": after}
