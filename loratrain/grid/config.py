"""Config of `loratrain grid` (light to import: the CLI builds its flags from it)."""
from __future__ import annotations

from dataclasses import dataclass

from ..common.config import opt
from ..common.sampling_options import SamplingOptions


@dataclass
class GridConfig(SamplingOptions):
    seed: int = opt(-1, "seed for every cell (-1: one random seed, fixed for the whole grid)")
    loras: list[str] = opt([], "LoRAs as PATH[:WEIGHT[:BLOCKS]]; the LoRA axes change the first one")
    x_type: str = opt("", "X axis: checkpoint, lora, lora_weight, lora_blocks, seed, steps, cfg_scale, sampler, "
                          "clip_skip, width, height, size, prompt_sr")
    x_values: str = opt("", "X values: a,b,c or 1-5 or 1-5 (+2) or 0-1 [5]")
    y_type: str = opt("", "Y axis (as X)")
    y_values: str = opt("", "Y values")
    z_type: str = opt("", "Z axis (optional): one grid per value, plus a sheet of all")
    z_values: str = opt("", "Z values")
    output_dir: str = opt("grid_output", "where the grid(s) and the single cells go")
    margin: int = opt(0, "gap between cells in pixels")
    draw_legend: bool = opt(True, "draw row/column labels")
    max_megapixels: float = opt(200.0, "refuse grids larger than this")
