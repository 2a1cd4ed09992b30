"""`lora bake` into, and `lora extract` between, SD3 / SD3.5 checkpoints in SAI's single-file layout.

Why SD3's own planners: SD checkpoints find a LoRA module's weight through the U-Net key tables (`keys.py`) and FLUX's
through its BFL paths (`flux_bake.py`); an SD3 `lora_sd3` module names an MMDiT module by its single-file path with
`_` (`lora_unet_joint_blocks_0_x_block_attn_qkv` -> `joint_blocks.0.x_block.attn.qkv.weight`), and which modules exist
depends on the model (3.5 medium's `attn2`, the pre-only last context block), so the table comes from the checkpoint's
own shapes (`sd3_config_from_shapes`). Reading, shape checks and writing are `lora_bake`'s / `lora_extract`'s: every
LoRA read and checked first, the checkpoint streamed into a temp file that replaces the output when complete.
SD3 has no LoRA block-weight convention (A1111's extension has none for it): a BLOCKS part is refused by name.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

from loratrain.core.errors import ConfigError
from loratrain.core.lora.files import parse_lora_spec, read_lora
from loratrain.core.lora.keys import LoraSite
from loratrain.core.lora.sd3_network import CONV, kohya_name, linear_shapes
from loratrain.core.models.sd3 import SD3Config, sd3_config_from_shapes, sd3_prefix
from loratrain.core.progress import Reporter, StopFlag
from loratrain.core.safe_io import save_safetensors
from loratrain.core.tensor_io import LazySafetensors

from .config import BakeConfig, LoraExtractConfig


def open_sd3(path: str) -> LazySafetensors | None:
    """The checkpoint, opened, when it holds an SD3 MMDiT in the single-file layout; None (and closed) otherwise."""
    f = LazySafetensors(path, what="model")
    if sd3_prefix(f.tensors) is None:
        f.close()
        return None
    return f


def _config(model: LazySafetensors) -> tuple[str, SD3Config]:
    prefix = sd3_prefix(model.tensors) or ""
    shapes = {k: tuple(v.shape) for k, v in model.tensors.items() if k.startswith(prefix)}
    return prefix, sd3_config_from_shapes(shapes, model.path.name)


def module_paths(cfg: SD3Config) -> dict[str, str]:
    """kohya name -> single-file module path, for every module a lora_sd3 file can hold on this model."""
    return {kohya_name(p): p for p in linear_shapes(cfg)}


def bake_sd3(cfg: BakeConfig, model: LazySafetensors, out: Path, reporter: Reporter, stop: StopFlag) -> object:
    from .lora_bake import _Applied, check_delta, write_bake

    try:
        if out.resolve() == model.path.resolve():
            raise ConfigError("--output is the input model; choose another file")
        prefix, sd3 = _config(model)
        names = module_paths(sd3)
        by_key: dict[str, list[_Applied]] = {}
        recipe = []
        for text in cfg.loras:
            spec = parse_lora_spec(text)
            if spec.blocks:
                raise ConfigError(f"{spec.path}: LoRA block weights are not defined for SD3 (no BLOCKS part, please)")
            modules, _ = read_lora(spec.path)
            te = [n for n in modules if n.startswith("lora_te")]
            if len(te) == len(modules):
                raise ConfigError(f"{spec.path}: holds text-encoder modules only; nothing of it bakes into the MMDiT")
            if te:
                reporter.log(f"{spec.path}: {len(te)} text-encoder modules skipped (the checkpoint's MMDiT only)")
            missing = []
            for name, module in modules.items():
                if name in te:
                    continue
                key = f"{prefix}{names[name]}.weight" if name in names else ""
                if key not in model.tensors:
                    missing.append(name)
                    continue
                shape = tuple(model.tensors[key].shape)
                check_delta(spec.path, module, shape)
                if spec.ratio != 0:
                    kind = "conv" if names[name] == CONV else "attn"
                    by_key.setdefault(key, []).append(_Applied(module, LoraSite(name, key, None, "BASE", kind, shape), spec.ratio))
            if missing:
                raise ConfigError(f"{spec.path}: {len(missing)} module(s) name no weight of {model.path.name} (e.g. "
                                  f"{missing[0]}); is the LoRA for another model?")
            recipe.append({"name": Path(spec.path).name, "ratio": spec.ratio, "blocks": None})
        return write_bake(cfg, model, by_key, recipe, out, reporter, stop)
    finally:
        model.close()


def extract_sd3(cfg: LoraExtractConfig, org: LazySafetensors, out: Path, reporter: Reporter, stop: StopFlag) -> object:
    """A `lora_sd3` file with sd-scripts' default targets (every Linear of every joint block) by truncated SVD of
    tuned - base, one module at a time."""
    from .flux_extract import extract_modules
    from .lora_extract import LoraExtractResult

    tuned = LazySafetensors(cfg.model_tuned, what="tuned model")
    try:
        p_org, sd3 = _config(org)
        p_tuned = sd3_prefix(tuned.tensors)
        if p_tuned is None:
            raise ConfigError(f"{tuned.path.name} is not an SD3 transformer; {org.path.name} is")
        chosen = [p for p in linear_shapes(sd3) if p.startswith("joint_blocks.")]
        for p in chosen:
            a, b = org.tensors.get(p_org + p + ".weight"), tuned.tensors.get(p_tuned + p + ".weight")
            if a is None or b is None or tuple(a.shape) != tuple(b.shape):
                raise ConfigError(f"{p}.weight: missing or of another shape in {tuned.path.name}")
        t0 = time.perf_counter()
        result = extract_modules(cfg, org, tuned, p_org, p_tuned, chosen, reporter, stop)
        if result is None:
            return LoraExtractResult(output=None, stopped=True)
        meta = {"ss_network_module": "networks.lora_sd3", "ss_network_dim": str(cfg.dim), "ss_network_alpha": str(cfg.dim),
                "ss_base_model_version": sd3.variant, "modelspec.architecture": f"stable-diffusion-3-{sd3.variant}/lora",
                "loratrain.extracted_from": json.dumps([org.path.name, tuned.path.name])}
        save_safetensors(result, out, meta)
        reporter.done("")
        return LoraExtractResult(output=out, modules=len(chosen), seconds=time.perf_counter() - t0)
    finally:
        tuned.close()
        org.close()
