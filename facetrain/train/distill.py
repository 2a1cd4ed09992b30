"""Teacher -> student distillation (docs/face-model.md#distillation).

The student is this run's model, trained as usual on the ground truth, plus `distill_weight` times its distance to a
frozen teacher's outputs on the very same (warped) inputs: src and dst reconstructions with their masks, and the
swap (dst through the src decoder) with its mask. The swap is the reason to distil at all: it has no ground truth,
so without the teacher a slimmer model only learns it indirectly. The match is a per-sample loss summed over the
batch, like every SAEHD term, so its weight means the same at any batch size (and across data-parallel processes).

Weights: `distill_ratio` r splits the match between src (and swap) and dst as 2r/(1+r) : 2/(1+r), so r = 1 weighs
both 1 and the total scale does not move with r.

Nothing of the teacher is saved into the student: it exports and swaps like any model.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from loratrain.core.errors import ConfigError
from loratrain.core.paths import confine

from ..losses import reconstruction_loss
from ..models.archi import FaceAutoencoder
from .model_file import load_model_file
from .options.distill import teacher_info
from .watchers import Watcher


def load_teacher(path: str | Path, resolution: int, face_type: str, device: torch.device) -> FaceAutoencoder:
    """The teacher, frozen and in eval mode, or a ConfigError saying why it cannot teach this student."""
    info = teacher_info(path)
    tres = info["model"].get("resolution")
    if tres != resolution:
        raise ConfigError(f"teacher {path} is a {tres} px model and the student {resolution} px; distillation compares "
                          "their outputs pixel for pixel, so the resolutions must be equal")
    ftype = info.get("options", {}).get("face_type")
    if ftype and ftype != face_type:
        raise ConfigError(f"teacher {path} was trained on face type {ftype!r} and the student on {face_type!r}; "
                          "they must see the same crops")
    try:
        model, _ = load_model_file(confine(path, "teacher"))  # header and tensor shapes checked before building
    except ConfigError as e:
        raise ConfigError(f"teacher {e}") from None
    model.to(device).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def match_loss(kind: str, pred: torch.Tensor, pred_mask: torch.Tensor, target: torch.Tensor, target_mask: torch.Tensor,
               weight_mask: torch.Tensor | None, res: int) -> torch.Tensor:
    """Per-sample distance of one student output (and its mask) to the teacher's: `saehd` as the ground truth is
    learned (DSSIM + MSE, masked when `weight_mask` is given, mask MSE x10); `mse` plain MSE of both."""
    if weight_mask is not None:
        pred, target = pred * weight_mask, target * weight_mask
    if kind == "mse":
        return ((pred - target) ** 2).mean(dim=(1, 2, 3)) + ((pred_mask - target_mask) ** 2).mean(dim=(1, 2, 3))
    return reconstruction_loss(target, pred, res) + 10 * ((pred_mask - target_mask) ** 2).mean(dim=(1, 2, 3))


class DistillTerm:
    """One of FaceTrainer.loss_terms: fn(src batch, dst batch, student outputs) -> (summed loss, logs)."""

    def __init__(self, teacher: FaceAutoencoder, cfg: Any, res: int) -> None:
        self.teacher, self.res = teacher, res
        self.kind, self.weight, self.masked = cfg.distill_loss, cfg.distill_weight, cfg.masked_training
        r = cfg.distill_ratio
        self.src_w, self.dst_w = 2 * r / (1 + r), 2 / (1 + r)
        self.swap = cfg.distill_swap

    def __call__(self, s: dict[str, torch.Tensor], d: dict[str, torch.Tensor], out: dict[str, torch.Tensor]
                 ) -> tuple[torch.Tensor, dict[str, float]]:
        with torch.no_grad():
            t = {k: v.float() for k, v in self.teacher.train_forward(s["input"], d["input"]).items()}
        sides = [("src", self.src_w, s), ("dst", self.dst_w, d)] + ([("swap", self.src_w, d)] if self.swap else [])
        total = out["src"].new_zeros(())
        logs: dict[str, float] = {}
        for key, w, batch in sides:
            mb = batch["mask_blur"] if self.masked else None  # the swap is on dst's face: dst's mask
            err = match_loss(self.kind, out[key], out[f"{key}_mask"], t[key], t[f"{key}_mask"], mb, self.res)
            total = total + w * err.sum()
            logs[f"distill_{key}"] = float(err.detach().mean())
        return self.weight * total, logs


class DistillWatcher(Watcher):
    """Loads the teacher before the first step and adds the distillation term to the trainer's loss."""

    def start(self, trainer: Any, result: Any, writer: Any) -> None:
        cfg = trainer.cfg
        teacher = load_teacher(cfg.teacher, trainer.res, cfg.face_type, trainer.device)
        trainer.loss_terms.append(DistillTerm(teacher, cfg, trainer.res))
        n_t = sum(p.numel() for p in teacher.parameters())
        n_s = sum(p.numel() for p in trainer.model.parameters())
        trainer.reporter.log(f"distilling from {cfg.teacher} ({teacher.cfg.archi}, {n_t:,} weights) into this model "
                             f"({trainer.model.cfg.archi}, {n_s:,} weights) at weight {cfg.distill_weight}")


@torch.no_grad()
def teacher_distance(student: FaceAutoencoder, teacher: FaceAutoencoder, src: torch.Tensor, dst: torch.Tensor) -> dict[str, float]:
    """Mean squared distance of the student's src, dst and swap outputs to the teacher's on fixed faces (eval mode):
    how far the student is from what it distils, independent of the training loss's augmentation."""
    was = student.training
    student.eval()
    a, b = student.train_forward(src, dst), teacher.train_forward(src, dst)
    student.train(was)
    return {k: float(((a[k] - b[k]) ** 2).mean()) for k in ("src", "dst", "swap")}
