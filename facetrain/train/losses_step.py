"""One generator loss evaluation: the SAEHD terms assembled from the model outputs (docs/face-model.md#losses)."""
from __future__ import annotations

import torch
from torch.nn import functional as F

from ..losses import blur_out_background, dssim, reconstruction_loss, style_loss, total_variation
from .config import FaceTrainConfig


def side_loss(cfg: FaceTrainConfig, res: int, batch: dict[str, torch.Tensor], pred: torch.Tensor,
              pred_mask: torch.Tensor) -> torch.Tensor:
    """Per-sample loss of one side (src or dst): DSSIM + MSE (masked), eyes/mouth L1, mask MSE."""
    target, mask, mb, em = batch["target"], batch["mask"], batch["mask_blur"], batch["em"]
    t = blur_out_background(target, mask, res) if cfg.blur_out_mask else target
    if cfg.masked_training:
        t, p = t * mb, pred * mb
    else:
        p = pred
    loss = reconstruction_loss(t, p, res)
    if cfg.eyes_mouth_prio:
        loss = loss + 300 * (target * em - pred * em).abs().mean(dim=(1, 2, 3))
    return loss + 10 * ((mask - pred_mask) ** 2).mean(dim=(1, 2, 3))


def generator_loss(cfg: FaceTrainConfig, res: int, s: dict[str, torch.Tensor], d: dict[str, torch.Tensor],
                   out: dict[str, torch.Tensor], code_d: torch.nn.Module | None, gan_d: torch.nn.Module | None
                   ) -> tuple[torch.Tensor, dict[str, float], dict[str, torch.Tensor]]:
    """(loss to backpropagate: summed over the batch as DFL does, logged per-sample means, and the per-sample
    src and dst reconstruction losses, detached: what per-face diagnosis and the hard-sample sampler read)."""
    src = side_loss(cfg, res, s, out["src"], out["src_mask"])
    dst = side_loss(cfg, res, d, out["dst"], out["dst_mask"])
    total = src.sum() + dst.sum()
    logs = {"src_loss": float(src.detach().mean()), "dst_loss": float(dst.detach().mean())}
    dst_mb = d["mask_blur"]
    if cfg.face_style_power > 0:
        fs = style_loss(out["swap"] * dst_mb, d["target"] * dst_mb, cfg.face_style_power / 100, res / 8)
        total = total + fs.sum()
        logs["face_style"] = float(fs.detach().mean())
    if cfg.bg_style_power > 0:
        p = cfg.bg_style_power / 100
        a, b = out["swap"] * (1 - dst_mb), d["target"] * (1 - dst_mb)
        bg = 10 * p * dssim(a, b, max(3, int(res / 11.6))) + 10 * p * ((a - b) ** 2).mean(dim=(1, 2, 3))
        total = total + bg.sum()
        logs["bg_style"] = float(bg.detach().mean())
    if code_d is not None:
        logit = code_d(out["src_code"])
        tf = cfg.true_face_power * F.binary_cross_entropy_with_logits(logit, torch.ones_like(logit), reduction="none").flatten(1).mean(1)
        total = total + tf.sum()
        logs["true_face"] = float(tf.detach().mean())
    if gan_d is not None:
        src_mb = s["mask_blur"]
        logit = gan_d(out["src"] * src_mb)
        g = cfg.gan_power * F.binary_cross_entropy_with_logits(logit, torch.ones_like(logit), reduction="none").flatten(1).mean(1)
        if cfg.masked_training:  # DFL's speckle suppression while the GAN is on
            g = g + 1e-6 * total_variation(out["src"]) + 0.02 * ((out["src"] - s["target"]) ** 2 * (1 - src_mb)).mean(dim=(1, 2, 3))
        total = total + g.sum()
        logs["gan"] = float(g.detach().mean())
    return total, logs, {"src": src.detach(), "dst": dst.detach(),  # + mean |learned mask - mask| per face (diagnosis)
                         **{f"{k}_mask_diff": (out[f"{k}_mask"] - b["mask"]).detach().abs().mean(dim=(1, 2, 3)) for k, b in (("src", s), ("dst", d))}}


def discriminator_losses(cfg: FaceTrainConfig, s: dict[str, torch.Tensor], out: dict[str, torch.Tensor],
                         code_d: torch.nn.Module | None, gan_d: torch.nn.Module | None) -> dict[str, torch.Tensor]:
    bce = F.binary_cross_entropy_with_logits
    losses = {}
    if code_d is not None:
        real, fake = code_d(out["dst_code"].detach()), code_d(out["src_code"].detach())
        losses["code_d"] = 0.5 * (bce(real, torch.ones_like(real)) + bce(fake, torch.zeros_like(fake)))
    if gan_d is not None:
        mb = s["mask_blur"]
        real, fake = gan_d(s["target"] * mb), gan_d(out["src"].detach() * mb)
        losses["gan_d"] = 0.5 * (bce(real, torch.ones_like(real)) + bce(fake, torch.zeros_like(fake)))
    return losses
