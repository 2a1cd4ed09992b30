"""Progressive resolution growth: continue a model trained at a low resolution at a higher one.

Recipe (our own; DeepFaceLab has none): train at R/2 (fast, most of the identity is learned there),
`loratrain face grow MODEL_DIR --resolution R`, then keep training with the same command at R. Every
convolution (encoder, decoders, mask branch) is resolution-independent and is kept; only the two
dense layers of each inter depend on R ((R/16)^2*8e inputs and L*L*ae outputs) and are re-initialised.
The previous model stays in backups/, and the optimizer state is dropped (its shapes changed).
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from loratrain.core.errors import ConfigError
from loratrain.core.jobs import JobResult, job
from loratrain.core.progress import Reporter, StopFlag
from loratrain.core.safe_io import save_safetensors

from .config import GrowConfig
from .models.archi import ArchSpec, build_model
from .train.model_file import check_model_file
from .train.state import CONFIG_KEY, backup_file, read_checkpoint


@dataclasses.dataclass
class GrowResult(JobResult):
    kept: list[str]
    reinitialised: list[str]
    model_path: Path

    def summary(self) -> list[str]:
        layers = sorted({k.split(".")[0] + "." + k.split(".")[1] for k in self.reinitialised})
        return [f"{self.model_path}: {len(self.kept)} tensors kept, {len(self.reinitialised)} re-initialised "
                f"({', '.join(layers)}); train on at the new resolution"]


@job
def run_face_grow(cfg: GrowConfig, reporter: Reporter, stop: StopFlag) -> GrowResult:
    """Continue a model at a higher resolution (one unit: the previous model is backed up first)."""
    return grow_model(cfg.model, cfg.resolution, cfg.keep_backups, cfg.lock_old_iters)


def grow_model(model_path: str | Path, resolution: int, keep_backups: int = 3, lock_old_iters: int = 0) -> GrowResult:
    """Grow the model file in place. The re-initialised tensors are recorded in the model info (the trainer's
    `grow_lock` watcher, train/control.py): training refuses to freeze them before they have trained, and with
    `lock_old_iters` holds the kept ones still for that many iterations."""
    model_path = Path(model_path)
    _, old = check_model_file(model_path)  # the header is untrusted: checked against the tensors (model_file.py)
    weights, info = read_checkpoint(model_path)
    mult = ArchSpec.parse(old.archi).resolution_multiple()
    if resolution <= old.resolution or resolution % mult:
        raise ConfigError(f"new resolution must be larger than {old.resolution} and a multiple of {mult}")
    new_cfg = dataclasses.replace(old, resolution=resolution)
    model = build_model(new_cfg)
    state = model.state_dict()
    kept, fresh = [], []
    for key, value in state.items():
        if key in weights and weights[key].shape == value.shape:
            state[key] = weights[key]
            kept.append(key)
        else:
            fresh.append(key)
    model.load_state_dict(state)
    backup_file(model_path, keep_backups)
    state_path = model_path.with_name(model_path.stem + ".state.safetensors")
    if state_path.exists():
        backup_file(state_path, keep_backups)
        state_path.unlink()
    info = {**info, "model": dataclasses.asdict(new_cfg), "grown_from": old.resolution}
    it = int(info.get("iteration", 0))
    watchers = info.get("watchers") if isinstance(info.get("watchers"), dict) else {}
    info["watchers"] = {**watchers, "grow_lock": {"grown_at": it, "until": it + lock_old_iters, "fresh": sorted(fresh)}}
    info.get("options", {})["resolution"] = resolution
    save_safetensors({k: v.contiguous() for k, v in model.state_dict().items()}, model_path, {CONFIG_KEY: json.dumps(info)})
    return GrowResult(kept, fresh, model_path)
