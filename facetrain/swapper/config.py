"""Options of `loratrain face swapper train | info` (light to import: no torch, no OpenCV, no onnx).

The defaults are the fine-tuning recipe FaceFusion users follow for an inswapper-style model: AdamW at 1e-5 with
weight decay 1e-4, batch 4 with accumulation 2, cosine schedule, early stopping on a held-out loss, flips,
colour jitter, +-10 degree rotations and 0.9-1 crops, near-duplicate and blurry faces dropped.
"""
from __future__ import annotations

import math
from pathlib import Path

from loratrain.core.config import JobConfig, opt
from loratrain.core.devices import DEVICES
from loratrain.core.errors import Problem

PRECISIONS = ("no", "bf16", "fp16")
MAX_FLOAT = 1e9  # no float option here means anything near this (loss weights are around 0.1 to 10)
SCHEDULES = ("cosine", "constant")


class SwapperTrainConfig(JobConfig):
    faceset: str = opt("", "aligned faces of the identity to learn (the person put into other faces)", positional=True,
                       path="dir", group="data")
    model: str = opt("", "the tuned swapper, an .onnx FaceFusion loads (created; an existing one there is resumed)",
                     positional=True, path="output", group="data")
    base: str = opt("", "the swapper to start from: an inswapper-style .onnx you have (yours to bring, with its licence); "
                    "empty: our own generator, from scratch", path="file", group="data")
    recognizer: str = opt("", "a face recogniser .onnx (ArcFace-style: 112 px in, 512-d out) for the identity loss",
                          path="file", group="data")
    dst_faceset: str = opt("", "faces of other people to swap the identity into (learns to keep their pose and "
                           "light); empty: the identity's own faces only", path="dir", group="data")
    validation_split: float = opt(0.1, "share of the identity's faces held out for the validation loss", ge=0, lt=0.9,
                                  group="data")
    dedupe_threshold: float = opt(0.985, "drop a face whose embedding has cosine similarity above this with one kept "
                                  "(near-identical frames); 1 keeps all", gt=0, le=1, group="data")
    blur_drop: float = opt(0.3, "drop faces sharper than only this share of the faceset's median sharpness "
                           "(variance of the Laplacian); 0 keeps all", ge=0, lt=1, group="data")
    # ---- model
    freeze_until: str = opt("", "freeze every block before this one (e.g. styles.3: train the later style blocks and "
                            "the decoder); `face swapper info` lists the blocks", group="model")
    resolution: int = opt(128, "our generator: crop size (first run without --base only)", ge=16, le=1024, group="model")
    base_channels: int = opt(64, "our generator: channels of the first level (first run without --base)", ge=4, le=512,
                             group="model")
    style_blocks: int = opt(6, "our generator: identity-injection blocks (first run without --base)", ge=1, le=16,
                            group="model")
    # ---- losses
    identity_weight: float = opt(1.0, "identity loss: 1 - cosine(recogniser(result), source embedding)", ge=0,
                                 group="losses")
    l1_weight: float = opt(1.0, "L1 reconstruction when the target is the identity itself", ge=0, group="losses")
    l2_weight: float = opt(0.0, "L2 reconstruction when the target is the identity itself", ge=0, group="losses")
    lpips_weight: float = opt(1.0, "LPIPS reconstruction (needs --lpips_model; without one it is skipped)", ge=0,
                              group="losses")
    lpips_model: str = opt("", "an LPIPS network as .onnx (two images N x 3 x H x W in -1..1 -> a distance per image); "
                           "yours to bring", path="file", group="losses")
    attribute_weight: float = opt(0.1, "keep the other person's pose and light: L1 (and LPIPS) of the swap to the "
                                  "dst face, weighted this much", ge=0, group="losses")
    gan_weight: float = opt(0.0, "adversarial loss of a patch discriminator (0: off)", ge=0, group="losses")
    # ---- optimisation
    iterations: int = opt(2000, "train until this iteration (a resumed run continues to it)", ge=1, group="optimizer")
    batch_size: int = opt(4, "faces per step", ge=1, le=256, group="optimizer")
    grad_accum: int = opt(2, "steps whose gradients add up before one update", ge=1, le=64, group="optimizer")
    lr: float = opt(1e-5, "AdamW learning rate (fine-tuning: 1e-5 to 5e-6; from scratch: 1e-4)", gt=0, le=1,
                    group="optimizer")
    weight_decay: float = opt(1e-4, "AdamW weight decay", ge=0, le=1, group="optimizer")
    schedule: str = opt("cosine", "cosine (to 0 at --iterations) or constant", choices=list(SCHEDULES), group="optimizer")
    warmup: int = opt(0, "iterations of linear warm-up", ge=0, group="optimizer")
    mixed_precision: str = opt("no", "no, bf16 (CPU or GPU) or fp16 (GPU, with loss scaling)", choices=list(PRECISIONS),
                               group="optimizer")
    validate_every: int = opt(100, "measure the validation loss every N iterations", ge=1, group="optimizer")
    early_stopping: int = opt(0, "stop after this many validations without improvement (0: never)", ge=0,
                              group="optimizer")
    # ---- augmentation
    random_flip: bool = opt(True, "horizontal flips", group="augmentation")
    color_jitter: float = opt(0.1, "brightness, contrast and saturation jitter (0: off)", ge=0, le=0.5,
                              group="augmentation")
    rotation: float = opt(10.0, "random rotation, +- degrees", ge=0, le=45, group="augmentation")
    crop_scale: float = opt(0.9, "random crops of this share to 1 of the face, resized back", gt=0.5, le=1,
                            group="augmentation")
    # ---- saving
    save_every: int = opt(200, "save the model every N iterations", ge=1, group="saving")
    preview_every: int = opt(100, "preview source | target | result every N iterations", ge=1, group="saving")
    keep_backups: int = opt(3, "rotating backups of the model kept beside it", ge=0, group="saving")
    seed: int = opt(0, "random seed", group="saving")
    device: str = opt("auto", "auto, cpu, cuda, mps", choices=list(DEVICES))

    def problems(self) -> list[Problem]:
        out: list[Problem] = []
        # a range like ge=0 lets inf through (inf >= 0): an infinite (or absurd) loss weight trains a model of NaN
        for name in type(self).model_fields:
            value = getattr(self, name)
            if isinstance(value, float) and not math.isfinite(value):
                out.append((name, f"must be a finite number, not {value}"))
            elif isinstance(value, float) and abs(value) > MAX_FLOAT:
                out.append((name, f"too large (at most {MAX_FLOAT:g})"))
        for name in ("model", "base", "recognizer", "lpips_model"):
            value = getattr(self, name)
            if value and Path(value).suffix.lower() != ".onnx":
                out.append((name, f"{value}: expected an .onnx file"))
        if self.mixed_precision == "fp16" and self.device == "cpu":
            out.append(("mixed_precision", "fp16 needs a GPU; use bf16 on the CPU"))
        if self.resolution % 4:
            out.append(("resolution", "must be a multiple of 4"))
        from loratrain.core.safe_io import output_conflicts

        # the model is written (and resumed): never one of the inputs, nor inside a faceset
        out += [("model", m) for m in output_conflicts(self.model, [self.base, self.recognizer, self.lpips_model,
                                                                    self.faceset, self.dst_faceset])]
        return out

    def requirements(self) -> list[Problem]:
        out: list[Problem] = [(name, "is required") for name in ("faceset", "model") if not getattr(self, name)]
        if not self.recognizer:
            out.append(("recognizer", "is required: the identity loss and the source embeddings come from a face "
                        "recogniser you provide (ArcFace-style .onnx)"))
        # named here, before any model is read; the job confines and opens each where it reads it
        for name in ("faceset", "dst_faceset"):
            if getattr(self, name) and not Path(getattr(self, name)).expanduser().is_dir():
                out.append((name, f"faceset folder not found: {getattr(self, name)}"))
        for name in ("base", "recognizer", "lpips_model"):
            if getattr(self, name) and not Path(getattr(self, name)).expanduser().is_file():
                out.append((name, f"file not found: {getattr(self, name)}"))
        return out


class SwapperInfoConfig(JobConfig):
    model: str = opt("", "a swapper .onnx (inswapper-style, or ours)", positional=True, path="file")

    def requirements(self) -> list[Problem]:
        return [("model", "is required")] if not self.model else []
