"""Bake LoRAs into a checkpoint: W += ratio * block_ratio * (alpha/rank) * up @ down, streamed.

Only the weights a LoRA touches are read whole; everything else is copied through in chunks, so
memory stays small for any model size. LoRAs are applied in the order given.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from loratrain.core.errors import ConfigError
from loratrain.core.jobs import JobResult, Stopped, job
from loratrain.core.lora.files import LoraModule, check_family, lbw_weights, parse_lora_spec, read_lora
from loratrain.core.lora.keys import LoraSite, lora_sites
from loratrain.core.progress import Reporter, StopFlag
from loratrain.core.safe_io import new_output
from loratrain.core.tensor_io import OutputTensor, StreamingWriter, out_dtype

from .checkpoint import copy_tensor, open_model
from .config import BakeConfig


@dataclass
class BakeResult(JobResult):
    output: Path | None
    loras: int = 0
    weights_changed: int = 0
    seconds: float = 0.0

    def summary(self) -> list[str]:
        if self.stopped:
            return ["stopped; nothing was written"]
        return [f"wrote {self.output}: {self.loras} LoRA(s) baked into {self.weights_changed} weights in {self.seconds:.1f} s"]


def check_delta(path: str, module: object, shape: tuple[int, ...]) -> None:
    """A module's ΔW for a weight of `shape`, worked out once before anything is written, so a file whose module does
    not fit is named (file and module) rather than failing half way; kinds that need the weight itself (DoRA, (IA)^3,
    OFT) are checked when it is in hand."""
    if getattr(module, "needs_base", False):
        return
    try:
        module.delta(shape)  # type: ignore[attr-defined]
    except (ValueError, RuntimeError) as e:
        raise ConfigError(f"{path}: {e}") from None


@dataclass
class _Applied:
    module: LoraModule
    site: LoraSite
    ratio: float


@job
def run_lora_bake(cfg: BakeConfig, reporter: Reporter, stop: StopFlag) -> BakeResult:
    """W += ratio * block_ratio * (alpha/rank) * up @ down for every LoRA, streamed into a new checkpoint (SD1/SD2/SDXL
    here, FLUX.1 in flux_bake.py).

    Every LoRA is read and shape-checked against the model before the output is opened; stop is
    checked per tensor and a stopped bake writes nothing. Result: the output and how many weights changed.
    """
    out = new_output(cfg.output, cfg.overwrite)
    from .flux_bake import bake_flux, open_flux

    flux = open_flux(cfg.model)
    if flux is not None:  # a FLUX.1 transformer: its own planner, this module's writer (flux_bake.py)
        return bake_flux(cfg, flux, out, reporter, stop)  # type: ignore[return-value]
    from .sd3_tools import bake_sd3, open_sd3

    sd3 = open_sd3(cfg.model)
    if sd3 is not None:  # an SD3 MMDiT file: its module table from its shapes (sd3_tools.py)
        return bake_sd3(cfg, sd3, out, reporter, stop)  # type: ignore[return-value]
    model, family = open_model(cfg.model, "model")
    try:
        if out.resolve() == model.path.resolve():
            raise ConfigError("--output is the input model; choose another file")
        sites = lora_sites({k: v.shape for k, v in model.tensors.items()}, family, model.metadata)
        by_key: dict[str, list[_Applied]] = {}
        recipe = []
        for text in cfg.loras:
            spec = parse_lora_spec(text)
            modules, lora_meta = read_lora(spec.path)
            check_family(modules, lora_meta, family, spec.path, model.path.name)
            blocks = lbw_weights(spec.blocks, family) if spec.blocks else None
            unknown = [n for n in modules if n not in sites]
            if len(unknown) == len(modules):
                raise ValueError(f"{spec.path}: none of its {len(modules)} modules exist in {model.path.name} "
                                 f"(a {family.name} model); is the LoRA for another model family?")
            if unknown:
                reporter.log(f"{spec.path}: {len(unknown)} modules not in the model were skipped (e.g. {unknown[0]})")
            for name, module in modules.items():
                site = sites.get(name)
                if site is None:
                    continue
                ratio = spec.ratio * (blocks[site.block] if blocks else 1.0)
                check_delta(spec.path, module, site.shape)
                if ratio != 0:
                    by_key.setdefault(site.key, []).append(_Applied(module, site, ratio))
            recipe.append({"name": Path(spec.path).name, "ratio": spec.ratio, "blocks": spec.blocks or None})
        return write_bake(cfg, model, by_key, recipe, out, reporter, stop)
    finally:
        model.close()


def write_bake(cfg: BakeConfig, model: Any, by_key: dict[str, list[_Applied]], recipe: list[dict[str, Any]], out: Path,
               reporter: Reporter, stop: StopFlag) -> BakeResult:
    """Stream the checkpoint into `out` with every planned ΔW added (the SD and FLUX bakes' common writer); the
    metadata is the model's (less sd_merge*) plus the recipe. A stopped bake writes nothing."""
    plan = [OutputTensor(k, out_dtype(model.tensors[k].dtype, cfg.save_precision), model.tensors[k].shape) for k in model.keys()]
    meta = {k: v for k, v in model.metadata.items() if not k.startswith("sd_merge")}
    meta["format"] = "pt"
    meta["loratrain.baked_loras"] = json.dumps(recipe)
    t0 = time.perf_counter()
    reporter.start(len(plan), "bake", unit="tensor")
    try:
        _write_baked(model, plan, meta, by_key, out, reporter, stop)
    except Stopped:
        reporter.done("")
        return BakeResult(output=None, stopped=True)
    reporter.done("")
    return BakeResult(output=out, loras=len(cfg.loras), weights_changed=len(by_key), seconds=time.perf_counter() - t0)


def _write_baked(model: Any, plan: list[OutputTensor], meta: dict[str, str], by_key: dict[str, list[_Applied]], out: Path,
                 reporter: Reporter, stop: StopFlag) -> None:
    with StreamingWriter(out, plan, meta) as writer:
        for item in plan:
            if stop.is_set():
                raise Stopped
            applied = by_key.get(item.name)
            if applied:
                w = model.read(item.name).to(torch.float32, copy=True)
                original = w.clone() if any(a.module.needs_base for a in applied) else None
                for a in applied:
                    target = w[a.site.rows[0]:a.site.rows[1]] if a.site.rows else w
                    base = None
                    if original is not None:  # (IA)^3 and DoRA change the model's own weight: the original one
                        base = original[a.site.rows[0]:a.site.rows[1]] if a.site.rows else original
                    target += a.ratio * a.module.delta(a.site.shape, base)
                writer.write(w.to(item.dtype))
            else:
                copy_tensor(model, item.name, item.dtype, writer)
            reporter.advance(1)
