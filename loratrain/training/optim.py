"""Optimizers and LR schedules by registry (name -> constructor), with sd-scripts names.

Schedules are diffusers' `get_scheduler` (the ones sd-scripts uses), so warmup and restarts behave identically.
"""
from __future__ import annotations

import ast
import importlib.util
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from loratrain.core.registry import Registry

OPTIMIZERS: Registry["OptimizerSpec"] = Registry("optimizer")
SCHEDULERS: Registry[Callable[..., Any]] = Registry("lr scheduler")


def parse_optimizer_args(args: list[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for item in args:
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"optimizer_args: {item!r} is not key=value")
        try:
            out[key.strip()] = ast.literal_eval(value.strip())
        except (ValueError, SyntaxError):
            out[key.strip()] = value.strip()
    return out


@dataclass(frozen=True)
class OptimizerSpec:
    make: Callable[[list[dict[str, Any]], float, dict[str, Any]], torch.optim.Optimizer]
    package: str = ""  # the module it needs, checked before any model loads
    install: str = ""  # what to pip install for it

    def missing(self) -> str | None:
        """An install hint when the optimizer's package is not importable, else None."""
        if self.package and importlib.util.find_spec(self.package) is None:
            return f"this optimizer needs the '{self.package}' package: pip install {self.install or self.package}"
        return None


def optimizer(*names: str, package: str = "", install: str = "") -> Callable:
    def deco(fn: Callable) -> Callable:
        OPTIMIZERS.register(*names)(OptimizerSpec(fn, package, install))
        return fn
    return deco


@optimizer("AdamW", "torch.optim.AdamW")
def _adamw(groups, lr, kw):
    return torch.optim.AdamW(groups, lr=lr, **{"weight_decay": 0.01, **kw})


@optimizer("SGD")
def _sgd(groups, lr, kw):
    return torch.optim.SGD(groups, lr=lr, **kw)


@optimizer("AdamW8bit", package="bitsandbytes", install="bitsandbytes (GPU only)")
def _adamw8bit(groups, lr, kw):
    import bitsandbytes as bnb

    return bnb.optim.AdamW8bit(groups, lr=lr, **kw)


@optimizer("Lion", package="lion_pytorch", install="lion-pytorch")
def _lion(groups, lr, kw):
    from lion_pytorch import Lion

    return Lion(groups, lr=lr, **kw)


@optimizer("Prodigy", package="prodigyopt")
def _prodigy(groups, lr, kw):
    from prodigyopt import Prodigy

    return Prodigy(groups, lr=lr, **kw)


@optimizer("DAdaptAdam", "DAdaptation", package="dadaptation")
def _dadapt(groups, lr, kw):
    from dadaptation import DAdaptAdam

    return DAdaptAdam(groups, lr=lr, **kw)


@optimizer("Adafactor")
def _adafactor(groups, lr, kw):
    from transformers.optimization import Adafactor

    return Adafactor(groups, lr=lr, **{"scale_parameter": False, "relative_step": False, "warmup_init": False, **kw})


def create_optimizer(name: str, groups: list[dict[str, Any]], lr: float, args: list[str]) -> torch.optim.Optimizer:
    spec = OPTIMIZERS.get(name)
    if (hint := spec.missing()) is not None:
        raise ImportError(hint)
    return spec.make(groups, lr, parse_optimizer_args(args))


def _diffusers(name: str) -> Callable[..., Any]:
    """diffusers' own schedule (what sd-scripts uses): warmup is step/warmup, so the first step has lr 0."""
    def make(optimizer: torch.optim.Optimizer, total: int, warmup: int, num_cycles: int = 1, power: float = 1.0) -> Any:
        from diffusers.optimization import get_scheduler

        kw: dict[str, Any] = {"num_warmup_steps": warmup, "num_training_steps": total}
        if name == "cosine_with_restarts":
            kw["num_cycles"] = num_cycles
        if name == "polynomial":
            kw["power"] = power
        if name == "constant":
            kw = {}
        return get_scheduler(name, optimizer, **kw)
    return make


for _name in ("constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial"):
    SCHEDULERS.register(_name)(_diffusers(_name))


def warmup_steps(warmup: float, total_steps: int) -> int:
    """Warmup given as steps, or as a ratio of the total when below 1 (sd-scripts)."""
    return int(warmup * total_steps) if 0 < warmup < 1 else int(warmup)


def create_scheduler(name: str, optimizer: torch.optim.Optimizer, total_steps: int, warmup: float,
                     num_cycles: int = 1, power: float = 1.0) -> Any:
    return SCHEDULERS.get(name)(optimizer, total_steps, warmup_steps(warmup, total_steps), num_cycles=num_cycles, power=power)
