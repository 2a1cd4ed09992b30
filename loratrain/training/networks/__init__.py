"""Adapter networks (LoRA, LoCon, LoHa, LoKr, DoRA, DyLoRA) and the full fine-tune, by registry, and their kohya / PEFT file layouts."""
from . import full as _full  # noqa: F401  (registers full: DreamBooth / fine-tune)
from . import lora as _lora  # noqa: F401  (registers lora, locon)
from . import lycoris as _lycoris  # noqa: F401  (registers loha, lokr, dora)
from .base import NETWORKS, Network, NetworkSpec, build_network

__all__ = ["NETWORKS", "Network", "NetworkSpec", "build_network"]
