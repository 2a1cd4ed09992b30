"""OFT, sd-scripts' `networks.oft`: each target's output channels are rotated block by block, W' = R^T W with
R orthogonal (the Cayley transform of a skew-symmetric matrix whose norm is capped), so the angles between the
weight's rows, which carry what the model knows, are kept.

network_dim is the number of blocks per module, network_alpha the constraint per output channel (sd-scripts
advises about 1e-3, not 1). Targets are the UNet's attention projections (`enable_all_linear`: every linear
layer of the transformer blocks; `enable_conv`: the ResNet convolutions too).

Two file layouts (`oft_layout`), both `oft_blocks` + `alpha` per module:
- "comfyui" (default): LyCORIS' `lora_unet_*` names, which ComfyUI maps (it maps no `oft_unet_*`) and A1111 maps for
  every family. ComfyUI reads `alpha` as the absolute cap on the norm of Q, A1111 and LyCORIS as the cap per output
  channel; the file therefore holds the blocks already scaled inside the cap (what the trained network applies) and
  alpha = network_alpha * out_dim, which no reader's cap cuts further: the same weights in all of them.
- "sd-scripts": `oft_unet_*` names, raw blocks, alpha = network_alpha, exactly as sd-scripts writes them (for
  continuing in sd-scripts; A1111 maps these names for SDXL only, ComfyUI not at all).
Our bake, merge, generate, grid and --network_weights read both (core/lora/kinds.py). PEFT's OFT rotates the input
side instead, so there is no PEFT copy: the rotation is applied here by a forward hook on the target, on its output
without the bias, which is the same as rotating W's rows.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from loratrain.core.lora.keys import unet_lora_name
from loratrain.core.lora.kinds import oft_constrained, oft_rotation
from loratrain.core.models.ldm_keys import unet_diffusers_to_ldm_module
from loratrain.core.models.loading import SDModel

from .base import UNET_ATTN_CONTAINERS, UNET_CONV_CONTAINERS, Network, NetworkKind, NetworkSpec, Target, reader_markers, register

ATTENTION = {"Attention"}
#: file layout -> the prefix its UNet module names take
LAYOUT_PREFIX = {"comfyui": "lora_unet_", "sd-scripts": "oft_unet_"}


class OFTNetwork(Network):
    kind = "oft"

    def __init__(self, model: SDModel, spec: NetworkSpec) -> None:
        if spec.train_text_encoder and not spec.train_unet:
            raise ValueError("OFT trains the UNet only (sd-scripts' networks.oft); do not set network_train_text_encoder_only")
        containers = (UNET_ATTN_CONTAINERS if spec.oft_all_linear else ATTENTION) | (UNET_CONV_CONTAINERS if spec.oft_conv else set())
        targets, modules = [], []
        for path, module in _children(model.unet, containers, spec.oft_conv):
            out_dim = module.out_features if isinstance(module, nn.Linear) else module.out_channels
            if out_dim % spec.network_dim:
                raise ValueError(f"OFT: {path} has {out_dim} output channels, not a multiple of network_dim "
                                 f"{spec.network_dim} (the number of blocks)")
            ldm_path = unet_diffusers_to_ldm_module(path, model.unet.config) if model.family.is_sdxl else path
            name = LAYOUT_PREFIX[spec.oft_layout] + unet_lora_name(ldm_path).removeprefix("lora_unet_")
            targets.append(Target("unet", path, name, spec.network_dim, spec.network_alpha))
            modules.append(module)
        super().__init__(model, spec, targets)
        if not targets:
            raise ValueError("OFT: no target modules in this UNet")
        n = [m.out_features if isinstance(m, nn.Linear) else m.out_channels for m in modules]
        self.blocks = nn.ParameterList([nn.Parameter(torch.zeros(spec.network_dim, d // spec.network_dim, d // spec.network_dim,
                                                                 device=m.weight.device)) for m, d in zip(modules, n)])
        self.constraints = [spec.network_alpha * d for d in n]
        self.multiplier = 1.0
        self._handles = [m.register_forward_hook(self._hook(i)) for i, m in enumerate(modules)]

    def _hook(self, index: int):  # noqa: ANN202
        def rotate(module: nn.Module, inputs: Any, out: torch.Tensor) -> torch.Tensor:
            if self.multiplier == 0:
                return out
            r = oft_rotation(self.blocks[index], self.constraints[index])
            if self.multiplier != 1:  # w (R - I) + I, as sd-scripts weights an OFT module
                eye = torch.eye(r.shape[-1], device=r.device)
                r = self.multiplier * (r - eye) + eye
            bias = module.bias
            channel_dim = -1 if isinstance(module, nn.Linear) else 1
            shape = [1] * out.dim()
            shape[channel_dim] = -1
            y = (out - bias.view(shape)) if bias is not None else out
            k, n = r.shape[0], r.shape[1]
            if channel_dim == -1:
                y = torch.einsum("...kn,knm->...km", y.unflatten(-1, (k, n)).float(), r).flatten(-2)
            else:
                y = torch.einsum("bkn...,knm->bkm...", y.unflatten(1, (k, n)).float(), r).flatten(1, 2)
            y = y.to(out.dtype)
            return y + bias.view(shape) if bias is not None else y
        return rotate

    def trainable_parameters(self, part: str) -> list[nn.Parameter]:
        return list(self.blocks) if part == "unet" else []

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {f"unet.{t.kohya_name}.oft_blocks": b.detach().clone() for t, b in zip(self.targets, self.blocks)}

    def load_state_dict(self, sd: dict[str, torch.Tensor]) -> None:
        with torch.no_grad():
            for t, b in zip(self.targets, self.blocks):
                saved = next((sd[k] for k in (f"unet.{n}.oft_blocks" for n in _spellings(t.kohya_name)) if k in sd), None)
                if saved is None or saved.shape != b.shape:
                    raise ValueError(f"saved network does not fit this model ({t.kohya_name})")
                b.copy_(saved)

    def kohya_state_dict(self, dtype: torch.dtype) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        comfy = self.spec.oft_layout == "comfyui"
        for t, b, cap in zip(self.targets, self.blocks, self.constraints):
            if not comfy:  # sd-scripts: raw blocks, alpha per output channel
                out[f"{t.kohya_name}.oft_blocks"] = b.detach().to("cpu", dtype)
                out[f"{t.kohya_name}.alpha"] = torch.tensor(float(t.alpha), dtype=dtype)
                continue
            stored = oft_constrained(b.detach(), cap).to("cpu", dtype)
            out[f"{t.kohya_name}.oft_blocks"] = stored
            out[f"{t.kohya_name}.alpha"] = _absolute_cap(stored, cap)
        return out

    def load_kohya(self, sd: dict[str, torch.Tensor], source: str) -> int:
        loaded = 0
        with torch.no_grad():
            for t, b in zip(self.targets, self.blocks):
                saved = next((sd[k] for k in (f"{n}.oft_blocks" for n in _spellings(t.kohya_name)) if k in sd), None)
                if saved is None:
                    continue
                if saved.shape != b.shape:
                    raise ValueError(f"{source}: {t.kohya_name} has {saved.shape[0]} blocks, this run {b.shape[0]} "
                                     f"(set network_dim to {saved.shape[0]})")
                b.copy_(saved.to(b.dtype))
                loaded += 1
        return loaded

    def apply_max_norm(self, max_norm: float) -> tuple[int, float, float]:
        raise ValueError("scale_weight_norms applies to LoRA networks; OFT's constraint (network_alpha) bounds it already")

    def peft_state_dict(self, dtype: torch.dtype) -> dict[str, dict[str, torch.Tensor]]:
        raise ValueError("OFT in sd-scripts' layout has no PEFT copy (PEFT's OFT rotates the input side)")

    def set_multiplier(self, value: float) -> None:
        self.multiplier = value

    def args(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        if self.spec.oft_all_linear:
            out["enable_all_linear"] = "True"
        if self.spec.oft_conv:
            out["enable_conv"] = "True"
        return out


def _spellings(name: str) -> tuple[str, ...]:
    """A module's name in this run's layout first, then in the other one: a file (or a training state) of either
    layout loads into either."""
    rest = name.removeprefix("oft_unet_").removeprefix("lora_unet_")
    return (name, *(p + rest for p in LAYOUT_PREFIX.values() if p + rest != name))


def _absolute_cap(stored: torch.Tensor, cap: float) -> torch.Tensor:
    """`alpha` of the ComfyUI layout: the absolute cap, never below the norm of the stored (already capped, then
    rounded to the save dtype) blocks' Q, so that no reader scales them again. float32, rounded up: ComfyUI, A1111 and
    LyCORIS read it as a number whatever the blocks' dtype."""
    b = stored.double()
    need = max(float(cap), float((b - b.transpose(1, 2)).flatten().norm()))
    alpha = torch.tensor(need, dtype=torch.float32)
    return alpha if float(alpha) >= need else torch.nextafter(alpha, torch.tensor(float("inf")))


def _children(unet: nn.Module, containers: set[str], conv: bool) -> list[tuple[str, nn.Module]]:
    """sd-scripts' OFT rule: Linear and 1x1 Conv children of the containers, 3x3 convs only with enable_conv."""
    out: dict[str, nn.Module] = {}
    for name, module in unet.named_modules():
        if type(module).__name__ not in containers:
            continue
        for child_name, child in module.named_modules():
            if child_name and (isinstance(child, nn.Linear) or (isinstance(child, nn.Conv2d)
                                                                 and (child.kernel_size == (1, 1) or conv))):
                out.setdefault(f"{name}.{child_name}", child)
    return list(out.items())


register(NetworkKind("oft", OFTNetwork, metadata_module="networks.oft", file_markers=reader_markers("oft"),
                     own_options=("enable_all_linear", "enable_conv", "oft_layout"),
                     refuses={"scale_weight_norms": "its constraint (network_alpha) bounds the rotation already",
                              "save_peft_format": "PEFT's OFT rotates the input side, so there is no PEFT copy",
                              "network_train_text_encoder_only": "OFT trains the UNet only, as sd-scripts' networks.oft"}),
         "networks.oft")
