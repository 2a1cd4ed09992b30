"""What FLUX's and SD3's kohya-layout LoRA networks share (`flux_network.py`, `sd3_network.py`).

Why one module: both are sd-scripts' plain LoRA on our own transformer (BFL / single-file module layout), hooked onto
the model's layers so its state dict and key names stay the file's: the same adapter on a fused Linear (one (down, up)
pair per split_qkv slice, saved block-diagonal with alpha * n), the same `lora_unet_<path with _>` names, the same
hooks, file writer and reader. Only the target lists (which Linears, which network_args) are each model's own.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from loratrain.core.errors import ConfigError

from .module_checks import LOHA, LOKR, check_module

PREFIX = "lora_unet_"
KOHYA_PARTS = ("lora_down.weight", "lora_up.weight", "alpha")
#: LyCORIS' LoHa / LoKr / DoRA tensor suffixes (module_checks.py's lists; Tucker and low-rank-W1 ones are read so
#: that they are refused by name rather than as unknown keys)
LYCORIS_PARTS = LOHA + ("hada_t1", "hada_t2") + LOKR + ("dora_scale",)


def kohya_name(path: str) -> str:
    return PREFIX + path.replace(".", "_")


def make_adapter(kind: str, name: str, shape: tuple[int, int], rank: int, alpha: float,
                 splits: tuple[int, ...] | None = None, file_parts: Mapping[str, torch.Tensor] | None = None) -> nn.Module:
    """The adapter of one Linear: plain LoRA (FusedLoraModule) or a LyCORIS kind (hooked_kinds.py), new or shaped by
    a file module's tensors (`file_parts`; LoRA reads its ranks elsewhere)."""
    if kind == "lora":
        return FusedLoraModule(*shape, rank, alpha, splits)
    from .hooked_kinds import HOOKED_KINDS

    if splits:
        raise ConfigError(f"split_qkv is an argument of sd-scripts' LoRA; a {kind} network trains each fused Linear whole")
    cls = HOOKED_KINDS.get(kind)
    return cls.from_parts(name, *shape, file_parts) if file_parts is not None else cls(*shape, rank, alpha)


class FusedLoraModule(nn.Module):
    """alpha/rank * up(down(x)) for one Linear; with `splits`, one (down, up) pair per output slice, concatenated."""

    layer = nn.Linear  #: the kind of layer this adapter hooks onto
    kind = "lora"

    def __init__(self, in_features: int, out_features: int, rank: int, alpha: float,
                 splits: tuple[int, ...] | None = None) -> None:
        super().__init__()
        parts = splits or (out_features,)
        if sum(parts) != out_features:
            raise ConfigError(f"LoRA slices {list(parts)} do not add up to the Linear's {out_features} outputs")
        self.in_features, self.out_features, self.rank, self.alpha = in_features, out_features, rank, float(alpha)
        self.splits = splits
        self.down = nn.ParameterList(nn.Parameter(torch.empty(rank, in_features)) for _ in parts)
        self.up = nn.ParameterList(nn.Parameter(torch.zeros(p, rank)) for p in parts)
        for d in self.down:  # sd-scripts' (and Microsoft's) init: kaiming-uniform down, zero up: starts as a no-op
            nn.init.kaiming_uniform_(d, a=math.sqrt(5))
        self.multiplier = 1.0

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xd = x.to(self.down[0].dtype)
        outs = [F.linear(F.linear(xd, d), u) for d, u in zip(self.down, self.up)]
        y = outs[0] if len(outs) == 1 else torch.cat(outs, dim=-1)
        return (y * (self.scale * self.multiplier)).to(x.dtype)

    @torch.no_grad()
    def delta_weight(self) -> torch.Tensor:
        """The dense ΔW [out, in] this adapter adds to its Linear's weight (multiplier 1), in float32, for merging
        and checks; written slice by slice into one buffer (FLUX's fused Linears are up to 21504 x 3072)."""
        out = torch.empty(self.out_features, self.in_features, device=self.down[0].device)
        row = 0
        for d, u in zip(self.down, self.up):
            torch.matmul(u.float(), d.float(), out=out[row:row + u.shape[0]])
            row += u.shape[0]
        return out.mul_(self.scale)

    def kohya_tensors(self) -> dict[str, torch.Tensor]:
        n = len(self.down)
        down = torch.cat([d.detach() for d in self.down], dim=0)
        up = torch.zeros(self.out_features, n * self.rank, dtype=down.dtype, device=down.device)
        row = 0
        for j, u in enumerate(self.up):
            up[row:row + u.shape[0], j * self.rank:(j + 1) * self.rank] = u.detach()
            row += u.shape[0]
        return {"lora_down.weight": down, "lora_up.weight": up, "alpha": torch.tensor(self.alpha * n, dtype=torch.float32)}

    @torch.no_grad()
    def load_kohya(self, name: str, down: torch.Tensor, up: torch.Tensor, alpha: float) -> None:
        n = len(self.down)
        want_down, want_up = (n * self.rank, self.in_features), (self.out_features, n * self.rank)
        if tuple(down.shape) != want_down or tuple(up.shape) != want_up:
            raise ConfigError(f"{name}: lora_down {list(down.shape)} / lora_up {list(up.shape)} do not fit this model "
                              f"(want {list(want_down)} / {list(want_up)})")
        row = 0
        for j, (d, u) in enumerate(zip(self.down, self.up)):
            cols = slice(j * self.rank, (j + 1) * self.rank)
            block = up[row:row + u.shape[0], cols]
            off = up[:, cols].clone()
            off[row:row + u.shape[0]] = 0
            if off.abs().max() > 0:
                raise ConfigError(f"{name}: lora_up is not block-diagonal over q/k/v, so it was not trained with "
                                  "split_qkv; load it with split_qkv off")
            d.copy_(down[cols]), u.copy_(block)
            row += u.shape[0]
        self.alpha = float(alpha) / n


class HookedLoraNetwork(nn.Module):
    """One adapter per target, keyed by its kohya name; `apply_to(model)` hooks them onto the model's layers.

    `make(path, shape, target)` builds the adapter of one target from its (in, out) shape and what `targets` holds for
    it (a rank, or (rank, alpha)); `label` names the model in messages.
    """

    label = "LoRA"

    def __init__(self, cfg: Any, split_qkv: bool, shapes: Mapping[str, tuple[int, int]], targets: Mapping[str, Any],
                 make: Callable[[str, tuple[int, int], Any], nn.Module]) -> None:
        super().__init__()
        self.config, self.split_qkv = cfg, split_qkv
        unknown = sorted(set(targets) - set(shapes))
        if unknown:
            raise ConfigError(f"{self.label} LoRA: no Linear {unknown[0]} in this model")
        self.paths = {kohya_name(p): p for p in targets}
        self.lora = nn.ModuleDict({kohya_name(p): make(p, shapes[p], t) for p, t in targets.items()})
        self._hooks: list[torch.utils.hooks.RemovableHandle] = []

    def apply_to(self, model: nn.Module) -> HookedLoraNetwork:
        """Add each adapter's output to its layer's (forward hooks; the model's weights and keys are untouched)."""
        self.remove()
        modules = dict(model.named_modules())
        for name, path in self.paths.items():
            layer, lora = modules.get(path), self.lora[name]
            kind = lora.layer
            have = (layer.in_channels, layer.out_channels) if isinstance(layer, nn.Conv2d) else \
                (getattr(layer, "in_features", None), getattr(layer, "out_features", None))
            if not isinstance(layer, kind) or have != (lora.in_features, lora.out_features):
                raise ConfigError(f"{self.label} LoRA {name}: the model has no {lora.in_features}->{lora.out_features} "
                                  f"{kind.__name__} at {path}")
            if getattr(lora, "needs_layer", False):  # DoRA: its change depends on the layer's own weight
                lora.start_from(layer.weight)
                self._hooks.append(layer.register_forward_hook(lambda m, args, out, lora=lora: out + lora(args[0], m)))
            else:
                self._hooks.append(layer.register_forward_hook(lambda _m, args, out, lora=lora: out + lora(args[0])))
        return self

    def remove(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks = []

    def set_multiplier(self, value: float) -> None:
        for m in self.lora.values():
            m.multiplier = value


def kohya_state_dict(network: HookedLoraNetwork, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """The network as sd-scripts saves it (alpha stays float32)."""
    out = {}
    for name, module in network.lora.items():
        for part, t in module.kohya_tensors().items():
            out[f"{name}.{part}"] = t.to(dtype) if dtype is not None and part != "alpha" else t.clone()
    return out


def group_kohya(sd: Mapping[str, torch.Tensor], source: str) -> dict[str, dict[str, torch.Tensor]]:
    """A kohya-layout state dict by module: name -> {lora_down.weight, lora_up.weight[, alpha]}, or a LyCORIS LoHa /
    LoKr module's tensors by suffix (hada_*, lokr_*[, alpha])."""
    groups: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in sd.items():
        name, _, part = key.partition(".")
        if part not in KOHYA_PARTS + LYCORIS_PARTS:
            raise ConfigError(f"{source}: {key} is not part of a kohya LoRA (lora_down.weight / lora_up.weight / alpha) "
                              "or a LyCORIS LoHa / LoKr module")
        groups.setdefault(name, {})[part] = value
    for name, parts in groups.items():  # every part there, shapes that multiply, finite numbers, one alpha
        try:
            check_module(f"{source}: {name}", parts)
        except ValueError as e:
            raise ConfigError(str(e)) from None
    return groups


def file_kind(groups: Mapping[str, Mapping[str, torch.Tensor]], source: str) -> str:
    """The one adapter kind of a grouped file ("lora", "loha", "lokr"); a file mixing kinds is refused."""
    from .hooked_kinds import kind_of_parts

    kinds = {kind_of_parts(parts) for parts in groups.values()}
    if len(kinds) > 1:
        raise ConfigError(f"{source}: mixes module kinds ({', '.join(sorted(kinds))}); one kind per file here")
    return kinds.pop() if kinds else "lora"


def load_kohya_state_dict(network: HookedLoraNetwork, sd: Mapping[str, torch.Tensor], source: str = "LoRA",
                          groups: dict[str, dict[str, torch.Tensor]] | None = None) -> None:
    """Reverse of kohya_state_dict: fill a network built with the same targets (every module must be there).
    `groups`: `sd` already grouped (and so checked) by group_kohya, which a caller that shaped the network from the
    file has done; the tensors are not checked twice."""
    from .hooked_kinds import kind_of_parts

    groups = group_kohya(sd, source) if groups is None else groups
    extra, missing = sorted(set(groups) - set(network.lora)), sorted(set(network.lora) - set(groups))
    if extra or missing:
        raise ConfigError(f"{source}: modules do not match the network ({'extra ' + extra[0] if extra else ''}"
                          f"{' ' if extra and missing else ''}{'missing ' + missing[0] if missing else ''})")
    for name, parts in groups.items():
        module, kind = network.lora[name], kind_of_parts(parts)
        if kind != getattr(module, "kind", "lora"):
            raise ConfigError(f"{source}: {name} is a {kind} module; this network trains {module.kind} "
                              "(network_module)")
        if kind != "lora":
            module.load_parts(f"{source}: {name}", parts)
            continue
        down, up = parts["lora_down.weight"].float(), parts["lora_up.weight"].float()
        alpha = float(parts["alpha"]) if "alpha" in parts and float(parts["alpha"]) != 0 else float(down.shape[0])
        module.load_kohya(f"{source}: {name}", down, up, alpha)


def kohya_ranks(groups: Mapping[str, Mapping[str, torch.Tensor]], by_name: Mapping[str, str],
                slices: Callable[[str], int], source: str) -> dict[str, int]:
    """Model path -> per-slice rank of each module of a grouped kohya file (`slices(path)`: its split_qkv slices, 1
    without split_qkv); a file rank that does not divide is refused."""
    ranks = {}
    for name, parts in groups.items():
        path = by_name[name]
        n, rank = slices(path), parts["lora_down.weight"].shape[0]
        if rank % n:
            raise ConfigError(f"{source}: {name} has rank {rank}, not a multiple of its {n} split_qkv slices")
        ranks[path] = rank // n
    return ranks


def save_kohya(state: dict[str, torch.Tensor], path: Any, metadata: dict[str, str] | None = None) -> Any:
    """Write a kohya-layout safetensors file (atomically, like every output); returns its Path."""
    from pathlib import Path

    from loratrain.core.safe_io import save_safetensors

    save_safetensors(state, path, metadata)
    return Path(path)
