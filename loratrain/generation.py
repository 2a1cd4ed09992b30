"""Text-to-image with a base model and any number of LoRAs (kohya or PEFT layout) at given weights."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from .models.loading import load_model
from .training.sampling import SamplePrompt, build_pipeline, generate


def parse_lora_arg(value: str) -> tuple[str, float]:
    """`path.safetensors` or `path.safetensors:0.7`."""
    path, sep, weight = value.rpartition(":")
    if sep and path and not Path(value).exists():
        try:
            return path, float(weight)
        except ValueError:
            pass
    return value, 1.0


def apply_loras(pipe: Any, loras: list[tuple[str, float]]) -> None:
    """diffusers' own loader: kohya files load unchanged, weights become adapter scales (no reload)."""
    names = []
    for i, (path, _) in enumerate(loras):
        if not Path(path).is_file():
            raise FileNotFoundError(f"LoRA not found: {path}")
        name = f"lora{i}"
        pipe.load_lora_weights(path, adapter_name=name)
        names.append(name)
    if names:
        pipe.set_adapters(names, adapter_weights=[w for _, w in loras])


def generate_image(cfg: Any) -> Path:
    model = load_model(cfg.model, allow_pickle=cfg.allow_pickle)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model.to(device)
    loras = [parse_lora_arg(v) for v in cfg.network_weights]
    if loras:
        apply_loras(build_pipeline(model, cfg.sampler), loras)
    prompt = SamplePrompt(cfg.prompt, cfg.negative_prompt, cfg.width, cfg.height, cfg.steps, cfg.cfg_scale, cfg.seed, cfg.sampler)
    return generate(model, prompt, cfg.output, cfg.sampler, cfg.clip_skip)
