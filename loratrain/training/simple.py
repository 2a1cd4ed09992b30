"""The simple mode's choices, from the dataset's size as the LoRA guides our users follow make them, each with the reason
it is shown with: a user who reads the plan learns why, and can change any of it in the full form.

Rules of thumb, labelled as such: repeats about 7 for ~20 images and about 5 for ~50 (so an epoch is ~150-250 samples),
a smaller rank for a small set (fewer images hold less detail, and a large rank learns their noise), and the batch
size that fits the GPU's free memory.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

# What the guides recommend at UNet lr 1e-4: steps a subject needs, and the rank for its detail at 30 images or more.
PRESETS: dict[str, dict[str, Any]] = {
    "character": {"max_train_steps": 1000, "network_dim": 32},
    "style": {"max_train_steps": 2500, "network_dim": 96},
    "concept": {"max_train_steps": 3000, "network_dim": 48},
}
KINDS = tuple(PRESETS)
COMMON: dict[str, Any] = {
    "network_module": "lora", "learning_rate": 1e-4, "unet_lr": 1e-4, "text_encoder_lr": [5e-5], "optimizer_type": "AdamW",
    "lr_scheduler": "cosine_with_restarts", "lr_scheduler_num_cycles": 3, "lr_warmup_steps": 0.05,
    "shuffle_caption": True, "keep_tokens": 1, "caption_extension": ".txt", "save_precision": "fp16", "mixed_precision": "no",
}
#: fewer images than this: half the kind's rank
SMALL_SET = 30
#: rough memory of a LoRA run at batch 1 and of each further sample (GiB), fp32 adapters, no gradient checkpointing:
#: SD1/SD2 at 512 px, SDXL at 1024 px; measured orders of magnitude, not a promise
BASE_GIB = {"sd": 4.0, "sdxl": 11.0}
PER_SAMPLE_GIB = {"sd": 1.2, "sdxl": 4.5}


def repeats_for(n_images: int) -> int:
    """≈7 at 20 images and ≈5 at 50, on a log scale between and beyond (1 to 10)."""
    if n_images <= 0:
        return 1
    return int(min(10, max(1, round(7 - 2 / math.log(2.5) * math.log(n_images / 20)))))


def suggest_batch(free_bytes: int | None, family: str = "sd") -> tuple[int, str]:
    """(batch size, why) for a GPU with `free_bytes` free; None (no GPU): 1."""
    if not free_bytes:
        return 1, "batch 1: no GPU found (on a CPU a larger batch only makes each step slower)"
    free = free_bytes / 2**30
    n = int((free - BASE_GIB[family]) // PER_SAMPLE_GIB[family]) + 1
    n = 1 << (max(1, min(n, 8)).bit_length() - 1)  # 1, 2, 4 or 8
    return n, (f"batch {n}: {free:.1f} GiB free on the GPU, about {BASE_GIB[family]:g} GiB for the model and "
               f"{PER_SAMPLE_GIB[family]:g} GiB per sample (rule of thumb)")


@dataclass
class SimplePlan:
    values: dict[str, Any]
    repeats: int
    reasons: list[str] = field(default_factory=list)


def simple_plan(kind: str, n_images: int, trigger: str, free_gpu_bytes: int | None = None, family: str = "sd") -> SimplePlan:
    """The options for `kind` trained on `n_images` images, and one line per choice saying why."""
    preset = PRESETS[kind]
    repeats = repeats_for(n_images)
    dim = preset["network_dim"] if n_images >= SMALL_SET else preset["network_dim"] // 2
    batch, batch_why = suggest_batch(free_gpu_bytes, family)
    steps = preset["max_train_steps"]
    per_epoch = max(1, n_images * repeats // batch)
    alpha = dim / 2
    values = {**COMMON, "max_train_steps": steps, "network_dim": dim, "network_alpha": alpha, "train_batch_size": batch,
              "trigger_word": trigger}
    reasons = [
        f"trigger word '{trigger}' first in every caption (added where a caption lacks it), kept first by keep_tokens 1 "
        "while the other tags shuffle",
        f"repeats {repeats} for {n_images} images: the guides' rule of thumb, about 7 for ~20 images and 5 for ~50",
        f"rank (network_dim) {dim}, alpha {alpha:g}: a {kind}'s rank is {preset['network_dim']}"
        + (f", halved under {SMALL_SET} images (a small set has less detail to hold)" if n_images < SMALL_SET else ""),
        f"{steps} steps for a {kind} at learning rate 1e-4: "
        + (f"{math.ceil(steps / per_epoch)} epochs of {per_epoch} steps" if per_epoch < steps
           else f"part of one epoch ({per_epoch} steps per epoch)"),
        batch_why,
    ]
    return SimplePlan(values, repeats, reasons)
