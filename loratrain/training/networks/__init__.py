"""Adapter networks (LoRA, LoCon, ...) by registry, and their kohya / PEFT file layouts."""
from . import lora as _lora  # noqa: F401  (registers lora, locon)
from .base import NETWORKS, Network, NetworkSpec, build_network

__all__ = ["NETWORKS", "Network", "NetworkSpec", "build_network"]
