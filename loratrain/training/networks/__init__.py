"""Adapter networks (LoRA, LoCon, LoHa, LoKr, DoRA, DyLoRA, OFT) and the full fine-tune, by registry, and their kohya / PEFT file layouts."""
from . import full as _full  # noqa: F401  (registers full: DreamBooth / fine-tune)
from . import lora as _lora  # noqa: F401  (registers lora, locon)
from . import lycoris as _lycoris  # noqa: F401  (registers loha, lokr, dora)
from . import oft as _oft  # noqa: F401  (registers oft)
from .base import NETWORKS, Network, NetworkSpec, build_network

__all__ = ["NETWORKS", "Network", "NetworkSpec", "build_network"]
