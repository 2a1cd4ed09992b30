"""Adapter networks (LoRA, LoCon, LoHa, LoKr, DoRA, DyLoRA, (IA)^3, OFT) and the full fine-tune, by registry, and their
kohya / PEFT file layouts. Every module of this package is imported, so a kind registers itself (base.NetworkKind)
from its own file and nothing else has to list it."""
import importlib
import pkgutil

from .base import NETWORKS, Network, NetworkKind, NetworkSpec, build_network, network_kinds

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")

__all__ = ["NETWORKS", "Network", "NetworkKind", "NetworkSpec", "build_network", "network_kinds"]
