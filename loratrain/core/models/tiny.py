"""Tiny SD1- and SDXL-shaped models written in both on-disk layouts.

Tests and the demo load these through exactly the code path a real checkpoint takes. The block
structure (block types, layers per block, attention placement) is the real family's; only widths
and depths shrink.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from diffusers import DDPMScheduler

from ..safe_io import save_safetensors
from ..tokenizer import clip_tokenizer
from . import text_encoder_keys
from .families import FAMILIES
from .loading import SDModel, build_component
from .single_file import configs_metadata, join_checkpoint

TINY_TE = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, projection_dim=32)


def tiny_configs(family: str) -> dict[str, dict[str, Any]]:
    fam = FAMILIES[family]
    cfgs = fam.shipped_configs()
    vae = dict(cfgs["vae"], block_out_channels=[16, 16, 32, 32], norm_num_groups=8, layers_per_block=1, sample_size=64)
    cfgs["vae"] = vae
    for spec in fam.text_encoders:
        cfgs[spec.component] = dict(cfgs[spec.component], **TINY_TE)
    unet = dict(cfgs["unet"], norm_num_groups=8, sample_size=8, layers_per_block=1)
    if family == "sdxl":
        unet.update(block_out_channels=[32, 32, 64], attention_head_dim=[2, 2, 4], transformer_layers_per_block=[1, 1, 2],
                    cross_attention_dim=64, addition_time_embed_dim=8, projection_class_embeddings_input_dim=8 * 6 + 32)
    else:
        unet.update(block_out_channels=[32, 32, 64, 64], cross_attention_dim=32,
                    attention_head_dim=4 if family == "sd1" else [2, 2, 4, 4])
    cfgs["unet"] = unet
    return cfgs


def make_tiny_model(family: str = "sd1", seed: int = 0) -> SDModel:
    fam = FAMILIES[family]
    cfgs = tiny_configs(family)
    torch.manual_seed(seed)
    unet, vae = build_component("unet", cfgs["unet"]), build_component("vae", cfgs["vae"])
    tes = [build_component(spec.component, cfgs[spec.component], spec.with_projection) for spec in fam.text_encoders]
    toks = [clip_tokenizer(p) for p in fam.pad_tokens()]
    sched = DDPMScheduler(**{k: v for k, v in cfgs["scheduler"].items() if not k.startswith("_") and k != "set_alpha_to_one"})
    return SDModel(fam, unet, vae, tes, toks, sched, "tiny", cfgs)


def components_state(model: SDModel) -> dict[str, dict[str, torch.Tensor]]:
    parts = {"unet": model.unet.state_dict(), "vae": model.vae.state_dict()}
    for spec, te in zip(model.family.text_encoders, model.text_encoders):
        parts[spec.component] = text_encoder_keys.canonical_state_dict(te)
    return parts


def write_single_file(model: SDModel, path: str | Path, dtype: torch.dtype = torch.float32) -> Path:
    flat = join_checkpoint(components_state(model), model.family, model.configs)
    flat = {k: v.to(dtype) if v.is_floating_point() else v for k, v in flat.items()}
    save_safetensors(flat, path, configs_metadata(model.configs))
    return Path(path)


def write_diffusers_folder(model: SDModel, path: str | Path, replace: bool = False) -> Path:
    """A standard diffusers pipeline folder (loadable by diffusers' own pipelines); see save_diffusers_folder for `replace`."""
    from .diffusers_folder import save_diffusers_folder

    return save_diffusers_folder(model, path, replace=replace)


def checkpoint_layout(family: str, cfgs: dict[str, dict[str, Any]] | None = None) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """Key -> (shape, dtype) of a single-file checkpoint of a family, built on the meta device.

    With the shipped configs this is the real layout (real key names and sizes) at no memory cost:
    benchmarks and block-mapping tests use it instead of multi-GB downloads.
    """
    from accelerate import init_empty_weights

    fam = FAMILIES[family]
    cfgs = cfgs or fam.shipped_configs()
    with init_empty_weights():
        parts = {"unet": build_component("unet", cfgs["unet"]).state_dict(),
                 "vae": build_component("vae", cfgs["vae"]).state_dict()}
        for spec in fam.text_encoders:
            te = build_component(spec.component, cfgs[spec.component], spec.with_projection)
            parts[spec.component] = text_encoder_keys.canonical_state_dict(te)
    flat = join_checkpoint(parts, fam, cfgs)
    layout = {k: (tuple(v.shape), torch.float32) for k, v in flat.items()}
    first = fam.text_encoders[0]
    if first.layout == "hf":  # real CLIP-L checkpoints carry the int64 position_ids buffer
        layout[first.ldm_prefix + "text_model.embeddings.position_ids"] = ((1, 77), torch.int64)
    return layout
