"""One device choice for every job, and a fresh accelerate state per training run."""
from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from .errors import ConfigError

DEVICES = ("auto", "cpu", "cuda")


def pick_device(name: str = "auto") -> Any:
    """auto: CUDA when available, else CPU; cuda: fail clearly without it."""
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device cuda: no CUDA device is available (use --device cpu or auto)")
    if name not in DEVICES:
        raise ConfigError(f"unknown device {name!r}; choose one of: {', '.join(DEVICES)}")
    return torch.device(name)


def fresh_accelerator(mixed_precision: str) -> Any:
    """An Accelerator for one job, whatever mixed precision an earlier job in this process used.

    accelerate keeps its mixed-precision setting in a process-wide singleton and refuses a second
    Accelerator with another one. The distributed part (PartialState: ranks, process group) stays;
    only the per-run AcceleratorState and GradientState are reset, as accelerate's own tests do.
    """
    import os

    import torch
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, GradientState

    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.cuda.is_available():
        os.environ.setdefault("ACCELERATE_USE_CPU", "true")  # torchrun on CPUs: gloo processes, as accelerate's MULTI_CPU

    for state in (AcceleratorState, GradientState):
        reset = getattr(state, "_reset_state", None)
        if reset is not None:
            reset()
    return Accelerator(mixed_precision=mixed_precision)


@contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """torch's intra-op threads set to `n` for a block, and restored after it.

    Streaming jobs whose arithmetic is trivial (a merge's lerp) run their helper threads (hashing,
    writing) beside it; OpenMP's spinning team would then fight those threads for the cores.
    """
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)
