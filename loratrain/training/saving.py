"""LoRA files and resumable training state, both written atomically.

A state is a folder (`NAME-state/`) of three files; `train_state.json` is written last and lists the
other two with their sizes, so a folder is complete exactly when that file exists and agrees with
the disk. A save writes `NAME-state.tmp/`, moves the previous state to `NAME-state.old/` and the new
one into place. A kill between those two renames leaves no `NAME-state/`, but two complete states:
`find_state` (what `--resume latest` uses) picks the newest complete one of the three.
"""
from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

from loratrain.core.errors import ConfigError
from loratrain.core.lora.hashes import addnet_hashes
from loratrain.core.precision import dtype_of
from loratrain.core.safe_io import atomic_write_json, save_safetensors

if TYPE_CHECKING:
    import torch

    from .networks import Network

STATE_SUFFIX = "-state"
STATE_FILES = ("network.safetensors", "optimizer.pt")
INFO_FILE = "train_state.json"


def save_lora(network: Network, path: Path, precision: str, metadata: dict[str, str], peft_copy: bool = False) -> Path:
    dtype = dtype_of(precision)
    tensors = network.kohya_state_dict(dtype)
    save_safetensors(tensors, path, {**metadata, **addnet_hashes(tensors, metadata)})
    if peft_copy:
        flat = {f"{part}.{k}": v for part, sd in network.peft_state_dict(dtype).items() for k, v in sd.items()}
        adapter_meta = {"lora_adapter_metadata": json.dumps(peft_adapter_config(network))}
        save_safetensors(flat, path.with_name(path.stem + ".peft.safetensors"), adapter_meta)
    return path


def peft_adapter_config(network: Network) -> dict[str, object]:
    """The LoraConfig of each part, keyed `<part>.<field>` as diffusers' `load_lora_weights` reads it.

    Without target modules and per-module rank/alpha, diffusers would assume alpha == rank and scale
    every LoRA wrongly.
    """
    out: dict[str, object] = {}
    spec = network.spec
    for part in {t.part for t in network.targets}:
        mine = [t for t in network.targets if t.part == part]
        out.update({f"{part}.r": spec.network_dim, f"{part}.lora_alpha": spec.network_alpha,
                    f"{part}.target_modules": sorted(t.module_path for t in mine),
                    f"{part}.rank_pattern": {t.module_path: t.rank for t in mine if t.rank != spec.network_dim},
                    f"{part}.alpha_pattern": {t.module_path: t.alpha for t in mine if t.alpha != spec.network_alpha}})
    return out


def prune_saves(output_dir: Path, output_name: str, kind: str, keep: int, upto: int | None = None) -> None:
    """Delete all but the newest `keep` numbered saves of one kind ('epoch' or 'step').

    upto: the epoch or step just saved; a save numbered above it is an earlier, longer run's (kept after --overwrite),
    and counting it would delete this run's newest saves."""
    if keep <= 0:
        return
    pattern = re.compile(re.escape(output_name) + (r"-step(\d{8})" if kind == "step" else r"-(\d{6})") + r"\.safetensors$")
    found = sorted((int(m.group(1)), p) for p in output_dir.iterdir()
                   if (m := pattern.match(p.name)) and (upto is None or int(m.group(1)) <= upto))
    for _, p in found[:-keep]:
        p.unlink()
        peft = p.with_name(p.stem + ".peft.safetensors")
        if peft.exists():
            peft.unlink()


def _siblings(state_dir: Path) -> tuple[Path, Path]:
    return state_dir.with_name(state_dir.name + ".tmp"), state_dir.with_name(state_dir.name + ".old")


def state_info(folder: Path) -> dict[str, Any] | None:
    """The folder's train_state.json when the folder is a complete state, else None."""
    try:
        info = json.loads((folder / INFO_FILE).read_text())
    except (OSError, ValueError):
        return None
    sizes = info.get("files")
    if not isinstance(sizes, dict):  # written before sizes were recorded: trust the three files being there
        return info if all((folder / f).is_file() for f in STATE_FILES) else None
    if any(name not in STATE_FILES for name in sizes):  # names only its own files; a path in it is never looked at
        return None
    for name, size in sizes.items():
        try:
            if (folder / name).stat().st_size != size:
                return None
        except OSError:
            return None
    return info


def find_state(state_dir: Path) -> Path | None:
    """The newest complete state among NAME-state, NAME-state.tmp and NAME-state.old (None if there is none)."""
    best: tuple[int, Path] | None = None
    for folder in (state_dir, *_siblings(state_dir)):
        info = state_info(folder)
        if info is not None and (best is None or int(info.get("global_step", 0)) > best[0]):
            best = (int(info.get("global_step", 0)), folder)
    return best[1] if best else None


def save_state(state_dir: Path, network: Network, optimizer: Any, scheduler: Any, info: dict[str, Any]) -> None:
    """Write the new state beside the old one, then swap it in; a complete state is never removed first."""
    import torch

    tmp, old = _siblings(state_dir)
    if not state_dir.exists():
        survivor = find_state(state_dir)  # an earlier save was killed between its renames
        if survivor is not None:
            os.replace(survivor, state_dir)
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    writing = tmp / "network.safetensors"
    try:
        save_safetensors(network.state_dict(), writing)
        writing = tmp / "optimizer.pt"
        with open(writing, "wb") as fh:
            torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()}, fh)
            fh.flush()
            os.fsync(fh.fileno())
        sizes = {name: (tmp / name).stat().st_size for name in STATE_FILES}
        writing = tmp / INFO_FILE
        atomic_write_json(writing, {**info, "files": sizes})  # last: marks the folder complete
    except BaseException as e:  # a full disk, a kill signal: no half-written NAME-state.tmp is left behind
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, OSError) and e.errno is not None and e.filename in (None, str(writing)):
            raise type(e)(e.errno, e.strerror, str(state_dir / writing.name)) from e  # the file's name in the state
        raise
    if old.exists():
        shutil.rmtree(old)
    if state_dir.exists():
        os.replace(state_dir, old)
    os.replace(tmp, state_dir)
    shutil.rmtree(old, ignore_errors=True)


def load_state(state_dir: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any], dict[str, Any]]:
    import torch
    from safetensors.torch import load_file

    info = state_info(state_dir)
    if info is None:
        if not (state_dir / INFO_FILE).is_file():
            raise ConfigError(f"{state_dir}: not a training state folder (no {INFO_FILE})")
        raise ConfigError(f"{state_dir}: incomplete training state (a save was interrupted); "
                          f"use --resume latest to take the newest complete one")
    net = load_file(str(state_dir / "network.safetensors"))
    opt = torch.load(state_dir / "optimizer.pt", map_location="cpu", weights_only=True)
    return net, opt, info
