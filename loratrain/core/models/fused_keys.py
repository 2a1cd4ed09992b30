"""State-dict conversion between a single-file layout with fused q/k/v Linears and diffusers' split one, driven by a
module table (`flux_keys.py`, `sd3_keys.py`).

Why one converter: FLUX.1 and SD3 differ from diffusers in the same three ways, names, fused Linears whose output rows
diffusers keeps as separate Linears, and AdaLN layers whose [shift | scale] halves diffusers orders [scale | shift].
Each model states its differences as a table (our module path -> [(diffusers path, first row, end row)], end -1 for
all rows), a predicate for the swapped layers and exact key renames; the walking, splitting, joining and the refusal
of keys no table names are here, once.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping

import torch

from loratrain.core.errors import ConfigError

Table = Mapping[str, list[tuple[str, int, int]]]


def swap_halves(t: torch.Tensor) -> torch.Tensor:
    """[a | b] -> [b | a] along the output rows: the file's [shift | scale] <-> diffusers' [scale | shift]."""
    a, b = t.chunk(2, dim=0)
    return torch.cat([b, a], dim=0)


def require(sd: Mapping[str, torch.Tensor], keys: tuple[str, ...], what: str) -> None:
    """ConfigError naming the first of `keys` the state dict lacks: it is not `what` (or a partial one)."""
    missing = next((k for k in keys if k not in sd), None)
    if missing is not None:
        raise ConfigError(f"not {what} (no {missing})")


def to_diffusers(sd: Mapping[str, torch.Tensor], table: Table, swapped: Callable[[str], bool],
                 renames: Mapping[str, str], what: str) -> dict[str, torch.Tensor]:
    """Our layout -> diffusers': each fused weight / bias split into its rows, renames applied where present."""
    out: dict[str, torch.Tensor] = {}
    used: set[str] = set()
    for ours, targets in table.items():
        for suffix in ("weight", "bias"):
            key = f"{ours}.{suffix}"
            if key not in sd:
                continue
            used.add(key)
            t = swap_halves(sd[key]) if swapped(ours) else sd[key]
            for theirs, start, end in targets:
                out[f"{theirs}.{suffix}"] = t if end < 0 else t[start:end].clone()
    _rename(sd, renames, out, used, what)
    return out


def from_diffusers(sd: Mapping[str, torch.Tensor], table: Table, swapped: Callable[[str], bool],
                   renames: Mapping[str, str], what: str) -> dict[str, torch.Tensor]:
    """diffusers' layout -> ours: the split Linears of each fused module joined row-wise (when all are there),
    renames (diffusers key -> ours) applied where present."""
    out: dict[str, torch.Tensor] = {}
    used: set[str] = set()
    for ours, targets in table.items():
        for suffix in ("weight", "bias"):
            keys = [f"{theirs}.{suffix}" for theirs, _, _ in targets]
            if not all(k in sd for k in keys):
                continue
            used.update(keys)
            t = torch.cat([sd[k] for k in keys], dim=0) if len(keys) > 1 else sd[keys[0]]
            out[f"{ours}.{suffix}"] = swap_halves(t) if swapped(ours) else t
    _rename(sd, renames, out, used, what)
    return out


def _rename(sd: Mapping[str, torch.Tensor], renames: Mapping[str, str], out: dict[str, torch.Tensor], used: set[str],
            what: str) -> None:
    for src, dst in renames.items():
        if src in sd:
            out[dst] = sd[src]
            used.add(src)
    left = sorted(set(sd) - used)
    if left:
        raise ConfigError(f"{what} has keys this converter does not know: {left[:3]}")
