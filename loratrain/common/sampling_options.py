"""Options every image-making command shares (generate, grid), declared once; imports nothing heavy."""
from __future__ import annotations

from dataclasses import dataclass

from .config import CommandConfig, opt


@dataclass
class SamplingOptions(CommandConfig):
    """What every image-making command shares (generate, grid), declared once."""

    model: str = opt("", "base model (diffusers folder or .safetensors)")
    prompt: str = opt("", "prompt")
    negative_prompt: str = opt("", "negative prompt")
    width: int = opt(512, "width")
    height: int = opt(512, "height")
    steps: int = opt(30, "sampling steps")
    cfg_scale: float = opt(7.5, "CFG scale")
    seed: int = opt(0, "seed")
    sampler: str = opt("ddim", "sampler")
    clip_skip: int = opt(1, "clip skip")
    allow_pickle: bool = opt(False, "allow a pickled .ckpt base model")
