"""Sampler names (ours, sd-scripts' and A1111-style) -> the diffusers scheduler that implements them.

Only names and class names live here, so options can be checked against this registry without
importing diffusers; `sampling.build_pipeline` instantiates the class.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from .registry import Registry


@dataclass(frozen=True)
class SamplerSpec:
    scheduler: str  # diffusers class name
    kwargs: dict[str, Any] = field(default_factory=dict)


SAMPLERS: Registry[SamplerSpec] = Registry("sampler")


def _add(names: tuple[str, ...], scheduler: str, **kwargs: Any) -> None:
    SAMPLERS.register(*names)(SamplerSpec(scheduler, kwargs))


_add(("ddim",), "DDIMScheduler")
_add(("ddpm",), "DDPMScheduler")
_add(("pndm",), "PNDMScheduler")
_add(("lms", "k_lms"), "LMSDiscreteScheduler")
_add(("euler", "k_euler"), "EulerDiscreteScheduler")
_add(("euler_a", "k_euler_a"), "EulerAncestralDiscreteScheduler")
_add(("heun",), "HeunDiscreteScheduler")
_add(("dpm_2", "k_dpm_2"), "KDPM2DiscreteScheduler")
_add(("dpm_2_a", "k_dpm_2_a"), "KDPM2AncestralDiscreteScheduler")
_add(("dpmsolver",), "DPMSolverMultistepScheduler", algorithm_type="dpmsolver")
_add(("dpmsolver++", "dpm++_2m"), "DPMSolverMultistepScheduler", algorithm_type="dpmsolver++")
_add(("dpmsingle",), "DPMSolverSinglestepScheduler")
_add(("unipc",), "UniPCMultistepScheduler")
