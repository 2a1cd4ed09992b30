"""sd-scripts' --fused_backward_pass: each parameter is updated the moment its gradient is complete, and the
gradient is freed at once, so a full fine-tune never holds every gradient at the same time (for SDXL's UNet
that is ~5 GB in bf16).

Done with torch's post-accumulate-grad hooks and one optimizer per parameter (PyTorch's "optimizer step in
backward" recipe). The per-parameter updates are the same maths as one optimizer over all of them for
optimizers whose state is per parameter (AdamW, Adafactor, Lion, SGD ...); not for ones that share state
across parameters (Prodigy, D-Adaptation), which are refused (optim's `per_parameter` flag). Gradient clipping is per tensor, as
sd-scripts does it here. One process and no gradient accumulation: the update happens inside backward.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch


class FusedBackward(torch.optim.Optimizer):
    """The trainer's optimizer: holds the groups (the LR schedule sets their lr) while per-parameter optimizers,
    stepped from backward hooks, hold the state. `step` and `zero_grad` have nothing left to do."""

    def __init__(self, make: Callable[[list[dict[str, Any]]], torch.optim.Optimizer], groups: list[dict[str, Any]],
                 max_grad_norm: float = 0.0) -> None:
        super().__init__(groups, {"lr": groups[0]["lr"] if groups else 0.0})
        self.max_grad_norm = max_grad_norm
        self.inner: list[torch.optim.Optimizer] = []
        self._handles = []
        for group in self.param_groups:
            for p in group["params"]:
                one = make([{"params": [p], "lr": group["lr"]}])
                self.inner.append(one)
                self._handles.append(p.register_post_accumulate_grad_hook(self._updater(one, group)))

    def _updater(self, one: torch.optim.Optimizer, group: dict[str, Any]) -> Callable[[torch.Tensor], None]:
        def update(p: torch.Tensor) -> None:
            if self.max_grad_norm > 0:
                torch.nn.utils.clip_grad_norm_([p], self.max_grad_norm)
            for g in one.param_groups:
                g["lr"] = group["lr"]
            one.step()
            one.zero_grad(set_to_none=True)
        return update

    @torch.no_grad()
    def step(self, closure: Callable | None = None) -> None:  # the updates already happened in backward
        return None

    def zero_grad(self, set_to_none: bool = True) -> None:
        return None

    def state_dict(self) -> dict[str, Any]:
        return {"fused": [one.state_dict() for one in self.inner], "lrs": [g["lr"] for g in self.param_groups]}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if len(state_dict.get("fused", [])) != len(self.inner):
            raise ValueError("the saved optimizer state is not from a fused_backward_pass run of this network")
        for one, sd in zip(self.inner, state_dict["fused"]):
            one.load_state_dict(sd)
        for g, lr in zip(self.param_groups, state_dict["lrs"]):
            g["lr"] = lr
