"""Hugging Face hub cache folders (`models--org--name`), read without importing the hub client."""
from __future__ import annotations

import os
from pathlib import Path


def hub_cache_dir() -> Path:
    """Where huggingface_hub keeps downloads: HF_HUB_CACHE, else HF_HOME/hub, else ~/.cache/huggingface/hub."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"])
    home = os.environ.get("HF_HOME") or os.path.join(os.path.expanduser("~"), ".cache", "huggingface")
    return Path(home) / "hub"


def resolve_hf_cache(path: Path) -> Path:
    """An HF hub cache folder (models--org--name) -> its snapshot for refs/main (or the newest)."""
    if (path / "snapshots").is_dir():
        ref = path / "refs" / "main"
        if ref.is_file():
            snap = path / "snapshots" / ref.read_text().strip()
            if snap.is_dir():
                return snap
        snaps = sorted((path / "snapshots").iterdir(), key=lambda p: p.stat().st_mtime)
        if snaps:
            return snaps[-1]
        raise FileNotFoundError(f"{path}: HF cache folder has no snapshots")
    return path
