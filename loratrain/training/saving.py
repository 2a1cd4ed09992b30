"""LoRA files and resumable training state, both written atomically."""
from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

import torch

from ..common.safe_io import atomic_write_json, save_safetensors
from ..networks import Network

SAVE_DTYPES = {"float": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
STATE_SUFFIX = "-state"


def save_lora(network: Network, path: Path, precision: str, metadata: dict[str, str], peft_copy: bool = False) -> Path:
    dtype = SAVE_DTYPES[precision]
    save_safetensors(network.kohya_state_dict(dtype), path, metadata)
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


def prune_saves(output_dir: Path, output_name: str, kind: str, keep: int) -> None:
    """Delete all but the newest `keep` numbered saves of one kind ('epoch' or 'step')."""
    if keep <= 0:
        return
    pattern = re.compile(re.escape(output_name) + (r"-step(\d{8})" if kind == "step" else r"-(\d{6})") + r"\.safetensors$")
    found = sorted((int(m.group(1)), p) for p in output_dir.iterdir() if (m := pattern.match(p.name)))
    for _, p in found[:-keep]:
        p.unlink()
        peft = p.with_name(p.stem + ".peft.safetensors")
        if peft.exists():
            peft.unlink()


def save_state(state_dir: Path, network: Network, optimizer: torch.optim.Optimizer, scheduler: Any, info: dict[str, Any]) -> None:
    """Write into a temp folder, then swap it in: a crash mid-save leaves the previous state intact."""
    tmp = state_dir.with_name(state_dir.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    save_safetensors(network.state_dict(), tmp / "network.safetensors")
    torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()}, tmp / "optimizer.pt")
    with open(tmp / "optimizer.pt", "rb") as fh:
        os.fsync(fh.fileno())
    atomic_write_json(tmp / "train_state.json", info)
    old = state_dir.with_name(state_dir.name + ".old")
    if state_dir.exists():
        if old.exists():
            shutil.rmtree(old)
        os.replace(state_dir, old)
    os.replace(tmp, state_dir)
    if old.exists():
        shutil.rmtree(old)


def load_state(state_dir: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any], dict[str, Any]]:
    from safetensors.torch import load_file

    info_path = state_dir / "train_state.json"
    if not info_path.is_file():
        raise FileNotFoundError(f"{state_dir}: not a training state folder (no train_state.json)")
    net = load_file(str(state_dir / "network.safetensors"))
    opt = torch.load(state_dir / "optimizer.pt", map_location="cpu", weights_only=True)
    return net, opt, json.loads(info_path.read_text())
