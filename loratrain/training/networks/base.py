"""Which modules get an adapter (sd-scripts' rule) and the Network object the trainer holds."""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from loratrain.core.lora.keys import te_lora_name, unet_lora_name
from loratrain.core.models.ldm_keys import unet_diffusers_to_ldm_module
from loratrain.core.models.loading import SDModel
from loratrain.core.registry import Registry

from .blocks import BlockSpec, block_index, block_ranks

UNET_ATTN_CONTAINERS = {"Transformer2DModel"}
UNET_CONV_CONTAINERS = {"ResnetBlock2D", "Downsample2D", "Upsample2D"}
TE_CONTAINERS = {"CLIPAttention", "CLIPSdpaAttention", "CLIPFlashAttention2", "CLIPMLP"}


@dataclass
class NetworkSpec:
    network_dim: int = 4
    network_alpha: float = 1.0
    conv_dim: int | None = None
    conv_alpha: float | None = None
    network_dropout: float = 0.0
    train_unet: bool = True
    train_text_encoder: bool = True
    unit: int = 1  # DyLoRA: ranks unit, 2*unit, ... network_dim
    ema_decay: float = 0.0  # full fine-tune: EMA of the weights (0 = off)
    ema_on_cpu: bool = False
    stop_text_encoder_after: int = 0  # full fine-tune: steps the text encoders train (0 = all)
    save_diffusers: bool = False  # full fine-tune: every save also as a diffusers folder
    replace_diffusers: bool = False  # --overwrite / --resume: an earlier run's diffusers folder (model_index.json) may be replaced
    module_dims: dict[str, tuple[int, float]] | None = None  # dim_from_weights: kohya name -> (rank, alpha) of a file
    oft_all_linear: bool = False  # OFT: every linear layer of the transformer blocks, not only attention
    oft_conv: bool = False  # OFT: the ResNet convolutions too
    oft_layout: str = "comfyui"  # OFT file layout: "comfyui" (lora_unet_*, alpha the absolute cap) or "sd-scripts"
    blocks: BlockSpec = field(default_factory=BlockSpec)  # sd-scripts' per-block ranks and learning rates
    rank_dropout: float = 0.0  # per sample, each rank of a module's down output dropped with this probability
    module_dropout: float = 0.0  # per forward, a module's whole adapter skipped with this probability
    loraplus_unet: float | None = None  # LoRA+: the up (B) matrices learn this many times faster
    loraplus_text_encoder: float | None = None


@dataclass
class Target:
    part: str  # "unet" | "text_encoder" | "text_encoder_2"
    module_path: str
    kohya_name: str
    rank: int
    alpha: float


def find_targets(model: SDModel, spec: NetworkSpec) -> list[Target]:
    """sd-scripts' rule: Linear/Conv2d children of the container classes, 3x3 convs only with conv_dim."""
    targets: list[Target] = []
    if spec.train_unet:
        sdxl = model.family.is_sdxl
        per_block = block_ranks(spec.blocks, sdxl, spec.network_dim, spec.network_alpha, spec.conv_dim,
                                spec.conv_alpha) if spec.blocks else None
        with_conv = spec.conv_dim or (per_block and per_block[2]) or spec.module_dims
        containers = UNET_ATTN_CONTAINERS | (UNET_CONV_CONTAINERS if with_conv else set())
        for path in _children(model.unet, containers, with_conv):
            module = model.unet.get_submodule(path)
            is_3x3 = isinstance(module, nn.Conv2d) and module.kernel_size != (1, 1)
            rank, alpha = ((spec.conv_dim, spec.conv_alpha if spec.conv_alpha is not None else 1.0) if is_3x3
                           else (spec.network_dim, spec.network_alpha))
            ldm_path = unet_diffusers_to_ldm_module(path, model.unet.config) if sdxl else path
            name = unet_lora_name(ldm_path)
            if spec.module_dims is not None:  # dim_from_weights: the file's modules, with the file's ranks
                if name not in spec.module_dims:
                    continue
                rank, alpha = spec.module_dims[name]
            elif per_block:  # sd-scripts' block_dims / lr weights: rank and alpha of the module's block (0: no module)
                dims, alphas, conv_dims, conv_alphas = per_block
                i = block_index(name, sdxl)
                rank, alpha = (conv_dims[i], conv_alphas[i]) if is_3x3 else (dims[i], alphas[i])
                if not rank:
                    continue
            targets.append(Target("unet", path, name, rank, alpha))
    if spec.train_text_encoder:
        for te_spec, te in zip(model.family.text_encoders, model.text_encoders):
            for path in _children(te, TE_CONTAINERS, spec.conv_dim):
                name = te_lora_name(te_spec.kohya_prefix, path)
                rank, alpha = spec.network_dim, spec.network_alpha
                if spec.module_dims is not None:
                    if name not in spec.module_dims:
                        continue
                    rank, alpha = spec.module_dims[name]
                targets.append(Target(te_spec.component, path, name, rank, alpha))
    return targets


def _children(root: nn.Module, containers: set[str], with_conv: object) -> list[str]:
    out = []
    for name, module in root.named_modules():
        if type(module).__name__ not in containers:
            continue
        for child_name, child in module.named_modules():
            if not child_name:
                continue
            if isinstance(child, nn.Linear) or (isinstance(child, nn.Conv2d) and (child.kernel_size == (1, 1) or with_conv)):
                out.append(f"{name}.{child_name}")
    return list(dict.fromkeys(out))


class Network:
    """Adapters attached to a model; knows its targets, parameters and file layouts."""

    kind: str = "lora"

    def __init__(self, model: SDModel, spec: NetworkSpec, targets: list[Target]) -> None:
        self.model = model
        self.spec = spec
        self.targets = targets

    def parts(self) -> dict[str, nn.Module]:
        parts: dict[str, nn.Module] = {"unet": self.model.unet}
        for te_spec, te in zip(self.model.family.text_encoders, self.model.text_encoders):
            parts[te_spec.component] = te
        return {p: m for p, m in parts.items() if any(t.part == p for t in self.targets)}

    def trainable_parameters(self, part: str) -> list[nn.Parameter]:
        """The parameters of `part` that train (requires_grad), in module order."""
        module = self.parts().get(part)
        return [p for p in module.parameters() if p.requires_grad] if module is not None else []

    def param_groups(self, lrs: dict[str, float]) -> list[dict[str, Any]]:
        """The optimizer's parameter groups: one per model part at its learning rate (networks with block
        learning rates or LoRA+ split them further)."""
        return [{"params": params, "lr": lrs[part], "name": part}
                for part in self.parts() if (params := self.trainable_parameters(part))]

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Trainable adapter tensors keyed `<part>.<peft key>` (for resume)."""
        raise NotImplementedError

    def load_state_dict(self, sd: dict[str, torch.Tensor]) -> None:
        raise NotImplementedError

    def kohya_state_dict(self, dtype: torch.dtype) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def load_kohya(self, sd: dict[str, torch.Tensor], source: str) -> int:
        raise NotImplementedError

    def apply_max_norm(self, max_norm: float) -> tuple[int, float, float]:
        raise NotImplementedError

    def peft_state_dict(self, dtype: torch.dtype) -> dict[str, dict[str, torch.Tensor]]:
        raise NotImplementedError

    def set_multiplier(self, value: float) -> None:
        raise NotImplementedError

    def save(self, path: Any, precision: str, metadata: dict[str, str], peft_copy: bool = False) -> Any:
        """Write the trained result to `path` (a LoRA file in kohya / LyCORIS layout; a full fine-tune overrides it)."""
        from ..saving import save_lora

        return save_lora(self, path, precision, metadata, peft_copy)

    def begin_step(self, seed: int) -> None:
        """Called before each optimisation step with a seed of that step (DyLoRA picks its ranks from it)."""

    def end_step(self) -> None:
        """Called after each optimiser step (the full fine-tune updates its EMA here)."""

    def args(self) -> dict[str, Any]:
        """network_args as sd-scripts records them in ss_network_args (strings)."""
        spec = self.spec
        out: dict[str, Any] = {}
        if spec.conv_dim:
            out.update(conv_dim=str(spec.conv_dim), conv_alpha=str(spec.conv_alpha if spec.conv_alpha is not None else 1.0))
        names = {"dims": "block_dims", "alphas": "block_alphas", "conv_dims": "conv_block_dims",
                 "conv_alphas": "conv_block_alphas", "lr_zero_threshold": "block_lr_zero_threshold"}
        for key, value in spec.blocks.__dict__.items():
            if value:
                out[names.get(key, key)] = str(value)
        for key, value in (("rank_dropout", spec.rank_dropout), ("module_dropout", spec.module_dropout),
                           ("loraplus_unet_lr_ratio", spec.loraplus_unet), ("loraplus_text_encoder_lr_ratio", spec.loraplus_text_encoder)):
            if value:
                out[key] = str(value)
        return out


@dataclass(frozen=True)
class NetworkKind:
    """What the rest of the program needs to know about one network kind, declared once beside its code: the config
    checks, the sd-scripts / LyCORIS spellings and the saved metadata all read it from here, so a new kind is one
    file in this package (the package imports every module in it)."""

    name: str
    build: Callable[[SDModel, NetworkSpec], Network]
    #: ss_network_module in the saved file (what sd-scripts and A1111 read)
    metadata_module: str = "lycoris.kohya"
    #: LyCORIS' algo= value that selects this kind (network_module lycoris.kohya + network_args algo=...)
    lycoris_algo: str = ""
    #: a network_weights file of this kind holds keys ending so
    file_markers: tuple[str, ...] = (".lora_down.weight",)
    #: takes networks.lora's arguments (block dims and lr weights, LoRA+, rank and module dropout)
    lora_args: bool = False
    #: dim_from_weights can read its ranks from a file
    reads_dims: bool = False
    #: options only this kind reads: set with any other kind they are refused
    own_options: tuple[str, ...] = ()
    #: options this kind refuses when they are set, each with the reason
    refuses: dict[str, str] = field(default_factory=dict)
    #: further checks of the options for this kind: cfg -> [(option, problem)]
    checks: Callable[[Any], list[tuple[str, str]]] | None = None


NETWORKS: Registry[NetworkKind] = Registry("network kind")


def network_kinds() -> list[NetworkKind]:
    """Every registered kind once (NETWORKS lists each under all its spellings), in the order of their names."""
    return list({id(k): k for k in map(NETWORKS.get, NETWORKS.names())}.values())


def reader_markers(kind: str) -> tuple[str, ...]:
    """The key suffixes that mark a LyCORIS kind in a file: the file reader's (core/lora/kinds.py), not a second list."""
    from loratrain.core.lora.kinds import MODULE_KINDS

    return tuple("." + m for m in MODULE_KINDS.get(kind).markers)


def register(kind: NetworkKind, *aliases: str) -> NetworkKind:
    """Add a kind under its name and its other network_module spellings (sd-scripts', LyCORIS')."""
    return NETWORKS.register(kind.name, *aliases)(kind)


def build_network(kind: str, model: SDModel, spec: NetworkSpec) -> Network:
    return NETWORKS.get(kind).build(model, spec)
