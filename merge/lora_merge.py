"""Merge several LoRAs into one: exactly, by concatenating ranks, or by SVD to a chosen rank."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from loratrain.core.errors import ConfigError
from loratrain.core.jobs import JobResult, job
from loratrain.core.lora.files import LoraModule, LoraSpec, check_family, factorize, lbw_weights, lora_is_sdxl, parse_lora_spec, read_lora
from loratrain.core.precision import dtype_of
from loratrain.core.progress import Reporter, StopFlag
from loratrain.core.safe_io import new_output, save_safetensors

from .config import LoraMergeConfig


@dataclass
class LoraMergeResult(JobResult):
    output: Path | None
    modules: int = 0
    rank: int = 0

    def summary(self) -> list[str]:
        return ["stopped; nothing was written"] if self.stopped else [f"wrote {self.output}: {self.modules} modules, rank up to {self.rank}"]


@job
def run_lora_merge(cfg: LoraMergeConfig, reporter: Reporter, stop: StopFlag) -> LoraMergeResult:
    """Sum of ratio_i * block_ratio_i * delta_i per module; modules present in only some inputs are kept as they are.

    Block weights (`PATH:RATIO:BLOCKS`, as `lora bake` and the grid take them) scale each module by its U-Net
    block's weight; a module weighted 0 in every input is left out. concat is exact (ranks add up); svd
    re-factorises each summed delta to the new rank. stop is checked per module and a stopped merge writes nothing.
    """
    out = new_output(cfg.output, cfg.overwrite)
    specs = [parse_lora_spec(text) for text in cfg.loras]
    inputs: list[tuple[float, dict[str, LoraModule]]] = []
    metas = []
    for spec in specs:
        modules, meta = read_lora(spec.path)
        inputs.append((spec.ratio, modules))
        metas.append(meta)
    scales = _block_scales(cfg, specs, inputs, metas)
    names = [n for n in dict.fromkeys(n for _, mods in inputs for n in mods)
             if any(n in mods and ratio * scale.get(n, 1.0) != 0 for (ratio, mods), scale in zip(inputs, scales))]
    if not names:
        raise ConfigError("the ratios and block weights leave nothing to merge (every module's weight is 0)")
    lyco = sorted({m.kind for _, mods in inputs for m in mods.values() if not isinstance(m, LoraModule)})
    base = _Base(cfg, inputs, lyco) if lyco else None
    dtype = dtype_of(cfg.save_precision)
    result: dict[str, torch.Tensor] = {}
    ranks = set()
    reporter.start(len(names), "merge LoRAs", unit="module")
    for name in names:
        if stop.is_set():
            return LoraMergeResult(output=None, stopped=True)
        parts = [(ratio * scale.get(name, 1.0), mods[name]) for (ratio, mods), scale in zip(inputs, scales) if name in mods]
        parts = [(r, p) for r, p in parts if r != 0]  # a block weighted 0 leaves that LoRA out of the module
        if base is not None:
            site = base.sites[name]
            shapes = {(site.shape[0], tuple(site.shape[1:]))}
        else:
            shapes = {(p.up.shape[0], tuple(p.down.shape[1:])) for _, p in parts}
        if len(shapes) > 1:
            raise ValueError(f"module {name}: the LoRAs disagree on its shape ({sorted(shapes)}); are they for the same model?")
        if cfg.mode == "concat":
            down = torch.cat([p.down.float() for _, p in parts])
            up = torch.cat([p.up.float() * (r * p.scale) for r, p in parts], dim=1)
        else:
            out_dim, rest = shapes.pop()
            target = (out_dim, *rest)
            weight = base.weight(name) if base is not None and any(p.needs_base for _, p in parts) else None
            delta = sum(r * p.delta(target, weight) for r, p in parts)
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
        reporter.advance(1)
    from loratrain.core.lora.flux_layouts import is_kohya_flux

    meta = {"ss_network_module": "networks.lora_flux" if is_kohya_flux(names) else "networks.lora", "ss_network_dim": str(max(ranks)), "ss_network_alpha": str(max(ranks)),
            "loratrain.merged_loras": json.dumps([{"name": Path(s.path).name, "ratio": s.ratio, "blocks": s.blocks or None}
                                                  for s in specs]), "loratrain.merge_mode": cfg.mode}
    for key in ("ss_base_model_version", "ss_v2", "modelspec.architecture"):
        values = {m.get(key) for m in metas}
        if len(values) == 1 and None not in values:
            meta[key] = values.pop()
    if base is not None:
        base.close()
        meta["loratrain.merged_kinds"] = json.dumps(lyco)
    save_safetensors(result, out, meta)
    reporter.done("")
    return LoraMergeResult(output=out, modules=len(names), rank=max(ranks))


def _block_scales(cfg: LoraMergeConfig, specs: list[LoraSpec], inputs: list, metas: list[dict[str, str]]) -> list[dict[str, float]]:
    """Per input: module name -> its block's weight (empty: no block weights). Worked out, and every block-weight
    text checked against the family, before anything is merged.

    Which block a module is in comes from its kohya name and the U-Net layout: the --model checkpoint's when given,
    else the standard one of the LoRAs' family (SD1/SD2 or SDXL, told from their modules or metadata).
    """
    if not any(s.blocks for s in specs):
        return [{} for _ in specs]
    from loratrain.core.lora.flux_layouts import is_kohya_flux

    if any(is_kohya_flux(mods) for _, mods in inputs):  # FLUX.1: 61-value vectors, blocks from the module names
        from loratrain.core.lora.flux_blocks import flux_block_of, flux_lbw_weights

        scales = []
        for spec, (_, mods) in zip(specs, inputs):
            weights = flux_lbw_weights(spec.blocks, spec.path) if spec.blocks else None
            scales.append({n: weights[flux_block_of(n) or "IN"] for n in mods} if weights else {})
        return scales
    from loratrain.core.lora.blocks import lora_name_block
    from loratrain.core.lora.keys import unet_config
    from loratrain.core.models.families import FAMILIES
    from loratrain.core.models.ldm_keys import unet_module_pairs

    if cfg.model:
        from .checkpoint import open_model

        model, family = open_model(cfg.model, "model")
        try:
            for spec, (_, mods), meta in zip(specs, inputs, metas):
                check_family(mods, meta, family, spec.path, model.path.name)
            layout = unet_config(family, model.metadata)
        finally:
            model.close()
    else:
        kinds = {lora_is_sdxl(mods, meta) for (_, mods), meta in zip(inputs, metas)} - {None}
        if not kinds:
            raise ConfigError(f"block weights: cannot tell whether {specs[0].path} is an SD1/SD2 or an SDXL LoRA (no text "
                              "encoder modules, no ss_base_model_version); give --model, the base checkpoint")
        family = FAMILIES["sdxl" if True in kinds else "sd2" if any(m.get("ss_v2") == "True" for m in metas) else "sd1"]
        layout = family.shipped_configs()["unet"]
    ldm_of = dict(unet_module_pairs(layout))
    out = []
    for spec, (_, mods) in zip(specs, inputs):
        if not spec.blocks:
            out.append({})
            continue
        try:
            weights = lbw_weights(spec.blocks, family)
        except ValueError as e:
            raise ConfigError(f"{spec.path}: {e}") from None
        out.append({name: weights[lora_name_block(name, family, ldm_of)] for name in mods})
    return out


class _Base:
    """The base checkpoint, read lazily: module shapes for LyCORIS kinds and weights for (IA)^3 / DoRA."""

    def __init__(self, cfg: LoraMergeConfig, inputs: list, kinds: list[str]) -> None:
        from loratrain.core.errors import ConfigError

        if not cfg.model:
            raise ConfigError(f"the inputs hold {', '.join(kinds)} modules: give --model (the base checkpoint) so their "
                              "weights' shapes are known, and --mode svd")
        if cfg.mode != "svd":
            raise ConfigError(f"the inputs hold {', '.join(kinds)} modules: only --mode svd merges them (into a LoRA)")
        from loratrain.core.lora.keys import lora_sites

        from .checkpoint import open_model

        self.model, family = open_model(cfg.model, "model")
        try:
            for text, (_, mods) in zip(cfg.loras, inputs):
                check_family(mods, {}, family, parse_lora_spec(text).path, Path(cfg.model).name)
        except ConfigError:
            self.model.close()
            raise
        self.sites = lora_sites({k: v.shape for k, v in self.model.tensors.items()}, family, self.model.metadata)
        missing = [n for _, mods in inputs for n in mods if n not in self.sites]
        if missing:
            self.model.close()
            raise ConfigError(f"module {missing[0]} is not in {Path(cfg.model).name} ({len(missing)} module(s) are not); "
                              "are the LoRAs for this model?")

    def weight(self, name: str) -> torch.Tensor:
        site = self.sites[name]
        w = self.model.read(site.key).float()
        return w[site.rows[0]:site.rows[1]] if site.rows else w

    def close(self) -> None:
        self.model.close()
