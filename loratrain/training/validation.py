"""sd-scripts' validation: the loss of held-out images (validation_split) at fixed timesteps and noise."""
from __future__ import annotations

from typing import Any

import torch


@torch.no_grad()
def validate(trainer: Any, when: str) -> float | None:
    """The held-out images' loss at sd-scripts' 4 fixed timesteps (evenly inside [min_timestep, max_timestep]),
    with the same noise every time (validation_seed), adapters in eval mode: a number that moves only
    because the network did. Logged as loss/validation/{step,epoch}_average and shown on the UI's loss plot."""
    cfg = trainer.cfg
    batches = trainer.data.validation_batches(cfg.max_validation_steps)
    every = getattr(trainer, "_every_process_forwards", lambda: False)()  # a sharded model: every process forwards
    if not batches or not (trainer.accelerator.is_main_process or every):
        return None
    seed = cfg.seed if cfg.validation_seed is None else cfg.validation_seed
    span = cfg.max_timestep - cfg.min_timestep
    timesteps = [cfg.min_timestep + span * k // 5 for k in range(1, 5)]  # np.linspace(lo, hi, 6)[1:-1] as ints
    parts = list(trainer.network.parts().values())
    trainer._optimizer_mode("eval")
    for m in parts:
        m.eval()
    trainer.reporter.start(len(batches) * len(timesteps), "validation", unit="batch")
    total = 0.0
    for b, batch in enumerate(batches):
        for t in timesteps:
            total += trainer._loss(batch, -1, b, 0, len(batch), seed=seed, timestep=t).item()
            trainer.reporter.advance(1)
    for m in parts:
        m.train()
    trainer._optimizer_mode("train")
    mean = total / (len(batches) * len(timesteps))
    trainer.val_losses.append((trainer.global_step, mean))
    recent = trainer.losses[-50:]
    trainer.reporter.start(trainer.plan.max_train_steps, "training", initial=trainer.global_step)
    trainer.reporter.advance(0, val_loss=mean)
    trainer.reporter.log(f"validation loss {mean:.5f} at step {trainer.global_step} ({len(batches)} held-out batches x 4 timesteps)")
    if trainer.writer:
        trainer.writer.add_scalar(f"loss/validation/{when}_average", mean, trainer.global_step)
        if recent:
            trainer.writer.add_scalar(f"loss/validation/{when}_divergence", mean - sum(recent) / len(recent), trainer.global_step)
    return mean
