"""What distinguishes SD1, SD2 and SDXL: key prefixes, shipped configs, metadata names."""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from loratrain import configs


@dataclass(frozen=True)
class TextEncoderSpec:
    component: str  # diffusers folder / pipeline name
    ldm_prefix: str
    layout: str  # "hf" (transformers keys) or "openclip"
    with_projection: bool
    kohya_prefix: str


@dataclass(frozen=True)
class Family:
    name: str
    text_encoders: tuple[TextEncoderSpec, ...]
    base_model_version: str  # sd-scripts ss_base_model_version
    modelspec_arch: str
    default_resolution: int

    @property
    def is_sdxl(self) -> bool:
        return self.name == "sdxl"

    def shipped_configs(self) -> dict[str, dict[str, Any]]:
        root = configs.path("models", self.name)
        return {p.stem: json.loads(p.read_text()) for p in sorted(root.glob("*.json")) if p.stem != "family"}

    def pad_tokens(self) -> list[str]:
        return json.loads(configs.path("models", self.name, "family.json").read_text())["pad_tokens"]


UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
#: a VAE's first encoder weight in the LDM layout (A1111's VAE files) and in diffusers' layout
VAE_LDM_KEY, VAE_DIFFUSERS_KEY = "encoder.down.0.block.0.conv1.weight", "encoder.down_blocks.0.resnets.0.conv1.weight"

FAMILIES = {
    "sd1": Family("sd1", (TextEncoderSpec("text_encoder", "cond_stage_model.transformer.", "hf", False, "lora_te"),),
                  "sd_v1", "stable-diffusion-v1", 512),
    "sd2": Family("sd2", (TextEncoderSpec("text_encoder", "cond_stage_model.model.", "openclip", False, "lora_te"),),
                  "sd_v2", "stable-diffusion-v2-512", 768),
    "sdxl": Family("sdxl", (TextEncoderSpec("text_encoder", "conditioner.embedders.0.transformer.", "hf", False, "lora_te1"),
                            TextEncoderSpec("text_encoder_2", "conditioner.embedders.1.model.", "openclip", True, "lora_te2")),
                   "sdxl_base_v1-0", "stable-diffusion-xl-v1-base", 1024),
}


class ModelTypeError(ValueError):
    """The file is not a checkpoint of a family we can load (or not the family asked for)."""


def detect_family(keys: set[str], source: str) -> Family:
    """Tell the family from the key names alone, with a clear error for everything else."""
    if any(k.startswith(("lora_unet_", "lora_te")) for k in keys):
        raise ModelTypeError(f"{source}: this is a LoRA file, not a base checkpoint")
    has_unet = any(k.startswith(UNET_PREFIX) for k in keys)
    if not has_unet:
        if any(k.startswith(("encoder.", "decoder.")) for k in keys):
            raise ModelTypeError(f"{source}: this is a VAE file, not a full checkpoint")
        raise ModelTypeError(f"{source}: no UNet weights (model.diffusion_model.*) found; not an SD checkpoint")
    if "conditioner.embedders.1.model.ln_final.weight" in keys:
        if not any(k.startswith("conditioner.embedders.0.transformer.") for k in keys):
            raise ModelTypeError(f"{source}: looks like an SDXL refiner, which is not supported for training")
        return FAMILIES["sdxl"]
    if "cond_stage_model.model.ln_final.weight" in keys:
        return FAMILIES["sd2"]
    if any(k.startswith("cond_stage_model.transformer.") for k in keys):
        return FAMILIES["sd1"]
    raise ModelTypeError(f"{source}: UNet found but no known text encoder keys; cannot tell SD1 / SD2 / SDXL apart")


def family_from_unet_config(cfg: dict[str, Any]) -> Family:
    if cfg.get("addition_embed_type") == "text_time":
        return FAMILIES["sdxl"]
    heads = cfg.get("attention_head_dim")
    if cfg.get("use_linear_projection") or isinstance(heads, list):
        return FAMILIES["sd2"]
    return FAMILIES["sd1"]
