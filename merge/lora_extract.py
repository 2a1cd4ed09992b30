"""Extract a LoRA from the difference of two checkpoints by truncated SVD (sd-scripts' recipe).

Targets are the modules our trainer (and sd-scripts) would train: attention and MLP layers of the
U-Net transformers and text encoders, plus the ResNet / resampling convs with --conv_dim. Tensors
are read one module at a time, so memory stays small.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch

from loratrain.common.config import CommandConfig, ConfigError, opt
from loratrain.common.progress import Reporter, TqdmReporter
from loratrain.common.safe_io import new_output, save_safetensors
from loratrain.models.families import ModelTypeError

from .checkpoint import open_model
from .lora_files import factorize
from .lora_keys import lora_sites
from .tensor_io import SAVE_DTYPES


@dataclass
class ExtractConfig(CommandConfig):
    model_org: str = opt("", "the base checkpoint", metadata={"positional": True})
    model_tuned: str = opt("", "the fine-tuned checkpoint", metadata={"positional": True})
    output: str = opt("", "output LoRA .safetensors")
    dim: int = opt(4, "rank of linear / 1x1 modules")
    conv_dim: int = opt(0, "rank of 3x3 conv modules (0: no conv LoRA)")
    clamp_quantile: float = opt(0.99, "clamp factors to this quantile of their magnitudes (1 = off)")
    min_diff: float = opt(0.01, "text encoder deltas all below this are dropped (U-Net only LoRA)")
    save_precision: str = opt("fp16", "output dtype", metadata={"choices": list(SAVE_DTYPES)})
    overwrite: bool = opt(False, "replace the output if it exists")


def extract_lora(cfg: ExtractConfig, reporter: Reporter | None = None) -> Path:
    reporter = reporter or TqdmReporter()
    if not cfg.model_org or not cfg.model_tuned or not cfg.output:
        raise ConfigError("lora extract needs MODEL_ORG, MODEL_TUNED and --output")
    out = new_output(cfg.output, cfg.overwrite)
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
        dtype = SAVE_DTYPES[cfg.save_precision]
        reporter.start(len(chosen), "extract")
        for s in sorted(chosen, key=lambda s: org.tensors[s.key].start):
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
                "ss_network_args": '{"conv_dim": "%d", "conv_alpha": "%d"}' % (cfg.conv_dim, cfg.conv_dim) if cfg.conv_dim else "",
                "modelspec.architecture": fam.modelspec_arch + "/lora",
                "loratrain.extracted_from": f"{org.path.name} -> {tuned.path.name}"}
        save_safetensors(result, out, {k: v for k, v in meta.items() if v})
        reporter.done(f"wrote {out}: {len(result) // 3} modules in {time.perf_counter() - t0:.1f} s")
        return out
    finally:
        org.close()
        tuned.close()
