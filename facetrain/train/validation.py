"""Held-out faces, the validation loss and early stopping (docs/face-model.md#validation-and-early-stopping).

`validation_faces` faces of src (and of dst) are set aside before training: the training FaceSamples are built
from the other faces' paths, so whatever sampler draws from them (uniform, yaw bins, hard samples) never sees a
held-out face. Which faces: a permutation seeded by `seed` over the sorted file names, so a resume holds out the
same ones. The validation loss is the training loss's reconstruction terms (side_loss: DSSIM + MSE, eyes/mouth,
mask) on the held-out faces without augmentation and without gradients; the early-stopping watcher ends the run
when it has not improved for `early_stopping_patience` checks.
"""
from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from loratrain.core.errors import ConfigError

from ..losses import soft_mask
from .data import FaceSamples
from .losses_step import side_loss
from .watchers import Watcher

if TYPE_CHECKING:
    from loratrain.core.progress import Reporter

    from .config import FaceTrainConfig
    from .trainer import FaceTrainer, FaceTrainResult


def held_out_count(share_or_count: float, total: int) -> int:
    """A count (>= 1) or a share (< 1, rounded, at least one face) of `total` faces."""
    if share_or_count <= 0:
        return 0
    return int(share_or_count) if share_or_count >= 1 else max(1, round(share_or_count * total))


def split_samples(samples: FaceSamples, n: int, seed: int, what: str) -> tuple[FaceSamples, FaceSamples | None]:
    """(training samples without the held-out faces, the held-out ones); at least one face must remain to train."""
    if n <= 0:
        return samples, None
    total = len(samples)
    if n >= total:
        raise ConfigError(problems=[("validation_faces", f"holds out {n} of the {total} faces of the {what} faceset: "
                                                         "at least one must remain to train on")])
    order = np.random.default_rng(seed).permutation(total)
    held = sorted(int(i) for i in order[:n])
    keep = sorted(int(i) for i in order[n:])
    return samples.subset(keep), samples.subset(held)


def hold_out(cfg: FaceTrainConfig, src: FaceSamples, dst: FaceSamples
             ) -> tuple[FaceSamples, FaceSamples, dict[str, FaceSamples]]:
    """(training src, training dst, {"src": held-out, "dst": held-out}) for cfg.validation_faces (none: unchanged).
    The src samples' colour-transfer reference becomes the training dst."""
    if not cfg.validation_faces:
        return src, dst, {}
    train_src, val_src = split_samples(src, held_out_count(cfg.validation_faces, len(src)), cfg.seed, "src")
    same = dst.paths == src.paths  # pretraining on one faceset: hold out the same faces on both sides
    train_dst, val_dst = split_samples(dst, held_out_count(cfg.validation_faces, len(dst)), cfg.seed + (0 if same else 1), "dst")
    if train_src.ct_reference is not None:
        train_src.ct_reference = train_dst
    return train_src, train_dst, {"src": val_src, "dst": val_dst}


def _batches(samples: FaceSamples, size: int) -> list[dict[str, torch.Tensor]]:
    """The held-out faces as unaugmented batches (decoded once: they never change)."""
    rng = np.random.default_rng(0)  # unused by an unaugmented sample; given because sample() takes one
    rows = [samples.sample(i, rng, augment=False) for i in range(len(samples))]
    out = []
    for at in range(0, len(rows), size):
        chunk = rows[at:at + size]
        out.append({k: torch.from_numpy(np.stack([r[k].transpose(2, 0, 1) for r in chunk])).float()
                    for k in ("input", "target", "mask", "em")})
    return out


@torch.no_grad()
def validation_loss(trainer: FaceTrainer, batches: dict[str, list[dict[str, torch.Tensor]]]) -> dict[str, float]:
    """Mean per-face loss of each side on its held-out faces, and their sum (`val_loss`)."""
    model, cfg, res = trainer.model, trainer.cfg, trainer.res
    was_training = model.training
    model.eval()
    logs: dict[str, float] = {}
    try:
        for side, chunks in batches.items():
            total, count = 0.0, 0
            for chunk in chunks:
                b = {k: v.to(trainer.device) for k, v in chunk.items()}
                b["mask_blur"] = soft_mask(b["mask"], res)
                with trainer._autocast():
                    out = model.train_forward(b["input"], b["input"])  # each side through its own path only
                out = {k: v.float() for k, v in out.items()}
                loss = side_loss(cfg, res, b, out[side], out[f"{side}_mask"])
                total, count = total + float(loss.sum()), count + len(loss)
            logs[f"val_{side}"] = total / max(count, 1)
    finally:
        model.train(was_training)
    logs["val_loss"] = sum(logs.values())
    return logs


class ValidationWatcher(Watcher):
    """Every `validation_every` iterations: the validation loss, logged (TensorBoard `validation/...`, the job's
    metrics the Face page plots, the run's history) and, with `early_stopping_patience`, the end of the run once
    that many checks in a row have not beaten the best."""

    name = "validation"

    def __init__(self, reporter: Reporter, every: int, patience: int) -> None:
        self.reporter, self.every, self.patience = reporter, every, patience
        self.best: float | None = None
        self.best_at = 0
        self.bad = 0
        self.batches: dict[str, list[dict[str, torch.Tensor]]] = {}
        self.writer: Any = None
        self.result: FaceTrainResult | None = None

    def start(self, trainer: FaceTrainer, result: FaceTrainResult, writer: Any) -> None:
        self.batches = {side: _batches(s, trainer.cfg.batch_size) for side, s in trainer.held_out.items()}
        self.writer, self.result = writer, result
        n = {side: len(s) for side, s in trainer.held_out.items()}
        self.reporter.log(f"validation: {n.get('src', 0)} src and {n.get('dst', 0)} dst faces held out of training, "
                          f"checked every {self.every} iterations")

    def after_step(self, trainer: FaceTrainer, logs: dict[str, float]) -> str | None:
        it = trainer.iteration
        if it % self.every or not self.batches:
            return None
        val = validation_loss(trainer, self.batches)
        self.reporter.advance(0, **val)
        for k, v in val.items():
            if self.writer is not None:
                self.writer.add_scalar(f"validation/{k}", v, it)
        if self.result is not None and self.result.history:
            self.result.history[-1].update(val)
        score = val["val_loss"]
        if not math.isfinite(score):
            return None
        if self.best is None or score < self.best:
            self.best, self.best_at, self.bad = score, it, 0
            return None
        self.bad += 1
        if self.patience and self.bad >= self.patience:
            return (f"early stopping: the validation loss {score:.4f} has not improved on its best {self.best:.4f} "
                    f"(iteration {self.best_at}) for {self.bad} checks")
        return None

    def state(self) -> dict:
        return {"best": self.best, "best_at": self.best_at, "bad": self.bad}

    def restore(self, state: dict) -> None:
        best = state.get("best")
        self.best = float(best) if isinstance(best, (int, float)) and math.isfinite(best) else None
        self.best_at = int(state["best_at"]) if isinstance(state.get("best_at"), int) else 0
        self.bad = int(state["bad"]) if isinstance(state.get("bad"), int) and state["bad"] >= 0 else 0
