"""transformers 4 names CLIP modules `text_model.encoder...`, transformers 5 `encoder...`.

Files (LDM checkpoints, kohya LoRAs) always use the `text_model.` form; these helpers translate
at the boundary so the rest of the code never cares which transformers is installed.
"""
from __future__ import annotations

import torch
from torch import nn


def canonical(name: str) -> str:
    if name.startswith(("text_model.", "text_projection")) or name in ("text_model",):
        return name
    return "text_model." + name


def model_uses_prefix(model: nn.Module) -> bool:
    return hasattr(model, "text_model")


def to_model_names(model: nn.Module, sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    if model_uses_prefix(model):
        return sd
    return {(k[len("text_model."):] if k.startswith("text_model.") else k): v for k, v in sd.items()}


def canonical_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    return {canonical(k): v for k, v in model.state_dict().items() if not k.endswith("position_ids")}
