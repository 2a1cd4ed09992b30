"""sd-scripts' per-block network arguments of `networks.lora`: block_dims / block_alphas / conv_block_*,
down/mid/up_lr_weight with block_lr_zero_threshold.

Blocks are sd-scripts' indices (networks/lora.py get_block_index): SD1/SD2 have 25 (IN00..IN11,
MID, OUT00..OUT11; IN00 has no LoRA module), SDXL 23 (0: time/label embedding, 1-9 input blocks
0-8, 10-12 the middle block's three parts, 13-21 output blocks 0-8, 22: out). A block whose
learning-rate weight is 0 (or at most the threshold) gets no module at all, as in sd-scripts.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass

SD_BLOCKS, SDXL_BLOCKS = 25, 23
LR_PRESETS = ("cosine", "sine", "linear", "reverse_linear", "zeros")
#: values of each lr weight option: (SD1/SD2, SDXL) - sd-scripts' NUM_OF_BLOCKS / NUM_OF_MID_BLOCKS and their SDXL
#: counterparts (sd-scripts pads a short list with 1 and cuts a long one; a wrong count here is refused instead)
LR_WEIGHT_COUNTS = {"down_lr_weight": (12, 9), "mid_lr_weight": (1, 3), "up_lr_weight": (12, 9)}
_SD1 = re.compile(r"lora_unet_(down|up)_blocks_(\d+)_(resnets|attentions|downsamplers|upsamplers)_(\d+)_")


@dataclass
class BlockSpec:
    dims: str = ""
    alphas: str = ""
    conv_dims: str = ""
    conv_alphas: str = ""
    down_lr_weight: str = ""
    mid_lr_weight: str = ""
    up_lr_weight: str = ""
    lr_zero_threshold: float = 0.0

    def __bool__(self) -> bool:
        return any((self.dims, self.conv_dims, self.down_lr_weight, self.mid_lr_weight, self.up_lr_weight))


def block_index(kohya_name: str, is_sdxl: bool) -> int:
    """sd-scripts' block of a UNet LoRA module name (-1: none)."""
    if not is_sdxl:
        m = _SD1.search(kohya_name)
        if m:
            side, i, kind, j = m.group(1), int(m.group(2)), m.group(3), int(m.group(4))
            idx = 3 * i + (2 if kind in ("downsamplers", "upsamplers") else j)
            return 1 + idx if side == "down" else 13 + idx
        return 12 if "mid_block_" in kohya_name else -1
    name = kohya_name.removeprefix("lora_unet_")
    for prefix, first in (("input_blocks_", 1), ("middle_block_", 10), ("output_blocks_", 13)):
        if name.startswith(prefix):
            return first + int(name[len(prefix):].split("_")[0])
    return 22 if name.startswith("out_") else 0


def _numbers(text: str, what: str, count: int | None, parse=float) -> list:  # noqa: ANN001
    try:
        values = [parse(v) if v.strip() else 0 for v in text.split(",")]
    except ValueError:
        raise ValueError(f"{what}: {text!r} is not a comma-separated list of numbers") from None
    if count is not None and len(values) != count:
        raise ValueError(f"{what}: {len(values)} values, the model has {count} blocks "
                         f"({SD_BLOCKS} for SD1/SD2, {SDXL_BLOCKS} for SDXL)")
    return values


def check_text(spec: BlockSpec) -> list[tuple[str, str]]:
    """What can be checked before the model (and so the block count) is known."""
    out = []
    for field, parse in (("dims", int), ("alphas", float), ("conv_dims", int), ("conv_alphas", float)):
        text = getattr(spec, field)
        if text:
            name = field.replace("dims", "block_dims").replace("alphas", "block_alphas")
            try:
                values = _numbers(text, name, None, parse)
                if len(values) not in (SD_BLOCKS, SDXL_BLOCKS):
                    out.append((name, f"{len(values)} values; {SD_BLOCKS} for SD1/SD2, {SDXL_BLOCKS} for SDXL"))
            except ValueError as e:
                out.append((name, str(e)))
    for field in ("down_lr_weight", "mid_lr_weight", "up_lr_weight"):
        text = getattr(spec, field)
        if text and "," not in text and field != "mid_lr_weight":
            if text.split("+")[0] not in LR_PRESETS:
                out.append((field, f"{text!r}: a list of numbers or one of {', '.join(LR_PRESETS)} (with +offset)"))
        elif text:
            try:
                values = _numbers(text, field, None)
            except ValueError as e:
                out.append((field, str(e)))
                continue
            counts = LR_WEIGHT_COUNTS[field]
            if len(values) not in counts:
                out.append((field, f"{len(values)} values; give {counts[0]} (SDXL: {counts[1]}), one per block"
                                   + ("" if field == "mid_lr_weight" else f", or a preset ({', '.join(LR_PRESETS)})")))
    return out


def count_problems(spec: BlockSpec, is_sdxl: bool) -> list[tuple[str, str]]:
    """With the family known (before the model loads, from its header): exactly one value per block of that family."""
    family, i = ("SDXL", 1) if is_sdxl else ("SD1/SD2", 0)
    out = []
    for field in ("down_lr_weight", "mid_lr_weight", "up_lr_weight"):
        text = getattr(spec, field)
        n = LR_WEIGHT_COUNTS[field][i]
        if text and ("," in text or field == "mid_lr_weight"):
            try:
                count = len(_numbers(text, field, None))
            except ValueError:
                continue  # check_text names it
            if count != n:
                out.append((field, f"{count} values; the model is {family}: give {n}, one per block"))
    for field, name in (("dims", "block_dims"), ("alphas", "block_alphas"), ("conv_dims", "conv_block_dims"),
                        ("conv_alphas", "conv_block_alphas")):
        text, n = getattr(spec, field), SDXL_BLOCKS if is_sdxl else SD_BLOCKS
        if text and len(text.split(",")) in (SD_BLOCKS, SDXL_BLOCKS) and len(text.split(",")) != n:
            out.append((name, f"{len(text.split(','))} values; the model is {family}: give {n}, one per block"))
    return out


def _preset(text: str, n: int) -> list[float]:
    name, _, offset = text.partition("+")
    base = float(offset) if offset else 0.0
    ramp = [i / (n - 1) for i in range(n)]
    values = {"sine": [math.sin(math.pi * r / 2) for r in ramp], "cosine": [math.sin(math.pi * r / 2) for r in reversed(ramp)],
              "linear": ramp, "reverse_linear": list(reversed(ramp)), "zeros": [0.0] * n}[name]
    return [v + base for v in values]


def lr_weights(spec: BlockSpec, is_sdxl: bool) -> list[float] | None:
    """The learning-rate weight of every block (None: no block learning rates): one value per block (a wrong count
    is refused, where sd-scripts fills a short list with 1 and cuts a long one); weights at or below the threshold
    become 0."""
    if not (spec.down_lr_weight or spec.mid_lr_weight or spec.up_lr_weight):
        return None
    problems = count_problems(spec, is_sdxl)
    if problems:
        raise ValueError(f"{problems[0][0]}: {problems[0][1]}")
    n, n_mid = (9, 3) if is_sdxl else (12, 1)

    def side(text: str, length: int) -> list[float]:
        if not text:
            return [1.0] * length
        values = _preset(text, length) if "," not in text and text.split("+")[0] in LR_PRESETS else _numbers(text, "lr weight", None)
        return [w if w > spec.lr_zero_threshold else 0.0 for w in values]

    weights = side(spec.down_lr_weight, n) + side(spec.mid_lr_weight, n_mid) + side(spec.up_lr_weight, n)
    return [1.0] + weights + [1.0] if is_sdxl else weights


def block_ranks(spec: BlockSpec, is_sdxl: bool, dim: int, alpha: float, conv_dim: int | None,
                conv_alpha: float | None) -> tuple[list[int], list[float], list[int] | None, list[float] | None]:
    """(dims, alphas, conv dims, conv alphas) per block; blocks with a zero learning-rate weight get rank 0."""
    n = SDXL_BLOCKS if is_sdxl else SD_BLOCKS
    dims = _numbers(spec.dims, "block_dims", n, int) if spec.dims else [dim] * n
    alphas = _numbers(spec.alphas, "block_alphas", n) if spec.alphas else [alpha] * n
    conv_dims = conv_alphas = None
    if spec.conv_dims:
        conv_dims = _numbers(spec.conv_dims, "conv_block_dims", n, int)
        conv_alphas = (_numbers(spec.conv_alphas, "conv_block_alphas", n) if spec.conv_alphas
                       else [conv_alpha if conv_alpha is not None else 1.0] * n)
    elif conv_dim:
        conv_dims, conv_alphas = [conv_dim] * n, [conv_alpha if conv_alpha is not None else 1.0] * n
    for i, w in enumerate(lr_weights(spec, is_sdxl) or []):
        if w == 0:
            dims[i] = 0
            if conv_dims is not None:
                conv_dims[i] = 0
    return dims, alphas, conv_dims, conv_alphas
