"""Optimizers (registry) and lr_dropout, as SAEHD uses them (docs/face-model.md#optimizers)."""
from __future__ import annotations

import math
from collections.abc import Callable, Iterable

import torch

from loratrain.core.registry import Registry


class AdaBelief(torch.optim.Optimizer):
    """DFL's AdaBelief: m and v = EMA of (g - m)^2, no bias correction, no weight decay."""

    def __init__(self, params: Iterable, lr: float = 5e-5, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-6) -> None:
        super().__init__(params, {"lr": lr, "betas": betas, "eps": eps})

    @torch.no_grad()
    def step(self, closure: Callable | None = None):  # noqa: ANN201
        loss = closure() if closure is not None else None
        for group in self.param_groups:
            b1, b2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["m"] = torch.zeros_like(p)
                    state["v"] = torch.zeros_like(p)
                m, v = state["m"], state["v"]
                g = p.grad
                m.mul_(b1).add_(g, alpha=1 - b1)
                v.mul_(b2).add_((g - m) ** 2, alpha=1 - b2)
                p.addcdiv_(m, v.sqrt().add_(group["eps"]), value=-group["lr"])
        return loss


#: factories fn(params, lr, weight_decay=None): None is the optimizer's default (AdamW 0.01; AdaBelief and RMSprop, as
#: DeepFaceLab uses them, have no decay, so a non-zero value is refused by the options, not silently dropped here)
OPTIMIZERS: Registry[Callable[..., torch.optim.Optimizer]] = Registry("face optimizer")


def _no_decay(name: str, weight_decay: float | None) -> None:
    if weight_decay:
        raise ValueError(f"{name} has no weight decay (use adamw)")


@OPTIMIZERS.register("adabelief")
def _adabelief(params: Iterable, lr: float, weight_decay: float | None = None) -> torch.optim.Optimizer:
    _no_decay("adabelief", weight_decay)
    return AdaBelief(params, lr=lr)


@OPTIMIZERS.register("adamw")
def _adamw(params: Iterable, lr: float, weight_decay: float | None = None) -> torch.optim.Optimizer:
    return torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.999), weight_decay=0.01 if weight_decay is None else weight_decay)


@OPTIMIZERS.register("rmsprop")
def _rmsprop(params: Iterable, lr: float, weight_decay: float | None = None) -> torch.optim.Optimizer:
    _no_decay("rmsprop", weight_decay)
    return torch.optim.RMSprop(params, lr=lr, alpha=0.9, eps=1e-6)


class LrDropout:
    """Random sparse updates: each step only a Bernoulli(0.3) subset of each weight moves, with a 500-step cosine lr.

    Works with any optimizer: the update the optimizer computed is masked after its step."""

    def __init__(self, params: list[torch.nn.Parameter], keep: float = 0.3, period: int = 500) -> None:
        self.params, self.keep, self.period = params, keep, period
        self._before: list[torch.Tensor] = []

    def lr_scale(self, step: int) -> float:
        return (math.cos(2 * math.pi * step / self.period) + 1) / 2

    def before_step(self) -> None:
        self._before = [p.detach().clone() for p in self.params]

    @torch.no_grad()
    def after_step(self) -> None:
        for p, old in zip(self.params, self._before):
            mask = torch.rand_like(p) < self.keep
            p.copy_(torch.where(mask, p, old))
        self._before = []
