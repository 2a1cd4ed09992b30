"""The base model and what is merged into it before training."""
from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel

from loratrain.core.config import opt
from loratrain.core.errors import Problem

from . import MODEL


class ModelOptions(BaseModel):
    pretrained_model_name_or_path: str = opt("", "diffusers folder, HF cache folder or single-file .safetensors checkpoint",
                                             group=MODEL, path="any")
    vae: str = opt("", "a separate VAE file (.safetensors; LDM keys as A1111's VAE files, or diffusers keys) used instead of the "
                        "model's own", group=MODEL, path="file", advanced=True)
    v_parameterization: bool | None = opt(None, "v-prediction target (SD2 768-v); default: from the model", group=MODEL, advanced=True)
    allow_pickle: bool = opt(False, "allow a pickled .ckpt base model (loaded with weights_only=True)", group=MODEL, advanced=True)
    base_weights: list[str] = opt([], "LoRA / LyCORIS files merged into the base model before training (sd-scripts' "
                                      "base_weights)", group=MODEL, advanced=True, path="file")
    base_weights_multiplier: list[float] = opt([], "the weight of each base_weights file (default 1)", group=MODEL, advanced=True)

    def problems(self) -> list[Problem]:
        out: list[Problem] = []
        if self.base_weights_multiplier and len(self.base_weights_multiplier) != len(self.base_weights):
            out.append(("base_weights_multiplier", f"{len(self.base_weights_multiplier)} values for {len(self.base_weights)} "
                                                   "base_weights files"))
        return out

    def requirements(self) -> list[Problem]:
        from ..config_checks import base_weights_problems, vae_problems

        out: list[Problem] = []
        if not self.pretrained_model_name_or_path:
            out.append(("pretrained_model_name_or_path", "is required"))
        elif not Path(self.pretrained_model_name_or_path).expanduser().exists():
            out.append(("pretrained_model_name_or_path", f"model not found: {self.pretrained_model_name_or_path}"))
        if self.vae:
            out += vae_problems(Path(self.vae))
        return out + base_weights_problems(self)
