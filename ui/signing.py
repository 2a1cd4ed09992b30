"""The app's own job records, told apart from anything else in the jobs folder.

The jobs folder lies inside the workspace, where a downloaded dataset or archive can put files too. So
the app signs every `job.json` and `state.json` it writes with a key of its own (HMAC-SHA256), kept outside
every workspace in a private file (`$LORATRAIN_STATE_DIR`, else `$XDG_STATE_HOME/loratrain`, else
`~/.local/state/loratrain`, file `ui.key`, mode 0600). A record that does not verify is no job: it is
never listed, launched, stopped or killed, and a worker refuses to run it.
"""
from __future__ import annotations

import hashlib
import hmac
import json
import os
import secrets
from pathlib import Path
from typing import Any

KEY_FILE = "ui.key"
SIG = "sig"


def state_dir() -> Path:
    explicit = os.environ.get("LORATRAIN_STATE_DIR")
    if explicit:
        return Path(explicit)
    base = os.environ.get("XDG_STATE_HOME") or os.path.join(os.path.expanduser("~"), ".local", "state")
    return Path(base) / "loratrain"


def app_key() -> bytes:
    """The key, made on first use (32 random bytes, readable by this user only)."""
    path = state_dir() / KEY_FILE
    try:
        key = path.read_bytes()
        if len(key) >= 32:
            return key
    except FileNotFoundError:
        pass
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    tmp = path.with_name(f".{KEY_FILE}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.write(fd, secrets.token_bytes(32))
        os.fsync(fd)
    finally:
        os.close(fd)
    try:
        os.link(tmp, path)  # never replaces a key another process made meanwhile
    except FileExistsError:
        pass
    finally:
        tmp.unlink()
    return path.read_bytes()


def _digest(data: dict[str, Any], key: bytes) -> str:
    body = json.dumps({k: v for k, v in data.items() if k != SIG}, sort_keys=True, separators=(",", ":"), default=str)
    return hmac.new(key, body.encode("utf-8"), hashlib.sha256).hexdigest()


def signed(data: dict[str, Any], key: bytes | None = None) -> dict[str, Any]:
    return {**data, SIG: _digest(data, key or app_key())}


def verified(data: Any, key: bytes | None = None) -> bool:
    return isinstance(data, dict) and isinstance(data.get(SIG), str) and hmac.compare_digest(data[SIG], _digest(data, key or app_key()))
