"""`networks.lora_flux`: sd-scripts' FLUX.1 LoRA (core/lora/flux_network.py) behind the trainer's Network interface.

Why a wrapper: the training loop, resume states and saving talk to a `Network` (parts, parameter groups, state dict,
kohya file); FLUX's LoRA is a hook-based module on our BFL-layout transformer, not PEFT on a UNet, so this class
answers those calls for it. Built by the FLUX trainer (training/flux_trainer.py); registered so `--network_module
networks.lora_flux` is a known name and the file's `ss_network_module` is sd-scripts' own.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from loratrain.core.errors import ConfigError
from loratrain.core.lora.flux_network import FluxLoraNetwork, kohya_flux_state_dict, load_kohya_flux_state_dict

from .base import Network, NetworkKind, NetworkSpec, Target, register


class FluxNetwork(Network):
    kind = "lora_flux"

    def __init__(self, net: FluxLoraNetwork, spec: NetworkSpec, network_args: dict[str, str]) -> None:
        self.model, self.spec, self.net, self._args = None, spec, net, network_args
        self.diffusers_copy = False  # --save_diffusers_layout (set by the FLUX trainer)
        self.targets = [Target("unet", path, name, m.rank, m.alpha) for (name, path), m in zip(net.paths.items(), net.lora.values())]

    def parts(self) -> dict[str, nn.Module]:
        return {"unet": self.net}

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {f"unet.{k}": v.detach().clone().contiguous() for k, v in self.net.state_dict().items()}

    def load_state_dict(self, sd: dict[str, torch.Tensor]) -> None:
        try:
            self.net.load_state_dict({k[len("unet."):]: v for k, v in sd.items()}, strict=True)
        except RuntimeError as e:
            raise ConfigError(f"the training state does not match this FLUX LoRA (other network_args?): {e}") from None

    def kohya_state_dict(self, dtype: torch.dtype) -> dict[str, torch.Tensor]:
        return kohya_flux_state_dict(self.net, dtype)

    def load_kohya(self, sd: dict[str, torch.Tensor], source: str) -> int:
        """`--network_weights`: our kohya layout, or the diffusers / PEFT, SimpleTuner, ai-toolkit and ComfyUI layouts
        (converted with the same ΔW by core/lora/flux_layouts.py; SimpleTuner keeps its alphas in the header)."""
        from loratrain.core.lora.flux_layouts import flux_lora_to_kohya
        from loratrain.core.weights import read_safetensors_metadata

        meta = read_safetensors_metadata(source) if source.endswith(".safetensors") else {}
        kohya = flux_lora_to_kohya(sd, meta, source)
        load_kohya_flux_state_dict(self.net, {k: v for k, v in kohya.items() if k.startswith("lora_unet_")}, source)
        return len(self.net.lora)

    def save(self, path: Any, precision: str, metadata: dict[str, str], peft_copy: bool = False) -> Any:
        """The kohya file, and with `diffusers_copy` its diffusers-layout twin (`<name>.diffusers.safetensors`)."""
        out = super().save(path, precision, metadata, False)
        if self.diffusers_copy:
            from loratrain.core.lora.flux_layouts import save_diffusers_layout
            from loratrain.core.precision import dtype_of

            save_diffusers_layout(self.kohya_state_dict(dtype_of(precision)),
                                  out.with_name(out.stem + ".diffusers.safetensors"), metadata)
        return out

    def apply_max_norm(self, max_norm: float) -> tuple[int, float, float]:
        raise ConfigError("scale_weight_norms is not implemented for FLUX.1 yet")

    def set_multiplier(self, value: float) -> None:
        self.net.set_multiplier(value)

    def args(self) -> dict[str, Any]:
        return dict(self._args)


def _not_for_sd(model: Any, spec: NetworkSpec) -> Network:
    raise ConfigError("network_module networks.lora_flux trains FLUX.1 models; this base model is SD1/SD2/SDXL (use lora)")


register(NetworkKind("lora_flux", _not_for_sd, metadata_module="networks.lora_flux"), "networks.lora_flux")
