"""LoRA on the FLUX.1 transformer in sd-scripts' `networks/lora_flux.py` file layout.

Why a plain module and not PEFT: sd-scripts' `split_qkv` trains one LoRA per q / k / v (and MLP-in) slice of a fused
Linear and saves them as one block-diagonal LoRA; PEFT has no such layer. Each adapter here is a small module whose
output is added to its Linear's output by a forward hook, so the model's own state dict and key names stay BFL's.

File layout (what sd-scripts writes, key for key and shape for shape): module `lora_unet_<BFL path with _>`,
`lora_down.weight` [rank, in], `lora_up.weight` [out, rank], `alpha` a float32 scalar; y = Wx + alpha/rank * up(down(x)).
Default targets: every Linear of every double block (img/txt mod.lin, attn.qkv, attn.proj, mlp.0, mlp.2) and single
block (linear1, linear2, modulation.lin); `train_blocks` all/single/double narrows them, `in_dims` (img, time, vector,
guidance, txt ranks) adds the input embedders. With `split_qkv` a fused Linear's file entry is rank n*r: `lora_down`
is the n downs stacked, `lora_up` holds each slice's up on the block diagonal. sd-scripts keeps the per-slice alpha
there, so every reader (diffusers, ComfyUI, sd-scripts' own inference) applies 1/n of what was trained; we write
alpha * n so that alpha / file rank is the trained scale and the file means the same ΔW everywhere. (sd-scripts at
48d368f also fails to build split_qkv on double blocks; the layout we write for them is its state_dict()'s.)

On Chroma, lora_flux walks the same DoubleStreamBlock / SingleStreamBlock classes, which have no modulation Linears
there: the targets are a double block's img/txt attn.qkv, attn.proj, mlp.0, mlp.2 and a single block's linear1,
linear2; of in_dims only img_in and txt_in exist (Chroma has no time_in / vector_in / guidance_in, and the
approximator, `distilled_guidance_layer`, matches none of lora_flux's filters).
"""
from __future__ import annotations

from pathlib import Path

import torch

from loratrain.core.errors import ConfigError
from loratrain.core.models.flux import FluxConfig

from .hooked_network import (  # noqa: F401  (PREFIX, kohya_name: public here too)
    PREFIX,
    FusedLoraModule,
    HookedLoraNetwork,
    file_kind,
    group_kohya,
    kohya_name,
    kohya_ranks,
    kohya_state_dict,
    load_kohya_state_dict,
    make_adapter,
    save_kohya,
)

DOUBLE = ("img_mod.lin", "img_attn.qkv", "img_attn.proj", "img_mlp.0", "img_mlp.2",
          "txt_mod.lin", "txt_attn.qkv", "txt_attn.proj", "txt_mlp.0", "txt_mlp.2")
SINGLE = ("linear1", "linear2", "modulation.lin")
#: in_dims order (sd-scripts'): img, time, vector, guidance, txt
IN_GROUPS = (("img_in",), ("time_in.in_layer", "time_in.out_layer"), ("vector_in.in_layer", "vector_in.out_layer"),
             ("guidance_in.in_layer", "guidance_in.out_layer"), ("txt_in",))
TRAIN_BLOCKS = ("all", "single", "double")


def linear_shapes(cfg: FluxConfig) -> dict[str, tuple[int, int]]:
    """(in, out) of every Linear a FLUX LoRA may target, by BFL path; from the config alone (no model needed).
    Chroma's blocks have no modulation Linears and it has no time / vector / guidance embedders."""
    h, m = cfg.hidden_size, cfg.mlp_hidden
    block = {"img_mod.lin": (h, 6 * h), "img_attn.qkv": (h, 3 * h), "img_attn.proj": (h, h),
             "img_mlp.0": (h, m), "img_mlp.2": (m, h)}
    block.update({"txt" + k[3:]: v for k, v in block.items()})
    if cfg.chroma:
        out = {"img_in": (cfg.in_channels, h), "txt_in": (cfg.context_in_dim, h)}
    else:
        out = {"img_in": (cfg.in_channels, h), "time_in.in_layer": (256, h), "time_in.out_layer": (h, h),
               "vector_in.in_layer": (cfg.vec_in_dim, h), "vector_in.out_layer": (h, h),
               "txt_in": (cfg.context_in_dim, h)}
    if cfg.guidance_embed:
        out.update({"guidance_in.in_layer": (256, h), "guidance_in.out_layer": (h, h)})
    modulated = not cfg.chroma
    for i in range(cfg.depth):
        out.update({f"double_blocks.{i}.{k}": block[k] for k in DOUBLE if modulated or "_mod." not in k})
    single = {"linear1": (h, 3 * h + m), "linear2": (h + m, h)}
    if modulated:
        single["modulation.lin"] = (h, 3 * h)
    for i in range(cfg.depth_single_blocks):
        out.update({f"single_blocks.{i}.{k}": v for k, v in single.items()})
    return out


def split_sizes(path: str, cfg: FluxConfig) -> tuple[int, ...] | None:
    """The output slices split_qkv trains separately: q/k/v of a double block's qkv, q/k/v/MLP-in of linear1."""
    if path.endswith("attn.qkv"):
        return (cfg.hidden_size,) * 3
    if path.endswith("linear1"):
        return (cfg.hidden_size,) * 3 + (cfg.mlp_hidden,)
    return None


def flux_lora_targets(cfg: FluxConfig, rank: int, train_blocks: str = "all",
                      in_dims: list[int] | None = None) -> dict[str, int]:
    """BFL path -> rank of the modules sd-scripts' lora_flux trains with these network_args."""
    if train_blocks not in TRAIN_BLOCKS:
        raise ConfigError(f"network_args train_blocks={train_blocks!r}: use one of {', '.join(TRAIN_BLOCKS)}")
    shapes = linear_shapes(cfg)
    want = {"all": ("double_blocks.", "single_blocks."), "single": ("single_blocks.",), "double": ("double_blocks.",)}
    out = {p: rank for p in shapes if p.startswith(want[train_blocks])}
    if in_dims is not None:
        if len(in_dims) != 5:
            raise ConfigError(f"network_args in_dims={in_dims}: give 5 ranks (img, time, vector, guidance, txt)")
        for group, r in zip(IN_GROUPS, in_dims):
            out.update({p: int(r) for p in group if r and p in shapes})
    return out


FluxLoraModule = FusedLoraModule  # the adapter of one (fused) Linear; shared with SD3 (hooked_network.py)


class FluxLoraNetwork(HookedLoraNetwork):
    """One adapter per target, keyed by its kohya name; `apply_to(model)` hooks them onto the model's Linears. `kind`
    is lora (sd-scripts' lora_flux) or a LyCORIS kind (loha, lokr: hooked_kinds.py) on the same targets and names;
    `file_parts` shapes a LyCORIS network from a file's modules (by BFL path)."""

    label = "FLUX"

    def __init__(self, cfg: FluxConfig, ranks: dict[str, int], alpha: float | dict[str, float] = 1.0,
                 split_qkv: bool = False, kind: str = "lora",
                 file_parts: dict[str, dict[str, torch.Tensor]] | None = None, source: str = "") -> None:
        def make(path: str, shape: tuple[int, int], rank: int) -> torch.nn.Module:
            label = f"{source}: {kohya_name(path)}" if source else kohya_name(path)
            return make_adapter(kind, label, shape, rank, alpha[path] if isinstance(alpha, dict) else alpha,
                                split_sizes(path, cfg) if split_qkv else None, (file_parts or {}).get(path))

        super().__init__(cfg, split_qkv, linear_shapes(cfg), ranks, make)
        self.kind = kind


def create_flux_lora(cfg: FluxConfig, rank: int = 4, alpha: float = 1.0, train_blocks: str = "all",
                     split_qkv: bool = False, in_dims: list[int] | None = None, kind: str = "lora") -> FluxLoraNetwork:
    """A new network as sd-scripts' `create_network(network_dim=rank, network_alpha=alpha, **network_args)` builds it
    (or LyCORIS' kohya wrapper, for kind loha / lokr: the same Linears, whose default preset on FLUX.1 is every Linear
    of the double and single blocks, as train_blocks all)."""
    return FluxLoraNetwork(cfg, flux_lora_targets(cfg, rank, train_blocks, in_dims), alpha, split_qkv, kind)


def kohya_flux_state_dict(network: FluxLoraNetwork, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """The network as sd-scripts' lora_flux saves it (alpha stays float32)."""
    return kohya_state_dict(network, dtype)


def load_kohya_flux_state_dict(network: FluxLoraNetwork, sd: dict[str, torch.Tensor], source: str = "LoRA") -> None:
    """Reverse of kohya_flux_state_dict: fill a network built with the same targets (every module must be there)."""
    load_kohya_state_dict(network, sd, source)


def flux_lora_from_kohya(cfg: FluxConfig, sd: dict[str, torch.Tensor], split_qkv: bool = False,
                         source: str = "LoRA") -> FluxLoraNetwork:
    """A network shaped by a kohya-layout FLUX LoRA (its modules, ranks and alphas) with its weights loaded."""
    groups = group_kohya(sd, source)
    by_name = {kohya_name(p): p for p in linear_shapes(cfg)}
    unknown = sorted(n for n in groups if n not in by_name)
    if unknown:
        raise ConfigError(f"{source}: {unknown[0]} names no Linear of this FLUX model (text-encoder LoRAs load elsewhere)")
    kind = file_kind(groups, source)
    if kind != "lora":  # LyCORIS: each module shaped by its own tensors
        parts = {by_name[n]: g for n, g in groups.items()}
        network = FluxLoraNetwork(cfg, dict.fromkeys(parts, 1), 1.0, False, kind, parts, source)
    else:
        ranks = kohya_ranks(groups, by_name, lambda p: len(split_sizes(p, cfg) or (1,)) if split_qkv else 1, source)
        network = FluxLoraNetwork(cfg, ranks, 1.0, split_qkv)
    load_kohya_state_dict(network, sd, source, groups)
    return network


def save_flux_lora(network: FluxLoraNetwork, path: str | Path, metadata: dict[str, str] | None = None,
                   dtype: torch.dtype | None = None) -> Path:
    """Write the kohya-layout safetensors file (atomically, like every output)."""
    return save_kohya(kohya_state_dict(network, dtype), path, metadata)
