"""SD3 LoRAs between sd-scripts' kohya layout (`lora_unet_joint_blocks_0_x_block_attn_qkv`, ours) and diffusers'
PEFT layout (`transformer.transformer_blocks.0.attn.to_q.lora_A.weight`), with the same ΔW.

Why: diffusers' StableDiffusion3Pipeline.load_lora_weights and the tools built on it read the PEFT layout;
`--save_diffusers_layout` writes it beside our file, and `--network_weights` / sampling read it back. The module
table is sd3_keys.module_map (the model's own key conversion): a fused `qkv` LoRA becomes three LoRAs with the same
lora_A and its lora_B's row slices; the final modulation's two output halves are swapped as diffusers orders them.
PEFT files carry no alpha, so alpha / rank is folded into lora_B. Back in our layout three slices with one shared
lora_A become one rank-r LoRA again, independent ones a block-diagonal LoRA of rank 3r (sd-scripts' split_qkv
form); alpha = rank.
"""
from __future__ import annotations

import torch

from ..errors import ConfigError
from ..models.fused_keys import swap_halves
from ..models.sd3 import SD3Config
from ..models.sd3_keys import FINAL_MOD, module_map
from .sd3_network import kohya_name, linear_shapes

PREFIX = "transformer."


def _swapped(path: str, cfg: SD3Config) -> bool:
    """diffusers orders these modules' (shift, scale) output halves the other way round (sd3_keys._swapped)."""
    return path == FINAL_MOD[0] or path == f"joint_blocks.{cfg.num_layers - 1}.context_block.adaLN_modulation.1"


def is_diffusers_sd3_lora(keys: object) -> bool:
    return any(str(k).startswith(PREFIX + "transformer_blocks.") and ".lora_A." in str(k) for k in keys)  # type: ignore[attr-defined]


def kohya_sd3_to_diffusers(sd: dict[str, torch.Tensor], cfg: SD3Config) -> dict[str, torch.Tensor]:
    """Our kohya SD3 LoRA -> diffusers' PEFT layout (text-encoder modules are left out)."""
    table = module_map(cfg.num_layers, cfg.hidden_size)
    paths = {kohya_name(p): p for p in linear_shapes(cfg)}
    out: dict[str, torch.Tensor] = {}
    for key in sd:
        if not key.endswith(".lora_down.weight") or key.startswith("lora_te"):
            continue
        name = key[: -len(".lora_down.weight")]
        if name not in paths:
            raise ConfigError(f"{name}: not a layer of this SD3 model")
        down, up = sd[key], sd[f"{name}.lora_up.weight"]
        rank = down.shape[0]
        alpha = float(sd[f"{name}.alpha"]) if f"{name}.alpha" in sd else float(rank)
        up = up * (alpha / rank)
        if _swapped(paths[name], cfg):
            up = swap_halves(up)
        for theirs, start, end in table[paths[name]]:
            out[f"{PREFIX}{theirs}.lora_A.weight"] = down.clone().contiguous()  # one tensor per key: safetensors refuses shared ones
            out[f"{PREFIX}{theirs}.lora_B.weight"] = (up if end < 0 else up[start:end]).contiguous()
    return out


def diffusers_sd3_to_kohya(sd: dict[str, torch.Tensor], cfg: SD3Config, source: str = "LoRA") -> dict[str, torch.Tensor]:
    """diffusers' PEFT-layout SD3 LoRA -> our kohya layout with the same ΔW (a file's own alphas, if it has
    `<module>.alpha` entries, are applied)."""
    table = module_map(cfg.num_layers, cfg.hidden_size)
    out: dict[str, torch.Tensor] = {}
    used: set[str] = set()
    for ours, targets in table.items():
        names = [f"{PREFIX}{theirs}" for theirs, _, _ in targets]
        if not any(f"{n}.lora_A.weight" in sd for n in names):
            continue
        missing = [n for n in names if f"{n}.lora_A.weight" not in sd or f"{n}.lora_B.weight" not in sd]
        if missing:
            raise ConfigError(f"{source}: {missing[0]}.lora_A/B missing (the other parts of {ours} are there)")
        downs, ups = [], []
        for n in names:
            a, b = sd[f"{n}.lora_A.weight"].float(), sd[f"{n}.lora_B.weight"].float()
            if f"{n}.alpha" in sd:
                b = b * (float(sd[f"{n}.alpha"]) / a.shape[0])
            downs.append(a)
            ups.append(b)
            used.update({f"{n}.lora_A.weight", f"{n}.lora_B.weight", f"{n}.alpha"})
        if len(downs) > 1 and all(torch.equal(d, downs[0]) for d in downs):  # one shared lora_A (our twin): rank r
            down, up = downs[0], torch.cat(ups)
        elif len(downs) > 1:  # independent slices: sd-scripts' split_qkv form, rank 3r block-diagonal
            down, up = torch.cat(downs), torch.block_diag(*ups)
        else:
            down, up = downs[0], ups[0]
        if _swapped(ours, cfg):
            up = swap_halves(up)
        name = kohya_name(ours)
        out[f"{name}.lora_down.weight"], out[f"{name}.lora_up.weight"] = down, up
        out[f"{name}.alpha"] = torch.tensor(float(down.shape[0]))
    left = sorted(k for k in sd if k not in used)
    if left:
        raise ConfigError(f"{source}: {left[0]} names no layer of this SD3 {cfg.variant} model")
    return out


def save_sd3_diffusers_layout(sd: dict[str, torch.Tensor], cfg: SD3Config, path: object,
                              metadata: dict[str, str] | None = None) -> None:
    """Write the diffusers-layout twin of a kohya SD3 LoRA, atomically."""
    from ..safe_io import save_safetensors

    save_safetensors(kohya_sd3_to_diffusers(sd, cfg), path, {**(metadata or {}), "format": "pt"})  # type: ignore[arg-type]
