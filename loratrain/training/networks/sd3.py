"""`networks.lora_sd3`: sd-scripts' SD3 / SD3.5 LoRA (core/lora/sd3_network.py) behind the trainer's Network interface.

Why a wrapper: as for FLUX.1 (flux.py here), the loop, resume states and saving talk to a `Network`; SD3's LoRA is a
hook-based module on our single-file-layout MMDiT (the text-encoder half, CLIP-L / CLIP-G / T5, is FLUX's
FlowTextEncoderLoRA). Only the file functions differ from FLUX's wrapper. Registered so
`--network_module networks.lora_sd3` is a known name and the file's `ss_network_module` is sd-scripts' own.
"""
from __future__ import annotations

import torch

from loratrain.core.errors import ConfigError
from loratrain.core.lora.sd3_network import kohya_sd3_state_dict, load_kohya_sd3_state_dict

from .base import NetworkKind, NetworkSpec, register
from .flux import FluxNetwork


class SD3Network(FluxNetwork):
    kind = "lora_sd3"

    def _unet_kohya(self, dtype: torch.dtype) -> dict[str, torch.Tensor]:
        return kohya_sd3_state_dict(self.net, dtype)

    def _write_diffusers(self, sd: dict[str, torch.Tensor], path: object, metadata: dict[str, str]) -> None:
        from loratrain.core.lora.sd3_layouts import save_sd3_diffusers_layout

        save_sd3_diffusers_layout(sd, self.net.config, path, metadata)

    def load_kohya(self, sd: dict[str, torch.Tensor], source: str) -> int:
        """`--network_weights`: a kohya-layout SD3 LoRA (sd-scripts' lora_sd3 file) for the same modules; its
        lora_te1/2/3 modules load into the text-encoder LoRA of a run that trains them (FluxNetwork._load_te)."""
        from loratrain.core.lora.sd3_layouts import diffusers_sd3_to_kohya, is_diffusers_sd3_lora

        unet = {k: v for k, v in sd.items() if not k.startswith("lora_te")}
        if is_diffusers_sd3_lora(unet):  # diffusers' PEFT layout (our --save_diffusers_layout twin): same ΔW
            unet = diffusers_sd3_to_kohya(unet, self.net.config, source)
        load_kohya_sd3_state_dict(self.net, unet, source)
        return len(self.net.lora) + self._load_te(sd, source)

    def apply_max_norm(self, max_norm: float) -> tuple[int, float, float]:
        raise ConfigError("scale_weight_norms is not implemented for SD3 yet")


def _not_for_sd(model: object, spec: NetworkSpec) -> SD3Network:
    raise ConfigError("network_module networks.lora_sd3 trains SD3 / SD3.5 models; this base model is not one (use lora)")


register(NetworkKind("lora_sd3", _not_for_sd, metadata_module="networks.lora_sd3",
                      file_markers=(".lora_down.weight", ".lora_A.weight")),  # kohya, or diffusers' PEFT layout
         "networks.lora_sd3")
