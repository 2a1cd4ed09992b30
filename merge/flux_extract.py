"""`lora extract` between two FLUX.1 checkpoints (BFL layout): a kohya `lora_flux` file by truncated SVD.

Why its own site list: SD's comes from the U-Net key tables; FLUX's targets are the Linears sd-scripts' lora_flux trains
by default (every Linear of every double and single block, `flux_network.DOUBLE` / `SINGLE`), named from their BFL
paths. The recipe is `lora_extract`'s: ΔW = tuned - base per module, read one module at a time, `factorize` to --dim.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from loratrain.core.errors import ConfigError
from loratrain.core.lora.files import factorize
from loratrain.core.lora.flux_network import DOUBLE, PREFIX, SINGLE
from loratrain.core.models.flux import flux_prefix
from loratrain.core.precision import dtype_of
from loratrain.core.progress import Reporter, StopFlag
from loratrain.core.safe_io import save_safetensors
from loratrain.core.tensor_io import LazySafetensors

from .config import LoraExtractConfig


def extract_modules(cfg: LoraExtractConfig, org: LazySafetensors, tuned: LazySafetensors, p_org: str, p_tuned: str,
                    chosen: list[str], reporter: Reporter, stop: StopFlag) -> dict[str, torch.Tensor] | None:
    """kohya LoRA tensors for the modules `chosen` (paths under the two files' prefixes), by truncated SVD of
    tuned - base read one module at a time; None when stopped. The DiT families' extract (FLUX here, SD3 in
    sd3_tools.py) name their modules by path, so this part is theirs in common."""
    dtype = dtype_of(cfg.save_precision)
    result: dict[str, torch.Tensor] = {}
    reporter.start(len(chosen), "extract", unit="module")
    for p in chosen:
        if stop.is_set():
            return None
        delta = tuned.read(p_tuned + p + ".weight").float() - org.read(p_org + p + ".weight").float()
        up, down = factorize(delta, cfg.dim, cfg.clamp_quantile)
        name = PREFIX + p.replace(".", "_")
        result[f"{name}.lora_up.weight"], result[f"{name}.lora_down.weight"] = up.to(dtype), down.to(dtype)
        result[f"{name}.alpha"] = torch.tensor(float(down.shape[0]), dtype=torch.float32)
        reporter.advance(1)
    return result


def extract_flux(cfg: LoraExtractConfig, org: LazySafetensors, out: Path, reporter: Reporter, stop: StopFlag) -> object:
    from .lora_extract import LoraExtractResult

    tuned = LazySafetensors(cfg.model_tuned, what="tuned model")
    try:
        p_org, p_tuned = flux_prefix(org.tensors) or "", flux_prefix(tuned.tensors)
        if p_tuned is None:
            raise ConfigError(f"{tuned.path.name} is not a FLUX.1 transformer; {org.path.name} is")
        paths = [k[len(p_org):-len(".weight")] for k in org.tensors if k.startswith(p_org) and k.endswith(".weight")]
        chosen = [p for p in paths if (p.split(".", 2)[0] == "double_blocks" and p.split(".", 2)[2] in DOUBLE)
                  or (p.split(".", 2)[0] == "single_blocks" and p.split(".", 2)[2] in SINGLE)]
        for p in chosen:
            if p_tuned + p + ".weight" not in tuned.tensors or tuned.tensors[p_tuned + p + ".weight"].shape != org.tensors[p_org + p + ".weight"].shape:
                raise ConfigError(f"{p}.weight: missing or of another shape in {tuned.path.name}")
        t0 = time.perf_counter()
        result = extract_modules(cfg, org, tuned, p_org, p_tuned, chosen, reporter, stop)
        if result is None:
            return LoraExtractResult(output=None, stopped=True)
        meta = {"ss_network_module": "networks.lora_flux", "ss_network_dim": str(cfg.dim), "ss_network_alpha": str(cfg.dim),
                "ss_base_model_version": "flux1", "modelspec.architecture": "flux-1-dev/lora" if p_org + "guidance_in.in_layer.weight"
                in org.tensors else "flux-1-schnell/lora",
                "loratrain.extracted_from": json.dumps([org.path.name, tuned.path.name])}
        save_safetensors(result, out, meta)
        reporter.done("")
        return LoraExtractResult(output=out, modules=len(chosen), seconds=time.perf_counter() - t0)
    finally:
        tuned.close()
        org.close()
