"""One precision vocabulary for every job, with the spellings users bring from sd-scripts and A1111.

Canonical names are fp32, fp16 and bf16. sd-scripts writes `float` for fp32 in --save_precision and
`no` for "no mixed precision"; both are accepted wherever a precision is asked for.
"""
from __future__ import annotations

from typing import Any

CANONICAL = ("fp32", "fp16", "bf16")
ALIASES = {"float": "fp32", "float32": "fp32", "full": "fp32", "no": "fp32", "half": "fp16", "float16": "fp16",
           "bfloat16": "bf16"}
#: every accepted spelling, for option choices
NAMES = (*CANONICAL, "float", "no")


def canonical(name: str) -> str:
    key = name.strip().lower()
    key = ALIASES.get(key, key)
    if key not in CANONICAL:
        raise ValueError(f"unknown precision {name!r}; choose one of: {', '.join(NAMES)}")
    return key


def dtype_of(name: str) -> Any:
    """The torch dtype of a precision name."""
    import torch

    return {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[canonical(name)]
