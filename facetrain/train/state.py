"""Saving and resuming a face model without pickle: weights and optimizer states as safetensors, the rest JSON.

Every save is atomic; the previous save is first copied to `backups/` (the newest N by save order are kept), so a crash
or a bad run never leaves the user without a loadable model.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors import safe_open

from loratrain.core.paths import confine
from loratrain.core.safe_io import atomic_path, atomic_write_json, save_safetensors

CONFIG_KEY = "loratrain.face_model"


def optimizer_tensors(opt: torch.optim.Optimizer, named: list[tuple[str, torch.nn.Parameter]], prefix: str
                      ) -> tuple[dict[str, torch.Tensor], dict]:
    """Optimizer state keyed by parameter name, so freezing or unfreezing a part keeps the rest's state."""
    tensors, scalars = {}, {}
    for name, p in named:
        for k, v in opt.state.get(p, {}).items():
            if isinstance(v, torch.Tensor) and v.dim() > 0:
                tensors[f"{prefix}.{name}.{k}"] = v
            else:
                scalars.setdefault(name, {})[k] = v.item() if isinstance(v, torch.Tensor) else v
    return tensors, {"scalars": scalars}


def load_optimizer(opt: torch.optim.Optimizer, named: list[tuple[str, torch.nn.Parameter]], prefix: str,
                   tensors: dict[str, torch.Tensor], meta: dict) -> int:
    """Restore the state of every parameter found in the save; returns how many were restored."""
    restored = 0
    for name, p in named:
        st = {k[len(prefix) + len(name) + 2:]: t.to(p.device) for k, t in tensors.items() if k.startswith(f"{prefix}.{name}.")}
        for k, v in meta["scalars"].get(name, {}).items():
            st[k] = torch.tensor(float(v)) if k == "step" else v
        if st:
            if any(t.shape != p.shape for t in st.values() if isinstance(t, torch.Tensor) and t.dim() > 0):
                raise ValueError(f"optimizer state of {name} has another shape")
            opt.state[p] = st
            restored += 1
    return restored


ORDER = "order.json"  # backups/order.json: the save number of each backup, which rotation goes by


def _backup_order(folder: Path) -> dict[str, int]:
    """Each backup's save number (read from a file: anything unexpected counts as unnumbered)."""
    try:
        data = json.loads((folder / ORDER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    if not isinstance(data, dict):
        return {}
    return {k: v for k, v in data.items() if isinstance(k, str) and isinstance(v, int) and not isinstance(v, bool)}


def backup_file(path: Path, keep: int) -> None:
    """Copy `path` into backups/ (named by its saved iteration) and keep the newest `keep` copies *by save order*.

    Names alone cannot order them: when pretraining ends the iteration count restarts at 0, so a backup named
    by iteration would sort below every pretraining one and be pruned at once (the bug this replaces). Each
    backup gets the next number in backups/order.json; files it does not know (made before it existed) count
    as older than every numbered one, in modification-time order."""
    if not path.exists() or keep <= 0:
        return
    folder = path.parent / "backups"
    folder.mkdir(exist_ok=True)
    try:
        with safe_open(str(path), framework="pt") as f:
            it = int(json.loads(f.metadata()[CONFIG_KEY])["iteration"])
    except Exception:
        it = 0
    name, k = f"{path.stem}_{it:07d}{path.suffix}", 1
    order = _backup_order(folder)
    while (folder / name).exists():  # the same iteration saved again (after pretraining, after a restore)
        k += 1
        name = f"{path.stem}_{it:07d}-{k}{path.suffix}"
    with atomic_path(folder / name) as tmp:
        shutil.copy2(path, tmp)
    order[name] = max(order.values(), default=0) + 1
    mine = [p for p in folder.glob(f"{path.stem}_[0-9]*{path.suffix}") if p.name[len(path.stem) + 1:].split("-")[0]
            .removesuffix(path.suffix).isdigit()]
    mine.sort(key=lambda p: (order.get(p.name, 0), p.stat().st_mtime_ns, p.name))
    for old in mine[:-keep]:
        old.unlink()
        order.pop(old.name, None)
    existing = {p.name for p in folder.iterdir()}
    atomic_write_json(folder / ORDER, {n: v for n, v in order.items() if n in existing})


def companions(model: Path) -> tuple[Path, Path, Path]:
    """The state file, TensorBoard logs folder and preview an xseg or swapper trainer keeps beside `model`, confined
    like it: one of them linked out of the workspace is refused before anything reads or writes it."""
    return tuple(confine(model.with_name(model.stem + end), what, write=True) for end, what in
                 ((".state.safetensors", "model state file"), ("_logs", "logs folder"), ("_preview.png", "preview")))


def rotate_backup(path: Path, keep: int) -> None:
    """Copy the previous save into backups/ as <stem>_<save number>; keep the newest `keep` by that number, which
    only grows (naming backups by iteration breaks the moment an iteration counter starts again). For files whose
    iteration is not in safetensors metadata (an xseg model's, an ONNX swapper's) and their state files."""
    if not path.exists() or keep <= 0:
        return
    folder = confine(path.parent / "backups", "backups folder", write=True)
    folder.mkdir(exist_ok=True)
    # exactly <stem>_<digits>: a.onnx's glob also matches a_1.onnx's backups, which are not a.onnx's to delete
    numbered = sorted((int(p.stem.rsplit("_", 1)[1]), p) for p in folder.glob(f"{path.stem}_*{path.suffix}")
                      if p.stem.rsplit("_", 1)[0] == path.stem and p.stem.rsplit("_", 1)[1].isdigit())
    number = numbered[-1][0] + 1 if numbered else 1
    with atomic_path(folder / f"{path.stem}_{number:06d}{path.suffix}") as tmp:
        shutil.copy2(path, tmp)
    for _, old in (numbered + [(number, None)])[:-keep]:
        if old is not None:
            old.unlink(missing_ok=True)


def read_state(path: Path, key: str, iteration: int) -> tuple[dict[str, torch.Tensor], dict]:
    """The tensors and the JSON metadata (under `key`) of a training state file, which must be the one saved with
    the model at `iteration`; any problem raises (callers start the optimizer fresh, never lose the model)."""
    with safe_open(str(path), framework="pt") as f:
        meta = json.loads((f.metadata() or {})[key])
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    if int(meta.get("iteration", -1)) != iteration:
        raise ValueError(f"it is from iteration {meta.get('iteration')}, the model from {iteration}")
    return tensors, meta


def save_checkpoint(model_path: Path, state_path: Path, weights: dict[str, torch.Tensor], info: dict,
                    state_tensors: dict[str, torch.Tensor], state_meta: dict, keep_backups: int) -> None:
    for path in (model_path, state_path):
        backup_file(path, keep_backups)
    save_safetensors(state_tensors, state_path, {CONFIG_KEY: json.dumps({"iteration": info["iteration"], **state_meta})})
    save_safetensors(weights, model_path, {CONFIG_KEY: json.dumps(info)})


def read_checkpoint(path: Path) -> tuple[dict[str, torch.Tensor], dict]:
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = json.loads((f.metadata() or {})[CONFIG_KEY])
            return {k: f.get_tensor(k) for k in f.keys()}, meta
    except KeyError:
        raise ValueError(f"{path}: not a loratrain face model (no {CONFIG_KEY} metadata)") from None
    except Exception as e:
        raise ValueError(f"{path}: unreadable model file ({e})") from None
