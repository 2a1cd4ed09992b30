"""Extract a LoRA from the difference of two checkpoints by truncated SVD (sd-scripts' recipe).

Targets are the modules our trainer (and sd-scripts) would train: attention and MLP layers of the
U-Net transformers and text encoders, plus the ResNet / resampling convs with --conv_dim. Tensors
are read one module at a time, so memory stays small.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from loratrain.core.jobs import JobResult, job
from loratrain.core.lora.files import factorize
from loratrain.core.lora.keys import lora_sites
from loratrain.core.models.families import ModelTypeError
from loratrain.core.precision import dtype_of
from loratrain.core.progress import Reporter, StopFlag
from loratrain.core.safe_io import new_output, save_safetensors

from .checkpoint import open_model
from .config import LoraExtractConfig


@dataclass
class LoraExtractResult(JobResult):
    output: Path | None
    modules: int = 0
    seconds: float = 0.0

    def summary(self) -> list[str]:
        return ["stopped; nothing was written"] if self.stopped else [f"wrote {self.output}: {self.modules} modules in {self.seconds:.1f} s"]


@job
def run_lora_extract(cfg: LoraExtractConfig, reporter: Reporter, stop: StopFlag) -> LoraExtractResult:
    """A LoRA from the difference of two checkpoints by truncated SVD, one module at a time (sd-scripts' recipe).

    stop is checked per module; a stopped extraction writes nothing.
    """
    out = new_output(cfg.output, cfg.overwrite)
    from .flux_bake import open_flux
    from .flux_extract import extract_flux

    flux = open_flux(cfg.model_org)
    if flux is not None:  # FLUX.1: its own module list (flux_extract.py)
        return extract_flux(cfg, flux, out, reporter, stop)  # type: ignore[return-value]
    from .sd3_tools import extract_sd3, open_sd3

    sd3 = open_sd3(cfg.model_org)
    if sd3 is not None:  # SD3: the module table from the checkpoint's shapes (sd3_tools.py)
        return extract_sd3(cfg, sd3, out, reporter, stop)  # type: ignore[return-value]
    org, fam = open_model(cfg.model_org, "base model")
    tuned, fam_t = open_model(cfg.model_tuned, "tuned model")
    try:
        if fam.name != fam_t.name:
            raise ModelTypeError(f"cannot extract between a {fam.name} and a {fam_t.name} model")
        sites = {id(s): s for s in lora_sites({k: v.shape for k, v in org.tensors.items()}, fam, org.metadata).values()}
        chosen = [s for s in sites.values() if s.kind == "attn" or (cfg.conv_dim and s.kind == "conv")]
        for s in chosen:
            if s.key not in tuned or tuned.tensors[s.key].shape != org.tensors[s.key].shape:
                raise ValueError(f"{s.key}: missing or of another shape in {tuned.path.name}")
        t0 = time.perf_counter()
        result: dict[str, torch.Tensor] = {}
        te_max = 0.0
        dtype = dtype_of(cfg.save_precision)
        reporter.start(len(chosen), "extract", unit="module")
        for s in sorted(chosen, key=lambda s: org.tensors[s.key].start):
            if stop.is_set():
                return LoraExtractResult(output=None, stopped=True)
            delta = tuned.read(s.key).float() - org.read(s.key).float()
            if s.rows:
                delta = delta[s.rows[0]:s.rows[1]]
            if not s.name.startswith("lora_unet"):
                te_max = max(te_max, delta.abs().max().item())
            rank = cfg.conv_dim if s.is_3x3 else cfg.dim
            up, down = factorize(delta, rank, cfg.clamp_quantile)
            result[f"{s.name}.lora_up.weight"] = up.to(dtype)
            result[f"{s.name}.lora_down.weight"] = down.to(dtype)
            result[f"{s.name}.alpha"] = torch.tensor(float(down.shape[0]), dtype=dtype)
            reporter.advance(1)
        if te_max <= cfg.min_diff:
            result = {k: v for k, v in result.items() if k.startswith("lora_unet")}
            reporter.log(f"text encoder differs by at most {te_max:.3g} <= min_diff: U-Net only LoRA")
        meta = {"ss_network_module": "networks.lora", "ss_network_dim": str(cfg.dim), "ss_network_alpha": str(cfg.dim),
                "ss_v2": str(fam.name == "sd2"), "ss_base_model_version": fam.base_model_version,
                "ss_network_args": json.dumps({"conv_dim": str(cfg.conv_dim), "conv_alpha": str(cfg.conv_dim)}) if cfg.conv_dim else "",
                "modelspec.architecture": fam.modelspec_arch + "/lora",
                "loratrain.extracted_from": f"{org.path.name} -> {tuned.path.name}"}
        save_safetensors(result, out, {k: v for k, v in meta.items() if v})
        reporter.done("")
        return LoraExtractResult(output=out, modules=len(result) // 3, seconds=time.perf_counter() - t0)
    finally:
        org.close()
        tuned.close()
