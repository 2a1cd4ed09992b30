"""Reading kohya-layout LoRA files, their dense deltas, block-weight vectors and SVD factorisation."""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch

from loratrain.core.weights import load_state_dict

from .spec import LBW_LAYOUTS, LoraSpec, lbw_values, lbw_weights, lora_spec_problems, parse_lora_spec  # noqa: F401  (public here too)


@dataclass
class LoraModule:
    name: str
    down: torch.Tensor
    up: torch.Tensor
    alpha: float

    @property
    def rank(self) -> int:
        return self.down.shape[0]

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    kind = "lora"
    needs_base = False

    def delta(self, shape: tuple[int, ...], base: torch.Tensor | None = None) -> torch.Tensor:
        """scale * up @ down in float32, shaped like the target weight.

        A 3x3 LoCon is a k x k `down` followed by a 1x1 `up`; composing them is the matrix
        product over the rank axis, reshaped back to a kernel.
        """
        up = self.up.float().reshape(self.up.shape[0], -1)
        down = self.down.float().reshape(self.rank, -1)
        d = (up @ down) * self.scale
        if d.numel() != math.prod(shape):
            raise ValueError(f"{self.name}: LoRA delta {list(d.shape)} does not fit the model weight {list(shape)}")
        return d.reshape(shape)


def read_lora(path: str | Path) -> tuple[dict[str, LoraModule], dict[str, str]]:
    """Modules of a kohya-layout LoRA / LoCon file (`<name>.lora_down.weight`, `.lora_up.weight`, `.alpha`) or a
    LyCORIS one (LoHa, LoKr, (IA)^3, full, any of them with DoRA's `dora_scale`) or an sd-scripts OFT one
    (`oft_unet_*.oft_blocks`, read under LoRA's names) or a LyCORIS / ComfyUI-layout OFT one (`lora_unet_*.oft_blocks`);
    see `kinds.py`. FLUX.1 LoRAs in any layout `flux_layouts.py` reads come back in our kohya layout."""
    from .flux_layouts import flux_lora_to_kohya, is_flux_lora
    from .kinds import DoraModule, lycoris_module

    sd, meta = load_state_dict(path)
    if is_flux_lora(sd):  # FLUX in the diffusers / PEFT / ai-toolkit / ComfyUI layouts: to ours, same ΔW (kohya: as is)
        sd = flux_lora_to_kohya(sd, meta, source=str(path))
    groups: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in sd.items():
        name, _, part = key.partition(".")
        if name.startswith("oft_unet_"):  # sd-scripts' OFT names its UNet modules like LoRA's, with its own prefix
            name = "lora_unet_" + name[len("oft_unet_"):]
        groups.setdefault(name, {})[part] = value
    if any(".lora_A." in k or ".lora_B." in k for k in sd):
        raise ValueError(f"{path}: PEFT-layout LoRA; use the kohya-layout file our trainer writes next to it")
    modules: dict[str, LoraModule] = {}
    from .module_checks import check_lora

    for name, parts in groups.items():
        if "lora_down.weight" not in parts and "lora_up.weight" not in parts:
            try:
                other = lycoris_module(name, parts)
            except ValueError as e:
                raise ValueError(f"{path}: {e}") from None
            if other is None:
                raise ValueError(f"{path}: module {name} has {sorted(parts)[0]!r}, which is none of LoRA, LoCon, LoHa, LoKr, "
                                 "(IA)^3, full or DoRA")
            modules[name] = other  # type: ignore[assignment]
            continue
        if "lora_mid.weight" in parts:
            raise ValueError(f"{path}: module {name} is a Tucker LoCon (lora_mid), which is not supported yet")
        check_lora(f"{path}: {name}", parts)
        down, up = parts["lora_down.weight"], parts["lora_up.weight"]
        alpha = float(parts["alpha"]) if "alpha" in parts and float(parts["alpha"]) != 0 else float(down.shape[0])
        module = LoraModule(name, down, up, alpha)
        modules[name] = DoraModule(module, parts["dora_scale"]) if "dora_scale" in parts else module  # type: ignore[assignment]
    if not modules:
        raise ValueError(f"{path}: no LoRA modules found")
    return modules, meta


def lora_is_sdxl(modules: dict[str, LoraModule], meta: dict[str, str]) -> bool | None:
    """Whether a LoRA was made for SDXL, from its text-encoder names or its metadata (None: can't tell)."""
    if any(n.startswith(("lora_te1_", "lora_te2_")) for n in modules):
        return True
    if any(n.startswith("lora_te_") for n in modules):
        return False
    version = meta.get("ss_base_model_version", "") or meta.get("modelspec.architecture", "")
    if version:
        return "xl" in version.lower()
    return None


def check_family(names: object, meta: dict[str, str], family: object, lora: str | Path, model_name: str) -> None:
    """A LoRA made for the other family (SD1/SD2 vs SDXL), told from its module names or metadata, is refused by name."""
    from loratrain.core.errors import ConfigError

    made_for_sdxl = lora_is_sdxl(names, meta)  # type: ignore[arg-type]
    if made_for_sdxl is not None and made_for_sdxl != family.is_sdxl:  # type: ignore[attr-defined]
        raise ConfigError(f"{lora} is an {'SDXL' if made_for_sdxl else 'SD1/SD2'} LoRA; the model {model_name} is "
                          f"{family.name.upper()} (another model family)")  # type: ignore[attr-defined]


def factorize(delta: torch.Tensor, rank: int, clamp_quantile: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(up, down) with up @ down ~ delta by truncated SVD, clamped like sd-scripts, shaped for the weight."""
    shape = delta.shape
    mat = delta.float().reshape(shape[0], -1)
    r = min(rank, *mat.shape)
    u, s, vh = torch.linalg.svd(mat, full_matrices=False)
    up, down = u[:, :r] * s[:r], vh[:r]
    if clamp_quantile < 1:
        both = torch.cat([up.flatten(), down.flatten()]).abs()
        k = max(1, min(both.numel(), int(round(clamp_quantile * both.numel()))))
        hi = both.kthvalue(k).values.item()
        up, down = up.clamp(-hi, hi), down.clamp(-hi, hi)
    if len(shape) == 4:
        return up.reshape(shape[0], r, 1, 1), down.reshape(r, *shape[1:])
    return up, down
