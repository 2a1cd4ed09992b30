"""A model written as a diffusers pipeline folder (what `from_pretrained` and our own loader read), atomically.

diffusers' `save_pretrained` writes the modules in their current dtype; a training run's weights
are fp32 while the user asked for fp16/bf16, and casting the live model would disturb training.
So the pipeline is saved into a hidden temporary folder, its weight files are cast file by file,
and the folder takes the final name by renames: a kill leaves the previous folder (or nothing),
never a half-written one.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch

from .loading import SDModel


def save_diffusers_folder(model: SDModel, path: str | Path, dtype: torch.dtype | None = None, replace: bool = False) -> Path:
    """Write `path` (safe_io.atomic_dir: files get the umask's modes). Something already at `path` is replaced only
    with `replace`, and then only when it is a diffusers folder (model_index.json): a user's folder or file is never
    deleted. Refused before anything is written."""
    from diffusers import DDPMScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline
    from safetensors.torch import load_file, save_file

    from ..errors import ConfigError
    from ..safe_io import atomic_dir, replaceable

    path = Path(path)
    if path.exists() or path.is_symlink():
        why = replaceable(path, "diffusers") if replace else f"{path} exists; pass --overwrite to replace it"
        if why is not None:
            raise ConfigError(why)
    sched = DDPMScheduler.from_config(model.noise_scheduler.config)
    if model.family.is_sdxl:
        pipe = StableDiffusionXLPipeline(vae=model.vae, text_encoder=model.text_encoders[0], text_encoder_2=model.text_encoders[1],
                                         tokenizer=model.tokenizers[0], tokenizer_2=model.tokenizers[1], unet=model.unet,
                                         scheduler=sched)
    else:
        pipe = StableDiffusionPipeline(vae=model.vae, text_encoder=model.text_encoders[0], tokenizer=model.tokenizers[0],
                                       unet=model.unet, scheduler=sched, safety_checker=None, feature_extractor=None,
                                       requires_safety_checker=False)
    with atomic_dir(path, replace=replace) as tmp:
        pipe.save_pretrained(str(tmp), safe_serialization=True)
        for weights in tmp.rglob("*.safetensors"):
            if dtype is not None:
                sd = {k: (v.to(dtype) if v.is_floating_point() else v) for k, v in load_file(str(weights)).items()}
                save_file(sd, str(weights), metadata={"format": "pt"})
            with open(weights, "rb") as f:
                os.fsync(f.fileno())
    return path
