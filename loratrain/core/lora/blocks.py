"""Which U-Net block a checkpoint key belongs to, and block-weight vectors.

SD1/SD2: 25 blocks IN00-IN11, M00, OUT00-OUT11 (the block-weighted merge extension's mapping:
`time_embed` counts as IN00, the final `out.` as OUT11). SDXL: 19 blocks IN00-IN08, M00,
OUT00-OUT08 (supermerger's layout: `time_embed` and `label_emb` are IN00, `out.` is OUT08).
Every other key (text encoders, VAE, unmatched U-Net keys) takes BASE, i.e. `base_alpha`.
"""
from __future__ import annotations

import re
from collections.abc import Sequence

from loratrain.core.models.families import UNET_PREFIX, Family

BASE = "BASE"
_INPUT = re.compile(r"\.input_blocks\.(\d+)\.")
_OUTPUT = re.compile(r"\.output_blocks\.(\d+)\.")


def n_levels(family: Family) -> int:
    """Input (and output) blocks per side: 12 for SD1/SD2, 9 for SDXL."""
    return 9 if family.is_sdxl else 12


def block_names(family: Family) -> list[str]:
    n = n_levels(family)
    return [f"IN{i:02d}" for i in range(n)] + ["M00"] + [f"OUT{i:02d}" for i in range(n)]


def block_of(key: str, family: Family) -> str:
    """The block name of a checkpoint key (LDM layout), BASE for keys outside the U-Net blocks."""
    if not key.startswith(UNET_PREFIX):
        return BASE
    n = n_levels(family)
    if "time_embed" in key or (family.is_sdxl and "label_emb" in key):
        return "IN00"
    if ".out." in key:
        return f"OUT{n - 1:02d}"
    m = _INPUT.search(key)
    if m:
        return _checked(f"IN{int(m.group(1)):02d}", int(m.group(1)), n, key)
    if ".middle_block." in key:
        return "M00"
    m = _OUTPUT.search(key)
    if m:
        return _checked(f"OUT{int(m.group(1)):02d}", int(m.group(1)), n, key)
    return BASE


def _checked(name: str, index: int, n: int, key: str) -> str:
    if index >= n:
        raise ValueError(f"illegal block index {index} in key {key!r} (the model has {n} blocks per side)")
    return name


def parse_values(text: str | Sequence[float], what: str) -> list[float]:
    if isinstance(text, str):
        items = [t for t in re.split(r"[,\s]+", text.strip()) if t]
    else:
        items = list(text)
    try:
        return [float(v) for v in items]
    except ValueError:
        raise ValueError(f"{what}: every value must be a number, got {text!r}") from None


def block_weights(values: Sequence[float], family: Family, base_alpha: float) -> dict[str, float]:
    """Name -> weight for a family, from 25 values (SD1/SD2) or 19 or 25 values (SDXL).

    A 25-value vector given for SDXL is converted as supermerger does: IN00-IN08, M00 and
    OUT00-OUT08 are kept, IN09-IN11 and OUT09-OUT11 dropped, so SD1 presets work on SDXL.
    """
    values = list(values)
    names = block_names(family)
    if family.is_sdxl and len(values) == 25:
        values = values[:9] + [values[12]] + values[13:22]
    if len(values) != len(names):
        allowed = "19 (or 25, converted)" if family.is_sdxl else "25"
        raise ValueError(f"block weights: {family.name} needs {allowed} values "
                         f"({names[0]}..{names[-1]}), got {len(values)}")
    out = dict(zip(names, values))
    out[BASE] = float(base_alpha)
    return out


_LORA_DIFFUSERS = re.compile(r"lora_unet_(down_blocks|up_blocks)_(\d+)_(attentions|resnets|downsamplers|upsamplers)_(\d+)_")
_LORA_LDM = re.compile(r"lora_unet_(input_blocks|output_blocks)_(\d+)_")


def lora_name_block(name: str, family: Family, ldm_of: dict[str, str]) -> str:
    """The block of a kohya LoRA module name; `ldm_of` maps diffusers UNet module paths to LDM ones."""
    if not name.startswith("lora_unet_"):
        return BASE
    if name.startswith(("lora_unet_mid_block_", "lora_unet_middle_block_")):
        return "M00"
    m = _LORA_LDM.match(name)
    if m:
        return block_of(f"{UNET_PREFIX}{m.group(1)}.{m.group(2)}.x", family)
    m = _LORA_DIFFUSERS.match(name)
    if m:
        prefix = ".".join(m.groups())
        for diff, ldm in ldm_of.items():
            if diff == prefix or diff.startswith(prefix + "."):
                return block_of(f"{UNET_PREFIX}{ldm}.x", family)
    return BASE
