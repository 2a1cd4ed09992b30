"""A1111-compatible merge metadata (`sd_merge_recipe`, `sd_merge_models`) and model hashes.

A1111 keys `sd_merge_models` by each input's full-file SHA-256 and keeps the old 8-hex "legacy"
hash beside it; it also flattens the inputs' own ancestry into the same map, so a chain of merges
stays traceable. We write the same fields so A1111's UI and civitai read them.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

from loratrain.core.safe_io import atomic_write_json


def _cache_file() -> Path:
    root = os.environ.get("LORATRAIN_CACHE") or os.path.join(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache", "loratrain")
    return Path(root) / "sha256.json"


def _stamp(path: Path) -> dict[str, int]:
    st = path.stat()
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns}


def _read_cache() -> dict[str, Any]:
    try:
        return json.loads(_cache_file().read_text())
    except (OSError, ValueError):
        return {}


def cached_sha256(path: Path) -> str | None:
    """A full-file hash computed before, if the file is unchanged (A1111 keeps the same kind of cache)."""
    entry = _read_cache().get(str(path.resolve()))
    if entry and {k: entry.get(k) for k in ("size", "mtime_ns")} == _stamp(path):
        return entry.get("sha256")
    return None


def remember_sha256(path: Path, sha: str) -> str:
    try:
        cache = _read_cache()
        cache[str(path.resolve())] = {**_stamp(path), "sha256": sha}
        atomic_write_json(_cache_file(), cache)
    except OSError:
        pass  # a read-only home only costs a re-hash next time
    return sha


def legacy_hash(path: Path) -> str:
    """A1111's pre-2023 model hash: SHA-256 of 64 KiB at offset 1 MiB, first 8 hex digits."""
    with open(path, "rb") as fh:
        fh.seek(0x100000)
        return hashlib.sha256(fh.read(0x10000)).hexdigest()[:8]


def merge_metadata(inputs: dict[str, tuple[Path, dict[str, str]]], hashes: dict[Path, str | None],
                   recipe: dict[str, Any]) -> dict[str, str]:
    """`inputs` maps role ("primary", "secondary", "tertiary") to (path, that file's metadata)."""
    recipe = dict(recipe)
    models: dict[str, Any] = {}
    for role, (path, meta) in inputs.items():
        sha = hashes.get(path)
        recipe[f"{role}_model_hash"] = sha
        own_recipe = meta.get("sd_merge_recipe")
        entry = {"name": path.stem, "legacy_hash": legacy_hash(path),
                 "sd_merge_recipe": json.loads(own_recipe) if own_recipe else None}
        models[sha or f"unhashed:{path.name}"] = entry
        if meta.get("sd_merge_models"):
            try:
                models.update(json.loads(meta["sd_merge_models"]))
            except json.JSONDecodeError:
                pass  # a foreign tool wrote something else there; its ancestry is lost, not our merge
    return {"format": "pt", "sd_merge_recipe": json.dumps(recipe), "sd_merge_models": json.dumps(models)}
