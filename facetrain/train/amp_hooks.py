"""What training an AMP model adds to the shared loop (docs/face-model.md#amp): its morph factor, and DFL's weak
dst background term. A watcher sets them up before the first step, so the loop needs no AMP branch.

DFL's AMP adds 0.1 * mean((pred_dst - dst)^2 outside the blurred dst mask) to each dst sample's loss, whether
or not training is masked: the shared decoder then also learns dst's surroundings a little, which SAEHD's DF
does through its own dst decoder. It goes in as one of the trainer's `loss_terms`, summed over the batch like
the rest of the generator loss.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from ..models.amp import AMP
from .watchers import Watcher

if TYPE_CHECKING:
    from .trainer import FaceTrainer, FaceTrainResult

DST_BACKGROUND_WEIGHT = 0.1


def dst_background_term(s: dict[str, torch.Tensor], d: dict[str, torch.Tensor], out: dict[str, torch.Tensor]
                        ) -> tuple[torch.Tensor, dict[str, float]]:
    outside = 1 - d["mask_blur"]
    per_sample = DST_BACKGROUND_WEIGHT * ((out["dst"] * outside - d["target"] * outside) ** 2).mean(dim=(1, 2, 3))
    return per_sample.sum(), {"dst_background": float(per_sample.detach().mean())}


class AmpWatcher(Watcher):
    """Sets the model's morph factor from the options and adds the dst background term (AMP models only)."""

    def start(self, trainer: FaceTrainer, result: FaceTrainResult, writer: Any) -> None:
        if isinstance(trainer.model, AMP):
            trainer.model.morph_factor = float(trainer.cfg.morph_factor)
            trainer.loss_terms.append(dst_background_term)
