"""Which network trains and how: its kind, ranks, per-block settings and the file it may start from. What each kind
accepts is declared by the kind itself (training/networks/base.NetworkKind), so these checks name no kind."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import BaseModel

from loratrain.core.config import opt
from loratrain.core.errors import Problem

from . import NET

#: networks.lora's arguments: only kinds built on its layer (NetworkKind.lora_args) take them
LORA_ARGS = ("block_dims", "conv_block_dims", "down_lr_weight", "mid_lr_weight", "up_lr_weight", "rank_dropout",
             "module_dropout", "loraplus_lr_ratio", "loraplus_unet_lr_ratio", "loraplus_text_encoder_lr_ratio")


def network_kind(network_module: str) -> Any:
    """The NetworkKind a network_module spelling names (`networks.dylora`, `lycoris.kohya`, `finetune`, ...), or None."""
    from ..networks import NETWORKS

    return NETWORKS.get(network_module) if network_module in NETWORKS else None


class NetworkOptions(BaseModel):
    network_module: str = opt("lora", "network kind: lora, locon, loha, lokr, ia3, dora, dylora, oft (sd-scripts' networks.lora and "
                              "lycoris.kohya with --network_args algo=... work too)",
                              registry="loratrain.training.networks:NETWORKS", group=NET)
    network_dim: int = opt(4, "LoRA rank", ge=1, group=NET)
    network_alpha: float = opt(1.0, "LoRA alpha; effective scale is alpha/dim (sd-scripts default 1)", gt=0, group=NET)
    network_dropout: float = opt(0.0, "dropout inside the adapters", ge=0, lt=1, group=NET, advanced=True)
    dylora_unit: int = opt(1, "DyLoRA: the rank step (network_args unit=N); ranks unit, 2*unit, ... network_dim are trained",
                           ge=1, group=NET, advanced=True)
    conv_dim: int | None = opt(None, "rank for 3x3 convolutions (LoCon); unset = no conv adapters", ge=1, group=NET)
    conv_alpha: float | None = opt(None, "alpha for 3x3 convolutions", gt=0, group=NET)
    block_dims: str = opt("", "rank per UNet block, comma-separated: 25 values IN00..IN11,MID,OUT00..OUT11 (SDXL: 23, "
                              "sd-scripts' order); 0 = no module", group=NET, advanced=True)
    block_alphas: str = opt("", "alpha per UNet block (as block_dims)", group=NET, advanced=True)
    conv_block_dims: str = opt("", "3x3 conv rank per UNet block (as block_dims; LoCon)", group=NET, advanced=True)
    conv_block_alphas: str = opt("", "3x3 conv alpha per UNet block", group=NET, advanced=True)
    down_lr_weight: str = opt("", "learning-rate weight of the 12 (SDXL: 9) input blocks: numbers, or cosine, sine, linear, "
                                  "reverse_linear, zeros (+offset)", group=NET, advanced=True)
    mid_lr_weight: str = opt("", "learning-rate weight of the middle block (SDXL: 3 values)", group=NET, advanced=True)
    up_lr_weight: str = opt("", "learning-rate weight of the 12 (SDXL: 9) output blocks (as down_lr_weight)", group=NET,
                            advanced=True)
    block_lr_zero_threshold: float = opt(0.0, "blocks whose lr weight is at most this are not trained (no module)", ge=0,
                                         group=NET, advanced=True)
    rank_dropout: float = opt(0.0, "drop each rank of a module's down output with this probability (per sample)", ge=0, lt=1,
                              group=NET, advanced=True)
    module_dropout: float = opt(0.0, "skip a module's whole adapter with this probability (per forward)", ge=0, lt=1, group=NET,
                                advanced=True)
    loraplus_lr_ratio: float | None = opt(None, "LoRA+: the up matrices learn this many times faster (16 in the paper)", gt=0,
                                          group=NET, advanced=True)
    loraplus_unet_lr_ratio: float | None = opt(None, "LoRA+ ratio for the UNet only (overrides loraplus_lr_ratio)", gt=0,
                                               group=NET, advanced=True)
    loraplus_text_encoder_lr_ratio: float | None = opt(None, "LoRA+ ratio for the text encoders only", gt=0, group=NET,
                                                       advanced=True)
    enable_all_linear: bool = opt(False, "OFT: every linear layer of the transformer blocks, not only attention (network_args)",
                                  group=NET, advanced=True)
    enable_conv: bool = opt(False, "OFT: the ResNet convolutions too (network_args)", group=NET, advanced=True)
    oft_layout: str = opt("comfyui", "OFT: the saved file's layout: comfyui (LyCORIS' lora_unet_* names, loaded by ComfyUI, "
                                     "A1111 and our tools alike) or sd-scripts (oft_unet_*, to continue in sd-scripts); "
                                     "see docs/compatibility.md", choices=["comfyui", "sd-scripts"], group=NET, advanced=True)
    network_train_unet_only: bool = opt(False, "train only the UNet adapters", group=NET)
    network_train_text_encoder_only: bool = opt(False, "train only the text encoder adapters", group=NET, advanced=True)
    dim_from_weights: bool = opt(False, "each module's rank and alpha from the network_weights file (modules the file lacks are "
                                        "not trained)", group=NET, advanced=True)
    network_weights: str = opt("", "start from an existing LoRA: any kohya-layout .safetensors (sd-scripts', ours, ...) "
                                   "or a training state folder", group=NET,
                               advanced=True, path="any")

    @property
    def network_kind(self) -> str:
        """network_module without its spelling: `networks.dylora` -> dylora, `lycoris.kohya` -> lora, `finetune` -> full
        (lycoris.kohya's algo= has already been turned into the kind)."""
        kind = network_kind(self.network_module)
        return kind.name if kind is not None else self.network_module.lower()

    def block_spec(self) -> Any:
        from ..networks.blocks import BlockSpec

        return BlockSpec(self.block_dims, self.block_alphas, self.conv_block_dims, self.conv_block_alphas, self.down_lr_weight,
                         self.mid_lr_weight, self.up_lr_weight, self.block_lr_zero_threshold)

    def network_options(self) -> dict[str, Any]:
        """What the network needs beyond the LoRA options (NetworkSpec's other fields)."""
        return {"unit": self.dylora_unit, "blocks": self.block_spec(), "rank_dropout": self.rank_dropout,
                "oft_all_linear": self.enable_all_linear, "oft_conv": self.enable_conv, "oft_layout": self.oft_layout,
                "module_dropout": self.module_dropout,
                "loraplus_unet": self.loraplus_unet_lr_ratio or self.loraplus_lr_ratio,
                "loraplus_text_encoder": self.loraplus_text_encoder_lr_ratio or self.loraplus_lr_ratio}

    def problems(self) -> list[Problem]:
        """The options the chosen kind refuses or does not read, then its own checks."""
        from ..networks import network_kinds
        from ..networks.blocks import check_text

        out: list[Problem] = []
        if self.network_train_unet_only and self.network_train_text_encoder_only:
            out.append(("network_train_text_encoder_only", "network_train_unet_only and network_train_text_encoder_only exclude each other"))
        kind = network_kind(self.network_module)
        if kind is None:  # an unknown name: the registry check has said so already
            return out
        for name, why in kind.refuses.items():
            if getattr(self, name, None):
                out.append((name, f"not with network_module {kind.name}: {why}"))
        defaults = type(self).model_fields
        for other in network_kinds():
            for name in other.own_options:
                if other is not kind and getattr(self, name) != defaults[name].default:
                    out.append((name, f"an option of network_module {other.name} only, not of {kind.name}"))
        out += check_text(self.block_spec())
        lora_args = [n for n in LORA_ARGS if getattr(self, n)]
        if lora_args and not kind.lora_args:
            out.append((lora_args[0], f"a networks.lora argument; not for network_module {kind.name}"))
        if self.dim_from_weights and not self.network_weights:
            out.append(("dim_from_weights", "needs network_weights (the file the ranks are read from)"))
        elif self.dim_from_weights and not kind.reads_dims:
            out.append(("dim_from_weights", f"reads LoRA files; not for network_module {kind.name}"))
        return out + (kind.checks(self) if kind.checks else [])

    def requirements(self) -> list[Problem]:
        from ..config_checks import lora_file_problems

        if self.network_weights and not Path(self.network_weights).exists():
            return [("network_weights", f"not found: {self.network_weights}")]
        if self.network_weights and Path(self.network_weights).suffix.lower() == ".safetensors":
            return lora_file_problems(self, Path(self.network_weights))
        return []
