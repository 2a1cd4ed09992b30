"""Where each kohya LoRA module lands in an LDM single-file checkpoint.

kohya names a module `lora_unet_<path>` / `lora_te[12]_<path>` with dots as underscores. For SD1/SD2
U-Nets the path is the diffusers one (`down_blocks_0_attentions_0_...`), for SDXL the LDM one
(`input_blocks_4_1_...`); both spellings are accepted for every family, so third-party files load.
OpenCLIP text encoders (SD2, SDXL's second) fuse q/k/v into one `in_proj_weight`: those modules
map to a row range of it.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

from loratrain.core.models.families import UNET_PREFIX, Family
from loratrain.core.models.ldm_keys import map_module, unet_module_table
from loratrain.core.models.single_file import CONFIG_METADATA_KEY

from .blocks import block_of

_RESBLOCK = re.compile(r"^transformer\.resblocks\.(\d+)\.(attn\.in_proj_weight|attn\.out_proj\.weight|mlp\.c_fc\.weight|mlp\.c_proj\.weight)$")
_OPENCLIP_NAMES = {"attn.out_proj.weight": "self_attn_out_proj", "mlp.c_fc.weight": "mlp_fc1", "mlp.c_proj.weight": "mlp_fc2"}


@dataclass(frozen=True)
class LoraSite:
    name: str  # the kohya module name we write
    key: str  # checkpoint weight key
    rows: tuple[int, int] | None  # row range of a fused q/k/v weight
    block: str  # BASE / INxx / M00 / OUTxx, for block weights
    kind: str  # "attn" (Transformer2DModel / text encoder), "conv" (ResnetBlock2D, down/upsamplers)
    shape: tuple[int, ...]  # shape of the (sliced) weight

    @property
    def is_3x3(self) -> bool:
        return len(self.shape) == 4 and self.shape[2:] != (1, 1)


def unet_config(family: Family, metadata: dict[str, str]) -> dict[str, Any]:
    if CONFIG_METADATA_KEY in metadata:
        return json.loads(metadata[CONFIG_METADATA_KEY])["unet"]
    return family.shipped_configs()["unet"]


def lora_sites(shapes: dict[str, tuple[int, ...]], family: Family, metadata: dict[str, str]) -> dict[str, LoraSite]:
    """Every module name a LoRA may use for this checkpoint -> its site (aliases share one site)."""
    table = unet_module_table(unet_config(family, metadata))
    sites: dict[str, LoraSite] = {}
    for key, shape in shapes.items():
        if key.startswith(UNET_PREFIX) and key.endswith(".weight") and len(shape) >= 2:
            ldm = key[len(UNET_PREFIX):-len(".weight")]
            diff = map_module(ldm, table)
            if diff is None:
                continue
            kind = "attn" if ".attentions." in diff else (
                "conv" if any(p in diff for p in (".resnets.", ".downsamplers.", ".upsamplers.")) else "")
            if not kind:
                continue  # conv_in / conv_out / time embedding: never LoRA targets
            own = "lora_unet_" + (ldm if family.is_sdxl else diff).replace(".", "_")
            site = LoraSite(own, key, None, block_of(key, family), kind, tuple(shape))
            sites[own] = site
            sites["lora_unet_" + (diff if family.is_sdxl else ldm).replace(".", "_")] = site
            continue
        for te in family.text_encoders:
            if not key.startswith(te.ldm_prefix):
                continue
            rest = key[len(te.ldm_prefix):]
            if te.layout == "hf":
                if rest.startswith("text_model.encoder.layers.") and rest.endswith(".weight") and len(shape) == 2:
                    name = te.kohya_prefix + "_" + rest[:-len(".weight")].replace(".", "_")
                    sites[name] = LoraSite(name, key, None, "BASE", "attn", tuple(shape))
                continue
            m = _RESBLOCK.match(rest)
            if not m:
                continue
            layer, part = m.groups()
            base = f"{te.kohya_prefix}_text_model_encoder_layers_{layer}_"
            if part == "attn.in_proj_weight":
                d = shape[0] // 3
                for i, q in enumerate(("q_proj", "k_proj", "v_proj")):
                    name = base + "self_attn_" + q
                    sites[name] = LoraSite(name, key, (i * d, (i + 1) * d), "BASE", "attn", (d, shape[1]))
            else:
                name = base + _OPENCLIP_NAMES[part]
                sites[name] = LoraSite(name, key, None, "BASE", "attn", tuple(shape))
    return sites


def unet_lora_name(path: str) -> str:
    """kohya's name of a UNet module: its path (diffusers for SD1/SD2, LDM for SDXL) with dots as underscores."""
    return "lora_unet_" + path.replace(".", "_")


def te_lora_name(prefix: str, path: str) -> str:
    """kohya's name of a text encoder module: the encoder's prefix (lora_te, lora_te1, lora_te2) and its CLIP path."""
    from loratrain.core.models import text_encoder_keys

    return prefix + "_" + text_encoder_keys.canonical(path).replace(".", "_")


def module_kohya_names(model: Any) -> dict[str, Any]:
    """kohya module name -> the Linear / Conv2d module of a loaded model (an SDModel), under every spelling a file
    may use: diffusers UNet paths for all families and, for SDXL, the LDM ones; text encoders by their canonical
    (CLIP) paths. Used to apply LyCORIS files to a model in memory."""
    from torch import nn

    from loratrain.core.models.ldm_keys import unet_module_pairs

    out: dict[str, Any] = {}
    to_ldm = dict(unet_module_pairs(dict(model.unet.config)))
    for path, module in model.unet.named_modules():
        if isinstance(module, (nn.Linear, nn.Conv2d)):
            out[unet_lora_name(path)] = module
            ldm = map_module(path, to_ldm)
            if ldm is not None:
                out[unet_lora_name(ldm)] = module
    for te_spec, te in zip(model.family.text_encoders, model.text_encoders):
        for path, module in te.named_modules():
            if isinstance(module, nn.Linear):
                out[te_lora_name(te_spec.kohya_prefix, path)] = module
    return out
