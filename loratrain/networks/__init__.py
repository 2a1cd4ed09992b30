"""Adapter networks (LoRA, LoCon, ...) by registry, and their kohya / PEFT file layouts."""
from .base import NETWORKS, Network, NetworkSpec, build_network

from . import lora as _lora  # noqa: F401  (registers lora, locon)

__all__ = ["NETWORKS", "Network", "NetworkSpec", "build_network"]
