"""Which paths a job may open: one resolver for every path a job touches, checked where the file is opened.

The CLI runs with no roots: a path means what it says, but a *name* (output_name, model_name, toml_name,
a job id) is still one path component. The app runs every job in a worker process confined to the
workspace roots the app hands it (`confine_to`, from the worker's environment, never from a file): then every path the job opens
(an option, a name joined to a folder, a path read from a TOML, JSON, journal or state file, a dataset
subfolder and what it links to, a cache file, a grid axis value, a LoRA spec) is resolved the way the OS
will open it (relative to the working folder, `~` expanded, every symlink followed) and refused unless it
lies inside a root and outside the app's own folders. `install_guard` adds an audit hook to the worker
that refuses any Python-level write outside the roots too, so an option that forgets to call `confine`
still cannot write elsewhere.
"""
from __future__ import annotations

import os
import re
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import ConfigError, Problem

#: what the app's job ids look like (ui/runner.py makes them): nothing else names a job folder
JOB_ID = re.compile(r"^\d{8}-\d{6}-[0-9a-f]{6}$")
MAX_PATH = 4096


@dataclass(frozen=True)
class Policy:
    roots: tuple[Path, ...] = ()  # empty: not confined (the CLI)
    denied: tuple[Path, ...] = ()  # inside a root but never a job's to open (the app's jobs folder)
    scratch: tuple[Path, ...] = ()  # where the worker itself may write besides the roots (its job folder, caches)
    base: Path | None = None  # what a relative path is relative to (None: the working folder)


_process = Policy()  # the worker's: every thread of the job process
_here: ContextVar[Policy | None] = ContextVar("loratrain_path_policy", default=None)  # the app's, for one request


def _make(roots: Any, denied: Any = (), scratch: Any = (), base: Any = None) -> Policy:
    return Policy(tuple(Path(os.path.realpath(r)) for r in roots), tuple(Path(os.path.realpath(d)) for d in denied),
                  tuple(Path(os.path.realpath(s)) for s in scratch), Path(base) if base else None)


def confine_to(roots: list[str | Path], denied: list[str | Path] = (), scratch: list[str | Path] = (),
               base: str | Path | None = None) -> None:
    """Confine this whole process to `roots` (the app's worker before it builds the job; the app itself)."""
    global _process
    _process = _make(roots, denied, scratch, base)


def unconfine() -> None:
    """Back to the CLI's policy (tests)."""
    global _process
    _process = Policy()


@contextmanager
def confined(roots: Any, denied: Any = (), base: Any = None) -> Iterator[None]:
    """Confine the code of this block (this thread and context only): the app checks a request's config with the same
    rules its worker will apply (relative paths from `base`, the worker's working folder), without confining the
    app's own process."""
    token = _here.set(_make(roots, denied, base=base or (list(roots)[0] if roots else None)))
    try:
        yield
    finally:
        _here.reset(token)


@contextmanager
def trusted() -> Iterator[None]:
    """The app's own bookkeeping (its job records): written by the app itself, never at a path a user gave."""
    token = _here.set(Policy())
    try:
        yield
    finally:
        _here.reset(token)


def _current() -> Policy:
    return _here.get() or _process


def roots() -> tuple[Path, ...]:
    return _current().roots


def within(path: Path, folder: Path) -> bool:
    return path == folder or folder in path.parents


def text_problem(text: str) -> str | None:
    """What makes a path string unusable before it is even resolved."""
    if not text.strip():
        return "empty"
    if "\x00" in text:
        return "contains a NUL character"
    if any(ord(c) < 32 or ord(c) == 127 for c in text):
        return f"{text!r} contains a control character (a newline, tab, ...); a file name cannot"
    if len(text) > MAX_PATH:
        return f"is longer than {MAX_PATH} characters"
    if "://" in text or text.startswith("file:"):
        return f"{text!r} is a URL; give a path"
    return None


def real(value: str | Path, base: Path | None = None) -> Path:
    """The absolute path the OS opens for `value`: `~` expanded, relative to `base` (default: the working folder),
    every link followed (also in missing trailing parts)."""
    path = os.path.expanduser(str(value))
    return Path(os.path.realpath(os.path.join(base, path) if base else path))


def confine(value: str | Path, what: str, *, write: bool = False) -> Path:
    """`value` unchanged (as a Path) when this process may open it, else a ConfigError naming `what`.

    Not confined (the CLI), only unusable strings are refused. Confined (an app job), the real path must
    lie inside a root and outside the app's own folders."""
    text = str(value)
    problem = text_problem(text)
    if problem:
        raise ConfigError(f"{what}: {problem}")
    _policy = _current()
    if not _policy.roots:
        return Path(value)
    path = real(text, _policy.base)
    if any(within(path, s) for s in _policy.scratch):
        return Path(value)  # the job's own folder (its events, its temp files)
    if not any(within(path, root) for root in _policy.roots):
        raise ConfigError(f"{what}: {text!r} is outside the workspace ({describe(_policy)}); the app "
                          f"{'writes' if write else 'reads'} only there (start it with --root to add folders)")
    for denied in _policy.denied:
        if within(path, denied):
            raise ConfigError(f"{what}: {text!r} is inside the app's own folder {denied}; jobs may not open it")
    return Path(value)


def locate(value: str | Path) -> Path:
    """`value` as this code will find it: relative paths from the policy's base (the app checking a request for a
    job that will run in the workspace), else from the working folder."""
    base = _current().base
    path = Path(os.path.expanduser(str(value)))
    return base / path if base and not path.is_absolute() else path


def describe(policy: Policy | None = None) -> str:
    return ", ".join(str(r) for r in (policy or _current()).roots)


# ---- names -------------------------------------------------------------------------------------------------
def name_problem(value: str) -> str | None:
    """Why `value` is not one path component (a file name joined to a folder), or None."""
    if value in ("", None):
        return None  # "not set"; the option's own rules say whether it is required
    text = str(value)
    if "\x00" in text:
        return "contains a NUL character"
    if "/" in text or "\\" in text:
        return f"{text!r} must be a file name, not a path (no / or \\)"
    if text in (".", "..") or text.strip(" .") == "":
        return f"{text!r} is not a file name"
    if text.startswith("~"):
        return f"{text!r} must be a file name (a leading ~ means a home folder)"
    if len(text.encode("utf-8", "surrogateescape")) > 200:
        return f"{text[:40]!r}... is longer than 200 bytes"
    return None


def check_name(value: str, what: str) -> str:
    problem = name_problem(value)
    if problem:
        raise ConfigError(f"{what}: {problem}")
    return value


# ---- a config's path options -------------------------------------------------------------------------------
REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?$")


def is_model_name(value: str, home: Path | None = None) -> bool:
    """`org/name` or `name` that is no file or folder: a model name (e.g. a tagger's repo id), which loaders look up in
    the local Hugging Face cache, never a path."""
    if text_problem(value) or not REPO_ID.match(value) or value in (".", ".."):
        return False
    base = home if home is not None else Path.cwd()
    try:
        return not (base / value).exists()
    except OSError:  # a name too long to be a file is no model name either
        return False


def _exists(text: str) -> bool:
    try:
        return locate(text).exists()
    except OSError:  # too long a name, a loop of links: not an existing file
        return False


def split_spec(text: str, kind: str) -> tuple[str, str, str]:
    """(path, separator, rest) of a value that carries more than a path: `lora` PATH:WEIGHT[:BLOCKS],
    `concept` FOLDER=TOKENS; other kinds are the path whole."""
    if kind == "lora" and not text_problem(text) and not _exists(text):
        from .lora.spec import parse_lora_spec

        path = parse_lora_spec(text).path
        return path, text[len(path):len(path) + 1], text[len(path) + 1:]
    if kind == "concept" and "=" in text:
        head, _, tail = text.rpartition("=")
        return head, "=", tail
    return text, "", ""


def path_values(cfg_cls: Any, values: dict[str, Any]) -> list[tuple[str, str, str]]:
    """(field, kind, path) for every path a config's values name (LoRA specs and concepts split to their paths)."""
    out = []
    for name in cfg_cls.model_fields:
        kind = cfg_cls.extra(name).get("path")
        value = values.get(name)
        if not kind or kind == "name" or value in (None, "", []) or (kind == "state" and value == "latest"):
            continue
        for item in value if isinstance(value, list) else [value]:
            if kind == "any" and is_model_name(str(item)):
                continue
            try:
                head = split_spec(str(item), kind)[0]
            except ConfigError as e:
                out.append((name, "error", str(e)))
                continue
            out.append((name, kind, head))
    return out


def config_problems(cfg: Any) -> list[Problem]:
    """Every path option of a built config that this process may not open (all of them, each named)."""
    problems: list[Problem] = []
    for name, kind, path in path_values(type(cfg), cfg.model_dump()):
        if kind == "error":
            problems.append((name, path))
            continue
        try:
            confine(path, name, write=kind == "output")
        except ConfigError as e:
            problems.append((name, str(e).split(": ", 1)[1]))
    return problems


# ---- folders other programs write into ----------------------------------------------------------------------
class HeldDir:
    """A folder opened once, without following a link, for files another program (ffmpeg) writes there.

    The program is handed `/proc/PID/fd/N/NAME`, which names the folder this process opened and checked, not
    whatever the folder's path points to later: swapping the folder for a link out after the check changes
    nothing (another program's opens are out of the audit hook's sight, so the path alone is not enough)."""

    def __init__(self, folder: str | Path, what: str) -> None:
        self.folder = confine(folder, what, write=True)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.fd = os.open(self.folder, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
        self.proc = os.path.isdir(f"/proc/{os.getpid()}/fd")
        try:
            if self.proc:
                confine(os.readlink(f"/proc/self/fd/{self.fd}"), what, write=True)  # what was really opened
        except ConfigError:
            os.close(self.fd)
            raise

    def path(self, name: str) -> str:
        """What to give the other program for the file `name` in this folder."""
        check_name(name, "file name")
        return f"/proc/{os.getpid()}/fd/{self.fd}/{name}" if self.proc else str(self.folder / name)

    def write_text(self, name: str, text: str) -> None:
        fd = os.open(check_name(name, "file name"), os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o666,
                     dir_fd=self.fd)
        with open(fd, "w", encoding="utf-8") as fh:
            fh.write(text)

    def fsync(self, name: str) -> None:
        fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW, dir_fd=self.fd)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def replace(self, src: str, dst: str) -> None:
        os.replace(src, dst, src_dir_fd=self.fd, dst_dir_fd=self.fd)

    def unlink(self, name: str) -> None:
        try:
            os.unlink(name, dir_fd=self.fd)
        except FileNotFoundError:
            pass

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


# ---- the worker's backstop ---------------------------------------------------------------------------------
_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND
_WRITE_EVENTS = {"os.remove": 0, "os.rmdir": 0, "os.mkdir": 0, "shutil.rmtree": 0, "os.truncate": 0, "os.chmod": 0,
                 "os.chown": 0, "os.utime": 0, "os.link": 1, "os.symlink": 1, "os.rename": None, "shutil.copyfile": 1,
                 "shutil.copytree": 1, "shutil.move": None}
_guarded = False


def _system_dirs() -> tuple[Path, ...]:
    """Where the interpreter, the libraries and the OS keep what they read (never a user's data)."""
    dirs = {sys.prefix, sys.base_prefix, sys.exec_prefix, "/usr", "/lib", "/lib64", "/lib32", "/bin", "/sbin", "/etc",
            "/proc", "/sys", "/dev", "/opt", "/run", "/var/lib", "/var/cache", "/snap", "/nix"}
    dirs |= {p for p in sys.path if p and os.path.isdir(p)}
    import importlib.util

    for name in ("loratrain", "loratrain.merge", "loratrain.dataset_tools", "loratrain.facetrain", "loratrain.ui",
                 "loratrain.configs"):  # an editable install maps these folders without putting them on sys.path
        try:
            spec = importlib.util.find_spec(name)
        except (ImportError, ValueError):
            continue
        dirs |= set(spec.submodule_search_locations or []) if spec else set()
    return tuple(Path(os.path.realpath(d)) for d in dirs)


def _cache_dirs() -> tuple[Path, ...]:
    """Where libraries keep caches a job may write (Hugging Face, torch, our hash cache)."""
    home = Path(os.path.expanduser("~"))
    dirs = [os.environ.get("XDG_CACHE_HOME") or home / ".cache", os.environ.get("HF_HOME"), os.environ.get("TORCH_HOME"),
            os.environ.get("TRITON_CACHE_DIR"), os.environ.get("TORCHINDUCTOR_CACHE_DIR"), "/dev/shm", "/dev/null"]
    return tuple(Path(os.path.realpath(d)) for d in dirs if d)


def _secrets() -> tuple[Path, ...]:
    """Credentials inside the cache folders a job may otherwise use (a Hugging Face token): never opened by a job."""
    hf = Path(os.environ.get("HF_HOME") or Path(os.path.expanduser("~")) / ".cache" / "huggingface")
    names = [hf / "token", hf / "stored_tokens", Path(os.path.expanduser("~")) / ".huggingface" / "token"]
    if os.environ.get("HF_TOKEN_PATH"):
        names.append(Path(os.environ["HF_TOKEN_PATH"]))
    return tuple(Path(os.path.realpath(n)) for n in names)


def install_guard() -> None:
    """Refuse, inside this process, every Python-level write outside the roots and scratch folders, and every read
    outside the roots and the system's own folders: the last line behind `confine`. Native code that opens files
    itself (safetensors, OpenCV, ffmpeg) is covered by `confine` at its call sites, not by this hook."""
    global _guarded
    _policy = _process
    if _guarded or not _policy.roots:
        return
    _guarded = True
    writable = _policy.roots + _policy.scratch + _cache_dirs()
    readable = writable + _system_dirs()
    denied = _policy.denied + _secrets()

    def allowed(path: Any, places: tuple[Path, ...]) -> bool:
        if isinstance(path, int) or path is None:
            return True  # an fd or dir_fd-relative open of something already opened
        try:
            p = Path(os.path.realpath(os.fsdecode(path)))
        except (TypeError, ValueError):
            return True
        if any(within(p, d) for d in denied) and not any(within(p, s) for s in _policy.scratch):
            return False
        return any(within(p, place) for place in places)

    def hook(event: str, args: tuple[Any, ...]) -> None:
        if event == "open":
            path, _mode, flags = (tuple(args) + (None, None, 0))[:3]
            write = bool((flags or 0) & _WRITE_FLAGS) or (isinstance(_mode, str) and any(c in _mode for c in "wax+"))
            if not allowed(path, writable if write else readable):
                raise PermissionError(f"{os.fsdecode(path)}: outside the workspace ({describe()}); this job may not "
                                      f"{'write' if write else 'read'} it")
            return
        index = _WRITE_EVENTS.get(event, -1)
        if index == -1:
            return
        targets = args[:2] if index is None else args[index:index + 1]
        for target in targets:
            if not allowed(target, writable):
                raise PermissionError(f"{os.fsdecode(target)}: outside the workspace ({describe()}); this job may not change it")

    sys.addaudithook(hook)
