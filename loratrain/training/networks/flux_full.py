"""`--network_module full` with a FLUX.1 model: the transformer's own weights train, as sd-scripts' flux_train.py
trains them (the text encoders and the AE stay frozen), and every save is a single BFL-layout file.

Why a Network: the training loop, resume states and saving talk to a `Network` (parts, parameter groups, state dict,
save), so the FLUX trainer's whole loop (data, flow-matching loss, schedules, resume) serves the full fine-tune too.
The transformer is the network here; with `--fsdp` it is sharded (training/fsdp.py) and the state the saves read is
gathered beforehand by the trainer (training/flux_full.py), because gathering needs every process.

The saved file holds the bare BFL keys (`double_blocks.0.img_attn.qkv.weight`, ...), as sd-scripts'
flux_train_utils.save_models writes `flux.state_dict()`: what BFL's own files, ComfyUI and our loader read.
"""
from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from loratrain.core.errors import ConfigError

from .base import Network, NetworkSpec, Target


class _InPlace:
    """What the FLUX trainer's setup calls on a LoRA (`net.to(device, dtype).apply_to(transformer)`): nothing is
    attached to the transformer, whose weights were cast and placed (and sharded) before this."""

    def to(self, *args: Any, **kwargs: Any) -> _InPlace:
        return self

    def apply_to(self, transformer: nn.Module) -> None:
        pass


class FluxFullNetwork(Network):
    """The transformer as the network. `key_prefix` goes in front of its keys in the saved file and `extra` gives
    tensors saved beside them (SD3: `model.diffusion_model.` and the VAE as `first_stage_model.*`, as sd-scripts'
    sd3_train.py writes; FLUX.1: bare BFL keys, nothing else); `label` names the family in messages."""

    kind = "full"

    def __init__(self, transformer: nn.Module, spec: NetworkSpec, key_prefix: str = "",
                 extra: Callable[[], dict[str, torch.Tensor]] | None = None, label: str = "FLUX.1") -> None:
        super().__init__(None, spec, [Target("unet", "", "transformer", 0, 0.0)])
        self.transformer, self.net, self.te = transformer, _InPlace(), None
        self.key_prefix, self.extra, self.label = key_prefix, extra, label
        transformer.requires_grad_(True)
        self.gathered: dict[str, torch.Tensor] | None = None  # the full weights for the next save (set by the trainer)

    def parts(self) -> dict[str, nn.Module]:
        return {"unet": self.transformer}

    def param_groups(self, lrs: dict[str, float]) -> list[dict[str, Any]]:
        return [{"params": [p for p in self.transformer.parameters() if p.requires_grad], "lr": lrs["unet"], "name": "unet"}]

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The whole transformer, BFL keys, full precision (for resume)."""
        if self.gathered is not None:
            return self.gathered
        return {k: v.detach().to("cpu", copy=True).contiguous() for k, v in self.transformer.state_dict().items()}

    def load_state_dict(self, sd: dict[str, torch.Tensor]) -> None:
        from ..fsdp import is_sharded, load_full_model_state

        own = self.transformer.state_dict()
        if set(sd) != set(own):
            extra, missing = sorted(set(sd) - set(own)), sorted(set(own) - set(sd))
            raise ConfigError(f"the training state is not a full fine-tune of this {self.label} model "
                              f"({'unexpected ' + extra[0] if extra else 'missing ' + missing[0]}); was it a LoRA run?")
        if any(is_sharded(p) for p in self.transformer.parameters()):
            load_full_model_state(self.transformer, sd)
            return
        for k, v in own.items():
            if v.shape != sd[k].shape:
                raise ConfigError(f"the training state does not fit this {self.label} model ({k}: {tuple(sd[k].shape)} vs "
                                  f"{tuple(v.shape)})")
        self.transformer.load_state_dict(sd, strict=True)

    def save(self, path: Path, precision: str, metadata: dict[str, str], peft_copy: bool = False) -> Path:
        """The transformer as one single file with the bare BFL keys (sd-scripts' flux_train.py layout), in the save
        precision, with the modelspec metadata (architecture flux-1-dev / flux-1-schnell / chroma, no /lora), written
        atomically."""
        from loratrain.core.precision import dtype_of
        from loratrain.core.safe_io import save_safetensors

        dtype = dtype_of(precision)
        sd = {self.key_prefix + k: v for k, v in self.state_dict().items()}
        sd.update(self.extra() if self.extra is not None else {})
        flat = {k: (v.to(dtype) if v.is_floating_point() else v).contiguous() for k, v in sd.items()}
        keep = {k: v for k, v in metadata.items() if k.startswith(("modelspec.", "ss_training_comment", "ss_output_name",
                                                                    "ss_base_model_version", "ss_model_type"))}
        save_safetensors(flat, path, {**keep, "loratrain.full_finetune": "1"})
        return path

    def kohya_state_dict(self, dtype: torch.dtype) -> dict[str, torch.Tensor]:
        raise ConfigError("a full fine-tune saves the model; `lora extract` against the base gives a LoRA of it")

    def load_kohya(self, sd: dict[str, torch.Tensor], source: str) -> int:
        raise ConfigError(f"network_weights: {source} is a LoRA; a full fine-tune starts from a model file "
                          "(pretrained_model_name_or_path) or its own training state")

    def peft_state_dict(self, dtype: torch.dtype) -> dict[str, dict[str, torch.Tensor]]:
        raise ConfigError("a full fine-tune has no PEFT adapter to save")

    def apply_max_norm(self, max_norm: float) -> tuple[int, float, float]:
        raise ConfigError("scale_weight_norms applies to LoRA networks, not a full fine-tune")

    def set_multiplier(self, value: float) -> None:
        pass

    def args(self) -> dict[str, Any]:
        return {}
