"""Merge several LoRAs into one: exactly, by concatenating ranks, or by SVD to a chosen rank."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from loratrain.common.config import CommandConfig, ConfigError, opt
from loratrain.common.safe_io import new_output, save_safetensors

from .lora_files import LoraModule, factorize, parse_lora_spec, read_lora
from .tensor_io import SAVE_DTYPES


@dataclass
class LoraMergeConfig(CommandConfig):
    loras: list[str] = opt([], "LoRA files as PATH[:RATIO]")
    output: str = opt("", "output .safetensors")
    mode: str = opt("concat", "concat: exact sum, rank = sum of ranks; svd: re-factorise to --new_rank",
                    metadata={"choices": ["concat", "svd"]})
    new_rank: int = opt(16, "svd: rank of linear / 1x1 modules")
    new_conv_rank: int | None = opt(None, "svd: rank of 3x3 conv modules (default: new_rank)")
    clamp_quantile: float = opt(0.99, "svd: clamp factors to this quantile of their magnitudes (1 = off)")
    save_precision: str = opt("fp16", "output dtype", metadata={"choices": list(SAVE_DTYPES)})
    overwrite: bool = opt(False, "replace the output if it exists")


def merge_loras(cfg: LoraMergeConfig) -> Path:
    """Sum of ratio_i * delta_i per module; modules present in only some inputs are kept as they are."""
    if len(cfg.loras) < 1 or not cfg.output:
        raise ConfigError("lora merge needs --loras (one or more) and --output")
    out = new_output(cfg.output, cfg.overwrite)
    inputs: list[tuple[float, dict[str, LoraModule]]] = []
    metas = []
    for text in cfg.loras:
        spec = parse_lora_spec(text)
        if spec.blocks:
            raise ConfigError(f"{text}: block weights apply when baking into a model (lora bake), not here")
        modules, meta = read_lora(spec.path)
        inputs.append((spec.ratio, modules))
        metas.append(meta)
    names = list(dict.fromkeys(n for _, mods in inputs for n in mods))
    dtype = SAVE_DTYPES[cfg.save_precision]
    result: dict[str, torch.Tensor] = {}
    ranks = set()
    for name in names:
        parts = [(ratio, mods[name]) for ratio, mods in inputs if name in mods]
        shapes = {(p.up.shape[0], tuple(p.down.shape[1:])) for _, p in parts}
        if len(shapes) > 1:
            raise ValueError(f"module {name}: the LoRAs disagree on its shape ({sorted(shapes)}); are they for the same model?")
        if cfg.mode == "concat":
            down = torch.cat([p.down.float() for _, p in parts])
            up = torch.cat([p.up.float() * (r * p.scale) for r, p in parts], dim=1)
        else:
            out_dim, rest = shapes.pop()
            target = (out_dim, *rest)
            delta = sum(r * p.delta(target) for r, p in parts)
            is_3x3 = len(rest) == 3 and rest[1:] != (1, 1)
            rank = (cfg.new_conv_rank or cfg.new_rank) if is_3x3 else cfg.new_rank
            up, down = factorize(delta, rank, cfg.clamp_quantile)
            if len(rest) == 1:
                up = up.reshape(out_dim, -1)
        rank = down.shape[0]
        ranks.add(rank)
        result[f"{name}.lora_down.weight"] = down.to(dtype)
        result[f"{name}.lora_up.weight"] = up.to(dtype)
        result[f"{name}.alpha"] = torch.tensor(float(rank), dtype=dtype)  # alpha = rank: scale 1, ratios are inside
    meta = {"ss_network_module": "networks.lora", "ss_network_dim": str(max(ranks)), "ss_network_alpha": str(max(ranks)),
            "loratrain.merged_loras": json.dumps([{"name": Path(parse_lora_spec(t).path).name, "ratio": parse_lora_spec(t).ratio}
                                                  for t in cfg.loras]), "loratrain.merge_mode": cfg.mode}
    for key in ("ss_base_model_version", "ss_v2", "modelspec.architecture"):
        values = {m.get(key) for m in metas}
        if len(values) == 1 and None not in values:
            meta[key] = values.pop()
    save_safetensors(result, out, meta)
    return out
