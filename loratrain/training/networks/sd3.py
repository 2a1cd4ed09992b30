"""`networks.lora_sd3`: sd-scripts' SD3 / SD3.5 LoRA (core/lora/sd3_network.py) behind the trainer's Network interface.

Why a wrapper: as for FLUX.1 (flux.py here), the loop, resume states and saving talk to a `Network`; SD3's LoRA is a
hook-based module on our single-file-layout MMDiT. Only the file functions differ from FLUX's wrapper. Registered so
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

    def kohya_state_dict(self, dtype: torch.dtype) -> dict[str, torch.Tensor]:
        return kohya_sd3_state_dict(self.net, dtype)

    def load_kohya(self, sd: dict[str, torch.Tensor], source: str) -> int:
        """`--network_weights`: a kohya-layout SD3 LoRA (sd-scripts' lora_sd3 file) for the same modules."""
        te = sorted(k for k in sd if k.startswith("lora_te"))
        if te:
            raise ConfigError(f"network_weights: {source} holds text-encoder modules ({te[0]}); only the SD3 "
                              "transformer trains here")
        load_kohya_sd3_state_dict(self.net, sd, source)
        return len(self.net.lora)

    def apply_max_norm(self, max_norm: float) -> tuple[int, float, float]:
        raise ConfigError("scale_weight_norms is not implemented for SD3 yet")


def _not_for_sd(model: object, spec: NetworkSpec) -> SD3Network:
    raise ConfigError("network_module networks.lora_sd3 trains SD3 / SD3.5 models; this base model is not one (use lora)")


register(NetworkKind("lora_sd3", _not_for_sd, metadata_module="networks.lora_sd3"), "networks.lora_sd3")
