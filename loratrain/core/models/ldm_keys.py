"""The LDM/A1111 single-file layout <-> diffusers layout, as module-path tables.

One table per component serves both directions (loading a checkpoint, writing one) and also gives
kohya's SDXL LoRA names, which use the LDM paths (`input_blocks.4.1...`).
"""
from __future__ import annotations

from typing import Any

import torch

RESNET_UNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
               "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}
RESNET_VAE = {"norm1": "norm1", "conv1": "conv1", "norm2": "norm2", "conv2": "conv2", "conv_shortcut": "nin_shortcut"}
VAE_ATTN = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


def _layers(cfg: dict[str, Any]) -> int:
    lpb = cfg.get("layers_per_block", 2)
    if isinstance(lpb, list):
        if len(set(lpb)) != 1:
            raise ValueError("per-block layers_per_block is not supported")
        lpb = lpb[0]
    return int(lpb)


def unet_module_pairs(cfg: dict[str, Any]) -> list[tuple[str, str]]:
    """(diffusers module path, LDM module path) for every mapped module or attention subtree."""
    pairs = [("time_embedding.linear_1", "time_embed.0"), ("time_embedding.linear_2", "time_embed.2"),
             ("conv_in", "input_blocks.0.0"), ("conv_norm_out", "out.0"), ("conv_out", "out.2")]
    if cfg.get("addition_embed_type") == "text_time":
        pairs += [("add_embedding.linear_1", "label_emb.0.0"), ("add_embedding.linear_2", "label_emb.0.2")]

    def resnet(d: str, l: str) -> None:
        pairs.extend((f"{d}.{a}", f"{l}.{b}") for a, b in RESNET_UNET.items())

    n_layers = _layers(cfg)
    down, up = cfg["down_block_types"], cfg["up_block_types"]
    for i, kind in enumerate(down):
        for j in range(n_layers):
            k = 1 + i * (n_layers + 1) + j
            resnet(f"down_blocks.{i}.resnets.{j}", f"input_blocks.{k}.0")
            if "CrossAttn" in kind:
                pairs.append((f"down_blocks.{i}.attentions.{j}", f"input_blocks.{k}.1"))
        if i < len(down) - 1:
            pairs.append((f"down_blocks.{i}.downsamplers.0.conv", f"input_blocks.{(i + 1) * (n_layers + 1)}.0.op"))
    resnet("mid_block.resnets.0", "middle_block.0")
    pairs.append(("mid_block.attentions.0", "middle_block.1"))
    resnet("mid_block.resnets.1", "middle_block.2")
    for i, kind in enumerate(up):
        attn = "CrossAttn" in kind
        for j in range(n_layers + 1):
            k = i * (n_layers + 1) + j
            resnet(f"up_blocks.{i}.resnets.{j}", f"output_blocks.{k}.0")
            if attn:
                pairs.append((f"up_blocks.{i}.attentions.{j}", f"output_blocks.{k}.1"))
        if i < len(up) - 1:
            k = i * (n_layers + 1) + n_layers
            pairs.append((f"up_blocks.{i}.upsamplers.0.conv", f"output_blocks.{k}.{2 if attn else 1}.conv"))
    return pairs


def vae_module_pairs(cfg: dict[str, Any]) -> list[tuple[str, str]]:
    pairs = [(n, n) for n in ("encoder.conv_in", "encoder.conv_out", "decoder.conv_in", "decoder.conv_out",
                              "quant_conv", "post_quant_conv")]
    pairs += [("encoder.conv_norm_out", "encoder.norm_out"), ("decoder.conv_norm_out", "decoder.norm_out")]

    def resnet(d: str, l: str) -> None:
        pairs.extend((f"{d}.{a}", f"{l}.{b}") for a, b in RESNET_VAE.items())

    n_blocks, n_layers = len(cfg["block_out_channels"]), _layers(cfg)
    for i in range(n_blocks):
        for j in range(n_layers):
            resnet(f"encoder.down_blocks.{i}.resnets.{j}", f"encoder.down.{i}.block.{j}")
        if i < n_blocks - 1:
            pairs.append((f"encoder.down_blocks.{i}.downsamplers.0.conv", f"encoder.down.{i}.downsample.conv"))
        ldm_i = n_blocks - 1 - i
        for j in range(n_layers + 1):
            resnet(f"decoder.up_blocks.{i}.resnets.{j}", f"decoder.up.{ldm_i}.block.{j}")
        if i < n_blocks - 1:
            pairs.append((f"decoder.up_blocks.{i}.upsamplers.0.conv", f"decoder.up.{ldm_i}.upsample.conv"))
    for part in ("encoder", "decoder"):
        resnet(f"{part}.mid_block.resnets.0", f"{part}.mid.block_1")
        resnet(f"{part}.mid_block.resnets.1", f"{part}.mid.block_2")
        pairs.extend((f"{part}.mid_block.attentions.0.{a}", f"{part}.mid.attn_1.{b}") for a, b in VAE_ATTN.items())
    return pairs


def _lookup(key: str, table: dict[str, str]) -> str | None:
    """Map a tensor key by its longest module-path prefix found in `table`."""
    parts = key.split(".")
    for cut in range(len(parts) - 1, 0, -1):
        prefix = ".".join(parts[:cut])
        if prefix in table:
            return table[prefix] + "." + ".".join(parts[cut:])
    return None


def convert_keys(sd: dict[str, torch.Tensor], pairs: list[tuple[str, str]], to_ldm: bool, what: str) -> dict[str, torch.Tensor]:
    table = {d: l for d, l in pairs} if to_ldm else {l: d for d, l in pairs}
    out: dict[str, torch.Tensor] = {}
    for key, value in sd.items():
        new = _lookup(key, table)
        if new is None:
            raise KeyError(f"{what}: no {'LDM' if to_ldm else 'diffusers'} name for key {key!r}")
        out[new] = value
    return out


def unet_diffusers_to_ldm_module(path: str, cfg: dict[str, Any]) -> str:
    """The LDM module path of a diffusers UNet module (for kohya SDXL LoRA names)."""
    mapped = _lookup(path + ".x", {d: l for d, l in unet_module_pairs(cfg)})
    if mapped is None:
        raise KeyError(f"UNet module {path!r} has no LDM name")
    return mapped[:-2]


def unet_module_table(cfg: dict[str, Any]) -> dict[str, str]:
    """LDM module path -> diffusers module path (for kohya SD1/SD2 LoRA names, which use diffusers paths)."""
    return {l: d for d, l in unet_module_pairs(cfg)}


def map_module(path: str, table: dict[str, str]) -> str | None:
    mapped = _lookup(path + ".x", table)
    return mapped[:-2] if mapped is not None else None


def vae_reshape(sd: dict[str, torch.Tensor], to_ldm: bool) -> dict[str, torch.Tensor]:
    """VAE mid attention: LDM stores 1x1 convs, diffusers Linear layers."""
    out = {}
    for k, v in sd.items():
        if ".mid.attn_1." in k or ".mid_block.attentions.0." in k:
            if k.endswith(".weight") and v.ndim in (2, 4) and not (".norm." in k or ".group_norm." in k):
                v = v[:, :, None, None] if to_ldm and v.ndim == 2 else (v[:, :, 0, 0] if not to_ldm and v.ndim == 4 else v)
        out[k] = v
    return out


# --- text encoders -----------------------------------------------------------------------------

OPENCLIP_LAYER = {"ln_1": "layer_norm1", "ln_2": "layer_norm2", "mlp.c_fc": "mlp.fc1", "mlp.c_proj": "mlp.fc2",
                  "attn.out_proj": "self_attn.out_proj"}


def openclip_to_hf(sd: dict[str, torch.Tensor], n_layers: int, with_projection: bool) -> dict[str, torch.Tensor]:
    """OpenCLIP text tower (SD2, SDXL's second encoder) -> transformers CLIPTextModel keys."""
    out: dict[str, torch.Tensor] = {}
    for key, value in sd.items():
        if key == "token_embedding.weight":
            out["text_model.embeddings.token_embedding.weight"] = value
        elif key == "positional_embedding":
            out["text_model.embeddings.position_embedding.weight"] = value
        elif key.startswith("ln_final."):
            out["text_model.final_layer_norm." + key.split(".", 1)[1]] = value
        elif key == "text_projection":
            if with_projection:
                out["text_projection.weight"] = value.t().contiguous()
        elif key.startswith("transformer.resblocks."):
            _, _, idx, rest = key.split(".", 3)
            if int(idx) >= n_layers:  # SD2 ships 24 blocks; diffusers uses the first 23
                continue
            base = f"text_model.encoder.layers.{idx}."
            if rest.startswith("attn.in_proj_"):
                kind = rest.rsplit("_", 1)[1]  # weight | bias
                for name, chunk in zip(("q_proj", "k_proj", "v_proj"), value.chunk(3, dim=0)):
                    out[f"{base}self_attn.{name}.{kind}"] = chunk.contiguous()
                continue
            for a, b in OPENCLIP_LAYER.items():
                if rest.startswith(a + "."):
                    out[base + b + rest[len(a):]] = value
                    break
            else:
                raise KeyError(f"unexpected OpenCLIP key {key!r}")
        elif key in ("logit_scale", "attn_mask"):
            continue
        else:
            raise KeyError(f"unexpected OpenCLIP key {key!r}")
    return out


def hf_to_openclip(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    qkv: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
    for key, value in sd.items():
        if key == "text_model.embeddings.token_embedding.weight":
            out["token_embedding.weight"] = value
        elif key == "text_model.embeddings.position_embedding.weight":
            out["positional_embedding"] = value
        elif key.startswith("text_model.final_layer_norm."):
            out["ln_final." + key.rsplit(".", 1)[1]] = value
        elif key == "text_projection.weight":
            out["text_projection"] = value.t().contiguous()
        elif key.startswith("text_model.encoder.layers."):
            idx, rest = key[len("text_model.encoder.layers."):].split(".", 1)
            base = f"transformer.resblocks.{idx}."
            if rest.split(".")[1] in ("q_proj", "k_proj", "v_proj"):
                kind = rest.rsplit(".", 1)[1]
                qkv.setdefault((idx, kind), {})[rest.split(".")[1]] = value
                continue
            for a, b in OPENCLIP_LAYER.items():
                if rest.startswith(b + "."):
                    out[base + a + rest[len(b):]] = value
                    break
            else:
                raise KeyError(f"unexpected text encoder key {key!r}")
        elif key.endswith("position_ids"):
            continue
        else:
            raise KeyError(f"unexpected text encoder key {key!r}")
    for (idx, kind), parts in qkv.items():
        out[f"transformer.resblocks.{idx}.attn.in_proj_{kind}"] = torch.cat([parts["q_proj"], parts["k_proj"], parts["v_proj"]])
    return out
