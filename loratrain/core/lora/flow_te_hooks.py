"""A FLUX.1 / SD3 LoRA file's text-encoder modules (`lora_te1_*` CLIP-L, `lora_te2_*` CLIP-G, `lora_te3_*` T5-XXL)
hooked onto loaded encoders, for `generate` and the grid.

Why hooks and not merging: the grid turns each LoRA on and off, at several weights, on one loaded model; a hook adds
the adapter's output to its Linear's output and comes off again without touching the encoder's weights (the same
reason the transformer's adapters are hooks, hooked_network.py). The names are what training writes (sd-scripts'
lora_flux / lora_sd3 and LyCORIS' kohya wrapper): CLIP modules by their canonical `text_model.*` path
(keys.te_lora_name), T5 modules by their transformers path with `_` for `.`. LoRA, LoHa and LoKr modules all load
(hooked_kinds.make_adapter), each Linear's sizes read from the loaded encoder.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from loratrain.core.errors import ConfigError

from .hooked_network import HookedLoraNetwork, file_kind, group_kohya, load_kohya_state_dict, make_adapter
from .keys import te_lora_name

#: kohya prefix -> the model attribute holding that encoder (FluxModel / SD3Model) and its name in messages
TE_PREFIXES = {"lora_te1": ("clip_l", "CLIP-L"), "lora_te2": ("clip_g", "CLIP-G"), "lora_te3": ("t5xxl", "T5-XXL")}


def te_prefix(name: str) -> str | None:
    return next((p for p in TE_PREFIXES if name.startswith(p + "_")), None)


def encoder_linears(encoder: nn.Module, prefix: str) -> dict[str, tuple[str, nn.Linear]]:
    """kohya name -> (path, Linear) of every Linear of a loaded encoder, named as training names them."""
    clip = type(encoder).__name__.startswith("CLIP")
    out = {}
    for path, module in encoder.named_modules():
        if isinstance(module, nn.Linear):
            out[te_lora_name(prefix, path) if clip else f"{prefix}_{path.replace('.', '_')}"] = (path, module)
    return out


class TextEncoderHooks(HookedLoraNetwork):
    """One encoder's modules of a file, shaped by the file (kind and ranks) and hooked onto that encoder's Linears."""

    label = "text-encoder"

    def __init__(self, encoder: nn.Module, prefix: str, sd: Mapping[str, torch.Tensor], source: str) -> None:
        nn.Module.__init__(self)
        self.config, self.split_qkv, self._hooks = None, False, []
        groups = group_kohya(sd, source)
        linears = encoder_linears(encoder, prefix)
        unknown = sorted(n for n in groups if n not in linears)
        if unknown:
            raise ConfigError(f"{source}: {unknown[0]} names no Linear of this model's {TE_PREFIXES[prefix][1]} "
                              "(a LoRA for another text encoder?)")
        kind = file_kind(groups, source)
        self.paths = {n: linears[n][0] for n in groups}
        self.lora = nn.ModuleDict()
        for name, parts in groups.items():
            layer = linears[name][1]
            rank = parts["lora_down.weight"].shape[0] if kind == "lora" else 1
            self.lora[name] = make_adapter(kind, f"{source}: {name}", (layer.in_features, layer.out_features), rank,
                                           1.0, None, parts if kind != "lora" else None)
        load_kohya_state_dict(self, sd, source, groups)


class FlowLoraFile:
    """Everything one LoRA file changes: its transformer network (FluxLoraNetwork / SD3LoraNetwork, or None) and its
    text-encoder hooks by model attribute; `apply_to(model)` hooks them all onto a loaded FluxModel / SD3Model."""

    def __init__(self, transformer: HookedLoraNetwork | None, encoders: dict[str, TextEncoderHooks]) -> None:
        self.transformer, self.encoders = transformer, encoders

    def _parts(self) -> list[HookedLoraNetwork]:
        return ([self.transformer] if self.transformer is not None else []) + list(self.encoders.values())

    def to(self, device: Any, dtype: torch.dtype) -> FlowLoraFile:
        for net in self._parts():
            net.to(device, dtype)
        return self

    def set_multiplier(self, value: float) -> None:
        for net in self._parts():
            net.set_multiplier(value)

    def apply_to(self, model: Any) -> FlowLoraFile:
        if self.transformer is not None:
            self.transformer.apply_to(model.transformer)
        for attr, net in self.encoders.items():
            net.apply_to(getattr(model, attr))
        return self

    def remove(self) -> None:
        for net in self._parts():
            net.remove()


def split_text_encoders(sd: Mapping[str, torch.Tensor], model: Any, source: str) -> tuple[dict[str, torch.Tensor], dict[str, TextEncoderHooks]]:
    """(the file's transformer keys, its text-encoder hooks by model attribute). An encoder the model does not have
    (CLIP-G on FLUX.1, CLIP-L on Chroma) is named."""
    by_prefix: dict[str, dict[str, torch.Tensor]] = {}
    rest = {}
    for key, value in sd.items():
        prefix = te_prefix(key) if key.startswith("lora_te") else None
        if key.startswith("lora_te") and prefix is None:
            raise ConfigError(f"{source}: {key}: not a text encoder of a FLUX.1 / SD3 LoRA (lora_te1, lora_te2, lora_te3)")
        if prefix is None:
            rest[key] = value
        else:
            by_prefix.setdefault(prefix, {})[key] = value
    hooks = {}
    for prefix, part in by_prefix.items():
        attr, label = TE_PREFIXES[prefix]
        encoder = getattr(model, attr, None)
        if encoder is None:
            raise ConfigError(f"{source}: holds {label} modules ({min(part)}), but this model has no {label}")
        hooks[attr] = TextEncoderHooks(encoder, prefix, part, source)
    return rest, hooks
