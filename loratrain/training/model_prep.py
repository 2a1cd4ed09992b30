"""Changes to the loaded model before the network is built, each an sd-scripts option: a zero-terminal-SNR
schedule, base_weights merged in, fp8 storage of the frozen weights, dim_from_weights, and full_fp16's scaler."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from loratrain.core.models.loading import SDModel


def training_schedule(model: SDModel, zero_terminal_snr: bool, log: Any) -> Any:
    """The noise schedule training draws from: the model's own, or (zero_terminal_snr) diffusers' rescale so the
    last timestep is pure noise. Samples keep the model's own schedule."""
    if not zero_terminal_snr:
        return model.noise_scheduler
    from diffusers import DDPMScheduler

    if model.prediction_type != "v_prediction":
        log("note: zero_terminal_snr with an epsilon-prediction model; the paper pairs it with v-prediction (--v_parameterization)")
    return DDPMScheduler.from_config(model.noise_scheduler.config, rescale_betas_zero_snr=True)


def merge_base_weights(model: SDModel, paths: list[str], weights: list[float], log: Any) -> None:
    """sd-scripts' base_weights: LoRA / LyCORIS files merged into the base model's weights before training
    (the same in-memory patch generate and grid use), each at its base_weights_multiplier."""
    from loratrain.core.session import LoraUse, WeightPatcher

    weights = weights or [1.0] * len(paths)
    patcher = WeightPatcher()
    patcher.apply(model, [LoraUse(path, w) for path, w in zip(paths, weights)])
    patcher.originals.clear()  # merged for good: no copy of the original weights is kept
    log("merged into the base: " + ", ".join(f"{Path(p).name} x{w:g}" for p, w in zip(paths, weights)))


def store_in_fp8(model: SDModel, unet_only: bool, compute_dtype: torch.dtype, log: Any) -> None:
    """fp8_base / fp8_base_unet: the frozen layers kept in float8_e4m3fn and cast up for each forward (diffusers'
    layerwise casting). Called before the adapters exist, so they stay in their own dtype."""
    from diffusers.hooks import apply_layerwise_casting

    for m in [model.unet] + ([] if unet_only else list(model.text_encoders)):
        apply_layerwise_casting(m, torch.float8_e4m3fn, compute_dtype)
    log("fp8 base weights: " + ("UNet" if unet_only else "UNet and text encoders")
        + f" stored in float8_e4m3fn, computed in {compute_dtype}")


def dims_from_weights(path: str, log: Any) -> dict[str, tuple[int, float]]:
    """dim_from_weights: every module of a kohya LoRA file with its rank and alpha (its header and alphas only)."""
    from loratrain.core.tensor_io import LazySafetensors

    dims: dict[str, tuple[int, float]] = {}
    with LazySafetensors(Path(path), "network_weights") as f:
        keys = set(f.keys())
        for key in sorted(k for k in keys if k.endswith(".lora_down.weight")):
            name = key[: -len(".lora_down.weight")]
            rank = f.tensors[key].shape[0]
            alpha = float(f.read(f"{name}.alpha")) if f"{name}.alpha" in keys else float(rank)
            dims[name] = (rank, alpha)
    log(f"dim_from_weights: {len(dims)} modules, ranks {sorted({d for d, _ in dims.values()})}")
    return dims


def allow_fp16_unscale(accelerator: Any) -> None:
    """sd-scripts' --full_fp16: torch's GradScaler refuses to unscale fp16 gradients; sd-scripts calls its
    unscale with allow_fp16 (train_util.patch_accelerator_for_fp16_training), and so does this. Without a
    scaler (CPU) there is nothing to patch."""
    scaler = getattr(accelerator, "scaler", None)
    if scaler is None:
        return
    original = scaler._unscale_grads_

    def unscale(optimizer: Any, inv_scale: Any, found_inf: Any, allow_fp16: bool) -> Any:
        return original(optimizer, inv_scale, found_inf, True)

    scaler._unscale_grads_ = unscale
