"""LoRA block weights for FLUX.1: which block a kohya FLUX module is in, and 61-value block-weight vectors.

Why this layout: it is the one the A1111/Forge tools users already type Flux block weights into (hako-mikan's LoRA
block-weight extension and supermerger, `BLOCKIDFLUX`): 61 values, CLIP, T5, IN, D00-D18 (the 19 double-stream
blocks), S00-S37 (the 38 single-stream blocks), OUT. Modules go where those tools put them: `lora_te1_*` (CLIP-L) ->
CLIP, `lora_te3_*` (T5-XXL) -> T5, the input embedders (`img_in`, `txt_in`, `time_in`, `vector_in`, `guidance_in`)
-> IN, `double_blocks_N` -> DNN, `single_blocks_N` -> SNN, `final_layer` -> OUT. SD's 12/17/20/26-value vectors
name U-Net blocks FLUX does not have, so they are refused for FLUX rather than guessed; named presets come from
`presets/flux_block_weight.tsv` (ALL, NONE, DOUBLE, SINGLE, ...).
"""
from __future__ import annotations

import re
from functools import cache

from loratrain.core.errors import ConfigError

from .presets import HERE, read_tsv

FLUX_BLOCKS: list[str] = ["CLIP", "T5", "IN"] + [f"D{i:02d}" for i in range(19)] + [f"S{i:02d}" for i in range(38)] + ["OUT"]
_BLOCK = re.compile(r"^lora_unet_(double|single)_blocks_(\d+)_")
_IN = ("lora_unet_img_in", "lora_unet_txt_in", "lora_unet_time_in_", "lora_unet_vector_in_", "lora_unet_guidance_in_")


@cache
def flux_block_presets() -> dict[str, list[float]]:
    return read_tsv(HERE / "flux_block_weight.tsv", len(FLUX_BLOCKS))


def flux_block_of(name: str) -> str | None:
    """The block of a kohya FLUX LoRA module name; None when it is none of FLUX's modules."""
    if name.startswith("lora_te1_"):
        return "CLIP"
    if name.startswith(("lora_te3_", "lora_te2_")):
        return "T5"
    m = _BLOCK.match(name)
    if m:
        kind, index = m.group(1), int(m.group(2))
        block = f"{'D' if kind == 'double' else 'S'}{index:02d}"
        if block not in FLUX_BLOCKS:
            raise ConfigError(f"{name}: FLUX.1 has 19 double and 38 single blocks; block index {index} is beyond them")
        return block
    if name.startswith(_IN):
        return "IN"
    if name.startswith("lora_unet_final_layer_"):
        return "OUT"
    return None


def flux_lbw_weights(text: str, source: str = "") -> dict[str, float]:
    """Block name -> ratio from a FLUX preset name or 61 comma-separated values (CLIP, T5, IN, D00..D18, S00..S37, OUT);
    `source` (the LoRA they are for) leads any error message."""
    from .spec import block_values  # (spec imports this module for FLUX_BLOCKS)

    lead = f"{source}: " if source else ""
    try:
        values = block_values(text, flux_block_presets(), "FLUX")
    except ConfigError as e:
        raise ConfigError(f"{lead}{e}") from None
    if len(values) != len(FLUX_BLOCKS):
        raise ConfigError(f"{lead}FLUX block weights need {len(FLUX_BLOCKS)} values (CLIP, T5, IN, D00-D18, S00-S37, "
                          f"OUT), got {len(values)}")
    return dict(zip(FLUX_BLOCKS, values))
