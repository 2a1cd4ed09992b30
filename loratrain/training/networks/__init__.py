"""Adapter networks (LoRA, LoCon, LoHa, LoKr, DoRA) by registry, and their kohya / PEFT file layouts."""
from . import lora as _lora  # noqa: F401  (registers lora, locon)
from . import lycoris as _lycoris  # noqa: F401  (registers loha, lokr, dora)
from .base import NETWORKS, Network, NetworkSpec, build_network

__all__ = ["NETWORKS", "Network", "NetworkSpec", "build_network"]
