"""`loratrain convert`: single-file checkpoint <-> diffusers folder, and pickle -> safetensors."""
from __future__ import annotations

import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from loratrain.common.config import CommandConfig, ConfigError, opt
from loratrain.common.safe_io import new_output
from merge.tensor_io import SAVE_DTYPES


@dataclass
class ConvertConfig(CommandConfig):
    source: str = opt("", "a .safetensors (or, with --allow_pickle, .ckpt) file, or a diffusers folder", metadata={"positional": True})
    target: str = opt("", "OUT.safetensors for a single file, otherwise a diffusers folder", metadata={"positional": True})
    save_precision: str = opt("fp16", "dtype of float tensors in the output", metadata={"choices": list(SAVE_DTYPES)})
    allow_pickle: bool = opt(False, "read a pickled .ckpt with torch.load(weights_only=True)")
    overwrite: bool = opt(False, "replace the target if it exists")

    def validate(self) -> None:
        if self.save_precision not in SAVE_DTYPES:
            raise ConfigError(f"save_precision must be one of {', '.join(SAVE_DTYPES)}")


def convert(cfg: ConvertConfig) -> Path:
    """Load with the trainer's loader (every check included), write the other layout atomically."""
    from loratrain.models.loading import load_model
    from loratrain.models.tiny import write_diffusers_folder, write_single_file

    if not cfg.source or not cfg.target:
        raise ConfigError("convert needs SOURCE and TARGET")
    target = new_output(cfg.target, cfg.overwrite)
    if target.resolve() == Path(cfg.source).resolve():
        raise ConfigError("SOURCE and TARGET are the same path")
    model = load_model(cfg.source, allow_pickle=cfg.allow_pickle)
    dtype = SAVE_DTYPES[cfg.save_precision]
    if target.suffix.lower() == ".safetensors":
        return write_single_file(model, target, dtype)
    if target.suffix.lower() in (".ckpt", ".pt", ".bin"):
        raise ConfigError("we only write .safetensors or diffusers folders")
    model.to("cpu", dtype)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        write_diffusers_folder(model, tmp)
        if target.exists():
            shutil.rmtree(target)
        tmp.rename(target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return target
