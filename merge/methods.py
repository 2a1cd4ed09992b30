"""Merge methods by registry: each is an element-wise formula on float32 chunks.

`w` is always the share of model B, whatever the method (as in A1111), so a weight means the same
thing in every tool of ours. Adding a method touches only this file.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from loratrain.core.registry import Registry


@dataclass(frozen=True)
class MergeMethod:
    name: str
    formula: str
    a1111_name: str
    needs_c: bool
    # fn(a, b, c, w, out=None): the result, written into `out` when given (same shape, any float dtype)
    fn: Callable[..., torch.Tensor]
    # weights at which the result is exactly one input, so that input is copied without reading the others
    identity: Callable[[float], str | None]
    # the formula gives bit-identical results on fp16/bf16 inputs (torch computes lerp in float32
    # internally and rounds once), so no float32 copies are needed when inputs and output share a dtype
    exact_in_low_precision: bool = False


MERGE_METHODS: Registry[MergeMethod] = Registry("merge method")


def _weighted_sum(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor | None, w: float,
                  out: torch.Tensor | None = None) -> torch.Tensor:
    if out is not None and out.dtype == a.dtype:
        return torch.lerp(a, b, w, out=out)  # straight into the output buffer: no temporary, no extra copy
    result = torch.lerp(a, b, w)
    return result if out is None else out.copy_(result)


def _add_difference(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor | None, w: float,
                    out: torch.Tensor | None = None) -> torch.Tensor:
    assert c is not None
    result = (b - c).mul_(w).add_(a)
    return result if out is None else out.copy_(result)


MERGE_METHODS.register("weighted_sum", "ws")(MergeMethod(
    "weighted_sum", "A*(1-w) + B*w", "Weighted sum", False, _weighted_sum,
    lambda w: "A" if w == 0 else ("B" if w == 1 else None), exact_in_low_precision=True))
MERGE_METHODS.register("add_difference", "ad")(MergeMethod(
    "add_difference", "A + (B-C)*w", "Add difference", True, _add_difference,
    lambda w: "A" if w == 0 else None))
