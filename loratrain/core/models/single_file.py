"""Split an LDM/A1111 single-file checkpoint into diffusers components, and join them back."""
from __future__ import annotations

import json
from typing import Any

import torch

from . import ldm_keys
from .families import UNET_PREFIX, VAE_PREFIX, Family, ModelTypeError
from .text_encoder_keys import canonical

CONFIG_METADATA_KEY = "loratrain.configs"


def split_checkpoint(sd: dict[str, torch.Tensor], family: Family, cfgs: dict[str, dict[str, Any]], source: str) -> dict[str, dict[str, torch.Tensor]]:
    """Component state dicts (diffusers / transformers names) from one flat LDM state dict."""
    try:
        return _split(sd, family, cfgs, source)
    except KeyError as e:
        raise ModelTypeError(f"{source}: weights do not fit the {family.name} layout ({e.args[0]}); "
                             "not a standard checkpoint of that family") from None


def _split(sd: dict[str, torch.Tensor], family: Family, cfgs: dict[str, dict[str, Any]], source: str) -> dict[str, dict[str, torch.Tensor]]:
    parts: dict[str, dict[str, torch.Tensor]] = {"unet": {}, "vae": {}}
    te_parts: dict[str, dict[str, torch.Tensor]] = {te.component: {} for te in family.text_encoders}
    for key, value in sd.items():
        if key.startswith(UNET_PREFIX):
            parts["unet"][key[len(UNET_PREFIX):]] = value
        elif key.startswith(VAE_PREFIX):
            parts["vae"][key[len(VAE_PREFIX):]] = value
        else:
            for te in family.text_encoders:
                if key.startswith(te.ldm_prefix):
                    te_parts[te.component][key[len(te.ldm_prefix):]] = value
                    break
    if not parts["vae"]:
        raise ValueError(f"{source}: the checkpoint has no VAE (first_stage_model.*); pass a full checkpoint")
    out = {
        "unet": ldm_keys.convert_keys(parts["unet"], ldm_keys.unet_module_pairs(cfgs["unet"]), to_ldm=False, what=f"{source} UNet"),
        "vae": ldm_keys.vae_reshape(ldm_keys.convert_keys(parts["vae"], ldm_keys.vae_module_pairs(cfgs["vae"]), to_ldm=False, what=f"{source} VAE"), to_ldm=False),
    }
    for te in family.text_encoders:
        raw = te_parts[te.component]
        if te.layout == "openclip":
            n_layers = cfgs[te.component]["num_hidden_layers"]
            out[te.component] = ldm_keys.openclip_to_hf(raw, n_layers, te.with_projection)
        else:
            out[te.component] = {canonical(k): v for k, v in raw.items() if not k.endswith("position_ids")}
    return out


def join_checkpoint(components: dict[str, dict[str, torch.Tensor]], family: Family, cfgs: dict[str, dict[str, Any]]) -> dict[str, torch.Tensor]:
    """The LDM single-file state dict of diffusers components (canonical `text_model.` TE keys)."""
    flat: dict[str, torch.Tensor] = {}
    unet = ldm_keys.convert_keys(components["unet"], ldm_keys.unet_module_pairs(cfgs["unet"]), to_ldm=True, what="UNet")
    flat.update({UNET_PREFIX + k: v for k, v in unet.items()})
    vae = ldm_keys.vae_reshape(ldm_keys.convert_keys(components["vae"], ldm_keys.vae_module_pairs(cfgs["vae"]), to_ldm=True, what="VAE"), to_ldm=True)
    flat.update({VAE_PREFIX + k: v for k, v in vae.items()})
    for te in family.text_encoders:
        sd = components[te.component]
        sd = ldm_keys.hf_to_openclip(sd) if te.layout == "openclip" else sd
        flat.update({te.ldm_prefix + k: v for k, v in sd.items()})
    return flat


def configs_metadata(cfgs: dict[str, dict[str, Any]]) -> dict[str, str]:
    """Files we write carry their configs, so non-standard sizes load offline too."""
    return {CONFIG_METADATA_KEY: json.dumps(cfgs, sort_keys=True)}
