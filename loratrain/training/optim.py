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
    per_parameter: bool = False  # its state is per parameter: fused_backward_pass (one optimizer per weight) is the same maths

    def missing(self) -> str | None:
        """An install hint when the optimizer's package is not importable, else None."""
        if self.package and importlib.util.find_spec(self.package) is None:
            return f"this optimizer needs the '{self.package}' package: pip install {self.install or self.package}"
        return None


def optimizer(*names: str, package: str = "", install: str = "", per_parameter: bool = False) -> Callable:
    def deco(fn: Callable) -> Callable:
        OPTIMIZERS.register(*names)(OptimizerSpec(fn, package, install, per_parameter))
        return fn
    return deco


@optimizer("AdamW", "torch.optim.AdamW", per_parameter=True)
def _adamw(groups, lr, kw):
    return torch.optim.AdamW(groups, lr=lr, **{"weight_decay": 0.01, **kw})


@optimizer("SGD", per_parameter=True)
def _sgd(groups, lr, kw):
    return torch.optim.SGD(groups, lr=lr, **kw)


@optimizer("SGDNesterov", per_parameter=True)
def _sgd_nesterov(groups, lr, kw):
    """sd-scripts: SGD with Nesterov momentum, momentum 0.9 unless given."""
    return torch.optim.SGD(groups, lr=lr, **{"momentum": 0.9, **kw, "nesterov": True})


def _bnb(cls_name: str, **fixed: Any) -> Callable:
    def make(groups, lr, kw):
        import bitsandbytes as bnb

        return getattr(bnb.optim, cls_name)(groups, lr=lr, **{**kw, **fixed})
    return make


for _names, _cls, _fixed in ((("PagedAdamW",), "PagedAdamW", {}), (("PagedAdamW8bit",), "PagedAdamW8bit", {}),
                             (("PagedAdamW32bit",), "PagedAdamW32bit", {}), (("Lion8bit",), "Lion8bit", {}),
                             (("PagedLion8bit",), "PagedLion8bit", {}), (("AdEMAMix8bit",), "AdEMAMix8bit", {}),
                             (("PagedAdEMAMix8bit",), "PagedAdEMAMix8bit", {}),
                             (("SGDNesterov8bit",), "SGD8bit", {"nesterov": True})):
    OPTIMIZERS.register(*_names)(OptimizerSpec(_bnb(_cls, **_fixed), "bitsandbytes", "bitsandbytes (GPU only)",
                                                per_parameter=_cls in ("PagedAdamW8bit", "Lion8bit", "SGD8bit")))


def _schedule_free(cls_name: str) -> Callable:
    def make(groups, lr, kw):
        import schedulefree

        return getattr(schedulefree, cls_name)(groups, lr=lr, **kw)
    return make


for _cls in ("AdamWScheduleFree", "RAdamScheduleFree", "SGDScheduleFree"):
    OPTIMIZERS.register(_cls)(OptimizerSpec(_schedule_free(_cls), "schedulefree"))


@optimizer("CAME", package="came_pytorch", install="came-pytorch")
def _came(groups, lr, kw):
    from came_pytorch import CAME

    return CAME(groups, lr=lr, **kw)


@optimizer("AdamW8bit", package="bitsandbytes", install="bitsandbytes (GPU only)", per_parameter=True)
def _adamw8bit(groups, lr, kw):
    import bitsandbytes as bnb

    return bnb.optim.AdamW8bit(groups, lr=lr, **kw)


@optimizer("Lion", package="lion_pytorch", install="lion-pytorch", per_parameter=True)
def _lion(groups, lr, kw):
    from lion_pytorch import Lion

    return Lion(groups, lr=lr, **kw)


@optimizer("Prodigy", package="prodigyopt")
def _prodigy(groups, lr, kw):
    from prodigyopt import Prodigy

    return Prodigy(groups, lr=lr, **kw)


@optimizer("DAdaptAdam", package="dadaptation")
def _dadapt(groups, lr, kw):
    from dadaptation import DAdaptAdam

    return DAdaptAdam(groups, lr=lr, **kw)


@optimizer("DAdaptation", "DAdaptAdamPreprint", package="dadaptation")
def _dadapt_preprint(groups, lr, kw):
    """sd-scripts' "DAdaptation" is the preprint's Adam variant."""
    from dadaptation.experimental import DAdaptAdamPreprint

    return DAdaptAdamPreprint(groups, lr=lr, **kw)


def _dadaptation(cls_name: str, module: str = "dadaptation") -> Callable:
    def make(groups, lr, kw):
        import importlib

        return getattr(importlib.import_module(module), cls_name)(groups, lr=lr, **kw)
    return make


for _cls in ("DAdaptAdaGrad", "DAdaptAdan", "DAdaptLion", "DAdaptSGD"):
    OPTIMIZERS.register(_cls)(OptimizerSpec(_dadaptation(_cls), "dadaptation"))
OPTIMIZERS.register("DAdaptAdanIP")(OptimizerSpec(_dadaptation("DAdaptAdanIP", "dadaptation.experimental"), "dadaptation"))


@optimizer("Adafactor", per_parameter=True)
def _adafactor(groups, lr, kw):
    from transformers.optimization import Adafactor

    kw = {"scale_parameter": False, "relative_step": False, "warmup_init": False, **kw}
    if kw["relative_step"]:  # the lr is Adafactor's own (sd-scripts drops the given one, as Adafactor requires)
        lr, groups = None, [{**g, "lr": None} for g in groups]
    return Adafactor(groups, lr=lr, **kw)


def create_optimizer(name: str, groups: list[dict[str, Any]], lr: float, args: list[str]) -> torch.optim.Optimizer:
    spec = OPTIMIZERS.get(name)
    if (hint := spec.missing()) is not None:
        raise ImportError(hint)
    return spec.make(groups, lr, parse_optimizer_args(args))


@dataclass(frozen=True)
class ScheduleInputs:
    """What a schedule may use: sd-scripts' scheduler options, with warmup and decay already in steps."""

    total: int
    warmup: int
    num_cycles: int = 1
    power: float = 1.0
    decay: int = 0
    timescale: int | None = None
    min_lr_ratio: float | None = None
    initial_lr: float = 0.0
    args: dict[str, Any] | None = None


def _diffusers(name: str) -> Callable[..., Any]:
    """diffusers' own schedule (what sd-scripts uses): warmup is step/warmup, so the first step has lr 0."""
    def make(optimizer: torch.optim.Optimizer, s: ScheduleInputs) -> Any:
        from diffusers.optimization import get_scheduler

        kw: dict[str, Any] = {"num_warmup_steps": s.warmup, "num_training_steps": s.total}
        if name == "cosine_with_restarts":
            kw["num_cycles"] = s.num_cycles
        if name == "polynomial":
            kw["power"] = s.power
        if name in ("constant", "piecewise_constant"):
            kw = {}
        return get_scheduler(name, optimizer, **kw, **(s.args or {}))
    return make


for _name in ("constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial", "piecewise_constant"):
    SCHEDULERS.register(_name)(_diffusers(_name))


@SCHEDULERS.register("cosine_with_min_lr")
def _cosine_min_lr(optimizer: torch.optim.Optimizer, s: ScheduleInputs) -> Any:
    """transformers' cosine that ends at lr_scheduler_min_lr_ratio x lr (sd-scripts' option)."""
    from transformers.optimization import get_cosine_with_min_lr_schedule_with_warmup

    return get_cosine_with_min_lr_schedule_with_warmup(optimizer, s.warmup, s.total, min_lr_rate=s.min_lr_ratio or 0.0,
                                                       **(s.args or {}))


@SCHEDULERS.register("inverse_sqrt")
def _inverse_sqrt(optimizer: torch.optim.Optimizer, s: ScheduleInputs) -> Any:
    from transformers.optimization import get_inverse_sqrt_schedule

    return get_inverse_sqrt_schedule(optimizer, s.warmup, timescale=s.timescale, **(s.args or {}))


@SCHEDULERS.register("warmup_stable_decay")
def _wsd(optimizer: torch.optim.Optimizer, s: ScheduleInputs) -> Any:
    """Warmup, a constant stretch, then a decay over lr_decay_steps to lr_scheduler_min_lr_ratio x lr."""
    from transformers.optimization import get_wsd_schedule

    return get_wsd_schedule(optimizer, s.warmup, s.decay, num_training_steps=s.total, min_lr_ratio=s.min_lr_ratio or 0.0,
                            **(s.args or {}))


@SCHEDULERS.register("adafactor")
def _adafactor_schedule(optimizer: torch.optim.Optimizer, s: ScheduleInputs) -> Any:
    """The lr Adafactor computes itself (optimizer_args relative_step=True), as sd-scripts' "adafactor"."""
    from transformers.optimization import AdafactorSchedule

    return AdafactorSchedule(optimizer, initial_lr=s.initial_lr)


def warmup_steps(warmup: float, total_steps: int) -> int:
    """Warmup given as steps, or as a ratio of the total when below 1 (sd-scripts)."""
    return int(warmup * total_steps) if 0 < warmup < 1 else int(warmup)


def create_scheduler(name: str, optimizer: torch.optim.Optimizer, total_steps: int, warmup: float,
                     num_cycles: int = 1, power: float = 1.0, decay: float = 0.0, timescale: int | None = None,
                     min_lr_ratio: float | None = None, initial_lr: float = 0.0, args: list[str] | None = None) -> Any:
    inputs = ScheduleInputs(total_steps, warmup_steps(warmup, total_steps), num_cycles, power, warmup_steps(decay, total_steps),
                            timescale, min_lr_ratio, initial_lr, parse_optimizer_args(args or []) or None)
    try:
        if torch_scheduler_class(name) is not None:
            return torch_scheduler_class(name)(optimizer, **(inputs.args or {}))
        return SCHEDULERS.get(name)(optimizer, inputs)
    except TypeError as e:
        raise ValueError(f"{name} does not take these arguments ({e})") from None


def torch_scheduler_class(name: str) -> Any:
    """sd-scripts' --lr_scheduler_type: a class of torch.optim.lr_scheduler by name (with or without that module
    path; None otherwise). Only those: a dotted path to any module would import and run arbitrary code."""
    import torch.optim.lr_scheduler as schedulers

    short = name.removeprefix("torch.optim.lr_scheduler.")
    cls = getattr(schedulers, short, None) if short.isidentifier() and not short.startswith("_") else None
    return cls if isinstance(cls, type) and issubclass(cls, schedulers.LRScheduler) else None
