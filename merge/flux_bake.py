"""`lora bake` into a FLUX.1 checkpoint in BFL's layout (a bare transformer file or one under `model.diffusion_model.`).

Why a separate planner: SD checkpoints find a LoRA module's weight through the U-Net key tables (`keys.py`); a FLUX
LoRA in our kohya layout names the BFL Linear directly (`lora_unet_double_blocks_0_img_attn_qkv` ->
`double_blocks.0.img_attn.qkv.weight`), and LoRAs in the diffusers / PEFT / ai-toolkit / ComfyUI layouts are first
converted to it (`flux_layouts.py`, exact ΔW). The writing is `lora_bake`'s: every LoRA read and shape-checked first,
then the checkpoint streamed tensor by tensor, the touched weights += ratio * block ratio * ΔW in float32 and cast
back to the checkpoint's dtype (or --save_precision), into a temp file that replaces the output when complete.
Block weights are FLUX's 61-value vectors (`flux_blocks.py`). Text-encoder modules are skipped (with a note): the
files we bake into hold the transformer. Scaled-fp8 files (`*.scale_weight`) are refused: W is not the stored tensor.
"""
from __future__ import annotations

from pathlib import Path

from loratrain.core.errors import ConfigError
from loratrain.core.lora.files import LoraModule, parse_lora_spec, read_lora
from loratrain.core.lora.flux_blocks import flux_block_of, flux_lbw_weights
from loratrain.core.lora.flux_layouts import bfl_path, is_kohya_flux
from loratrain.core.lora.keys import LoraSite
from loratrain.core.models.flux import flux_prefix
from loratrain.core.progress import Reporter, StopFlag
from loratrain.core.tensor_io import LazySafetensors

from .config import BakeConfig


def open_flux(path: str) -> LazySafetensors | None:
    """The checkpoint, opened, when it is a BFL-layout FLUX.1 transformer; None (and closed) otherwise."""
    f = LazySafetensors(path, what="model")
    if flux_prefix(f.tensors) is None:
        f.close()
        return None
    return f


def read_flux_lora(path: str) -> tuple[dict[str, LoraModule], dict[str, str]]:
    """A FLUX LoRA file in any layout flux_layouts reads -> kohya-named modules (alpha kept) and its metadata
    (`read_lora` converts the other layouts to ours; LyCORIS modules, LoHa / LoKr as training writes them, come as
    core/lora/kinds.py's modules, whose ΔW is LyCORIS' formula)."""
    modules, meta = read_lora(path)
    if not is_kohya_flux(modules):
        raise ConfigError(f"{path}: not a FLUX.1 LoRA (no double_blocks / single_blocks modules); is it for SD?")
    return modules, meta


def bake_flux(cfg: BakeConfig, model: LazySafetensors, out: Path, reporter: Reporter, stop: StopFlag) -> object:
    from .lora_bake import _Applied, check_delta, write_bake

    try:
        if out.resolve() == model.path.resolve():
            raise ConfigError("--output is the input model; choose another file")
        prefix = flux_prefix(model.tensors) or ""
        if any(k.endswith(".scale_weight") for k in model.tensors):
            raise ConfigError(f"{model.path.name} is a scaled-fp8 FLUX checkpoint: bake into its bf16 / fp16 original")
        by_key: dict[str, list[_Applied]] = {}
        recipe = []
        for text in cfg.loras:
            spec = parse_lora_spec(text)
            modules, _ = read_flux_lora(spec.path)
            blocks = flux_lbw_weights(spec.blocks, spec.path) if spec.blocks else None
            te = [n for n in modules if n.startswith("lora_te")]
            if te:
                reporter.log(f"{spec.path}: {len(te)} text-encoder modules skipped (the checkpoint holds the transformer)")
            missing = []
            for name, module in modules.items():
                if name in te:
                    continue
                path = bfl_path(name)
                key = f"{prefix}{path}.weight" if path else ""
                if key not in model.tensors:
                    missing.append(name)
                    continue
                shape = tuple(model.tensors[key].shape)
                check_delta(spec.path, module, shape)
                block = flux_block_of(name) or "IN"
                ratio = spec.ratio * (blocks[block] if blocks else 1.0)
                if ratio != 0:
                    by_key.setdefault(key, []).append(_Applied(module, LoraSite(name, key, None, block, "attn", shape), ratio))
            if missing:
                raise ConfigError(f"{spec.path}: {len(missing)} module(s) name no weight of {model.path.name} (e.g. "
                                  f"{missing[0]}); is the LoRA for another FLUX model?")
            recipe.append({"name": Path(spec.path).name, "ratio": spec.ratio, "blocks": spec.blocks or None})
        if any(model.tensors[k].dtype.itemsize == 1 for k in by_key) and cfg.save_precision == "auto":
            reporter.log("the checkpoint stores fp8 weights: the baked ΔW is rounded to fp8 (--save_precision bf16 keeps it)")
        return write_bake(cfg, model, by_key, recipe, out, reporter, stop)
    finally:
        model.close()
