"""Optimizers and LR schedules by registry (name -> constructor), with sd-scripts names."""
from __future__ import annotations

import ast
import math
from typing import Any, Callable

import torch
from torch.optim.lr_scheduler import LambdaLR

from ..common.registry import Registry

OptimizerFactory = Callable[[list[dict[str, Any]], float, dict[str, Any]], torch.optim.Optimizer]
OPTIMIZERS: Registry[OptimizerFactory] = Registry("optimizer")
SCHEDULES: Registry[Callable[..., Callable[[int], float]]] = Registry("lr scheduler")


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


def _need(module: str, extra: str) -> Any:
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise ImportError(f"this optimizer needs the '{module}' package: pip install {extra}") from None


@OPTIMIZERS.register("adamw", "torch.optim.adamw")
def _adamw(groups, lr, kw):
    return torch.optim.AdamW(groups, lr=lr, **{"weight_decay": 0.01, **kw})


@OPTIMIZERS.register("sgd")
def _sgd(groups, lr, kw):
    return torch.optim.SGD(groups, lr=lr, **kw)


@OPTIMIZERS.register("adamw8bit")
def _adamw8bit(groups, lr, kw):
    bnb = _need("bitsandbytes", "bitsandbytes (GPU only)")
    return bnb.optim.AdamW8bit(groups, lr=lr, **kw)


@OPTIMIZERS.register("lion")
def _lion(groups, lr, kw):
    return _need("lion_pytorch", "lion-pytorch").Lion(groups, lr=lr, **kw)


@OPTIMIZERS.register("prodigy")
def _prodigy(groups, lr, kw):
    return _need("prodigyopt", "prodigyopt").Prodigy(groups, lr=lr, **kw)


@OPTIMIZERS.register("dadaptadam", "dadaptation")
def _dadapt(groups, lr, kw):
    return _need("dadaptation", "dadaptation").DAdaptAdam(groups, lr=lr, **kw)


@OPTIMIZERS.register("adafactor")
def _adafactor(groups, lr, kw):
    from transformers.optimization import Adafactor

    return Adafactor(groups, lr=lr, **{"scale_parameter": False, "relative_step": False, "warmup_init": False, **kw})


def create_optimizer(name: str, groups: list[dict[str, Any]], lr: float, args: list[str]) -> torch.optim.Optimizer:
    return OPTIMIZERS.get(name)(groups, lr, parse_optimizer_args(args))


@SCHEDULES.register("constant")
def _constant(total, warmup, **_):
    return lambda step: 1.0


@SCHEDULES.register("constant_with_warmup")
def _constant_warm(total, warmup, **_):
    return lambda step: min(1.0, (step + 1) / warmup) if warmup else 1.0


def _warm(warmup: int, rest: Callable[[float], float], total: int) -> Callable[[int], float]:
    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return rest((step - warmup) / max(1, total - warmup))
    return f


@SCHEDULES.register("linear")
def _linear(total, warmup, **_):
    return _warm(warmup, lambda p: max(0.0, 1.0 - p), total)


@SCHEDULES.register("cosine")
def _cosine(total, warmup, **_):
    return _warm(warmup, lambda p: max(0.0, 0.5 * (1 + math.cos(math.pi * min(p, 1.0)))), total)


@SCHEDULES.register("cosine_with_restarts")
def _cosine_restarts(total, warmup, num_cycles=1, **_):
    def rest(p: float) -> float:
        if p >= 1.0:
            return 0.0
        return max(0.0, 0.5 * (1 + math.cos(math.pi * ((num_cycles * p) % 1.0))))
    return _warm(warmup, rest, total)


@SCHEDULES.register("polynomial")
def _poly(total, warmup, power=1.0, **_):
    return _warm(warmup, lambda p: max(0.0, 1.0 - min(p, 1.0)) ** power, total)


def create_scheduler(name: str, optimizer: torch.optim.Optimizer, total_steps: int, warmup: float,
                     num_cycles: int = 1, power: float = 1.0) -> LambdaLR:
    """Warmup given as steps, or as a ratio of the total when below 1 (sd-scripts)."""
    warmup_steps = int(warmup * total_steps) if 0 < warmup < 1 else int(warmup)
    fn = SCHEDULES.get(name)(total_steps, warmup_steps, num_cycles=num_cycles, power=power)
    return LambdaLR(optimizer, fn)
