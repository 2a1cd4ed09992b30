"""LoHa, LoKr and DoRA adapters for the hook-based transformer networks (FLUX.1, SD3), in LyCORIS' tensor layout.

Why here and not PEFT: FLUX's and SD3's adapters hook onto our own BFL / single-file-layout Linears so the file's
names are `lora_unet_<path with _>` (what LyCORIS' kohya wrapper writes when sd-scripts trains these models, and what
ComfyUI maps); PEFT would name them by its own module tree. Each class here stands in for `FusedLoraModule`
(hooked_network.py): same interface (forward adds to the Linear's output, `delta_weight`, `kohya_tensors`,
`load_parts`), so the network, the hooks, block swapping and the file writer do not care which kind trains.

Formulas and shapes are LyCORIS' (docs/lora-formats.md, core/lora/kinds.py reads the same files):
- LoHa: ΔW = (w1_a @ w1_b) ⊙ (w2_a @ w2_b) · alpha / r; w?_a [out, r], w?_b [r, in]. Initialised as LyCORIS does
  (w1_b, w2_b ~ N(0, 1), w1_a ~ N(0, 0.1), w2_a = 0), so it starts as a no-op.
- LoKr: ΔW = kron(W1, W2) · scale, with out = out_l·out_k and in = in_m·in_n from `factorization` (factor -1: the
  most balanced split). W1 [out_l, in_m] is whole; W2 [out_k, in_n] is a low-rank pair (w2_a [out_k, r],
  w2_b [r, in_n]) when r < max(out_k, in_n) / 2, otherwise whole. scale = alpha / r with a low-rank factor; with both
  factors whole LyCORIS ignores alpha (scale 1, and the file's alpha is r). W2 (or w2_b) starts at zero.
  The forward never builds kron(W1, W2): y = W1 · X · W2ᵀ on x viewed as [in_m, in_n].
- DoRA (LoRA with dora_wd): see HookedDoraModule; its change depends on the layer's own weight, so its hook passes
  the layer.
"""
from __future__ import annotations

import math
from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import nn

from loratrain.core.errors import ConfigError
from loratrain.core.registry import Registry


def factorization(dimension: int, factor: int = -1) -> tuple[int, int]:
    """(m, n) with m * n = dimension and m <= n: with factor -1 the divisor pair closest to the square root; a positive
    factor that divides gives (factor, dimension / factor), otherwise m is the largest divisor at most `factor` on the
    way up to the square root (LyCORIS' rule, as its docs' table lists it)."""
    if factor > 0 and dimension % factor == 0:
        return tuple(sorted((factor, dimension // factor)))  # type: ignore[return-value]
    limit = dimension if factor < 0 else factor
    m = 1
    for d in range(2, math.isqrt(dimension) + 1):
        if d > limit:
            break
        if dimension % d == 0:
            m = d
    return m, dimension // m


def _checked(name: str, parts: Mapping[str, torch.Tensor], kind: str) -> None:
    """A file module's parts checked (module_checks.py) before any shape is read from them."""
    from .module_checks import check_module

    try:
        found = check_module(name, parts)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    if found != kind:
        raise ConfigError(f"{name} is a {found} module, not {kind}")


class _HookedAdapter(nn.Module):
    """What every hooked LyCORIS adapter shares: its Linear's sizes, alpha, the run's multiplier and the hook's add."""

    layer = nn.Linear
    kind = ""
    #: the tensor suffixes a file module of this kind holds (besides alpha); any of `markers` identifies the kind
    parts: tuple[str, ...] = ()
    markers: tuple[str, ...] = ()
    splits = None  # split_qkv is a LoRA argument (sd-scripts' lora_flux / lora_sd3); LyCORIS has no such layout

    def __init__(self, in_features: int, out_features: int, rank: int, alpha: float) -> None:
        super().__init__()
        self.in_features, self.out_features, self.rank, self.alpha = in_features, out_features, rank, float(alpha)
        self.multiplier = 1.0

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def _params(self) -> dict[str, nn.Parameter]:
        return {k: getattr(self, k) for k in self.parts if isinstance(getattr(self, k, None), nn.Parameter)}

    def kohya_tensors(self) -> dict[str, torch.Tensor]:
        return {**{k: p.detach() for k, p in self._params().items()},
                "alpha": torch.tensor(self.alpha, dtype=torch.float32)}

    @torch.no_grad()
    def load_parts(self, name: str, parts: Mapping[str, torch.Tensor]) -> None:
        """A file module's tensors (same kind, same shapes) and its alpha; scale 1 when the file has no alpha."""
        mine = self._params()
        have = set(parts) - {"alpha"}
        if have != set(mine):
            raise ConfigError(f"{name}: holds {sorted(have)}, this {self.kind} network {sorted(mine)} (a file made with "
                              "another network_dim, or for another model?)")
        for k, p in mine.items():
            if tuple(parts[k].shape) != tuple(p.shape):
                raise ConfigError(f"{name}.{k} is {list(parts[k].shape)}, this network's {list(p.shape)} (a file made "
                                  "with another network_dim, or for another model?)")
            p.copy_(parts[k].to(p.dtype))
        alpha = parts.get("alpha")
        self.alpha = float(alpha) if alpha is not None and float(alpha) != 0 else float(self.rank)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xd = x.to(self._dtype())
        return (self._adapt(xd) * (self.scale * self.multiplier)).to(x.dtype)

    def _dtype(self) -> torch.dtype:
        return next(iter(self._params().values())).dtype


class HookedLohaModule(_HookedAdapter):
    """LyCORIS' LoHa on one Linear: ΔW = (w1_a @ w1_b) ⊙ (w2_a @ w2_b) · alpha / r (effective rank up to r²)."""

    kind, parts, markers = "loha", ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"), ("hada_w1_a",)

    def __init__(self, in_features: int, out_features: int, rank: int, alpha: float) -> None:
        super().__init__(in_features, out_features, rank, alpha)
        self.hada_w1_a = nn.Parameter(torch.empty(out_features, rank).normal_(std=0.1))
        self.hada_w1_b = nn.Parameter(torch.empty(rank, in_features).normal_(std=1.0))
        self.hada_w2_a = nn.Parameter(torch.zeros(out_features, rank))
        self.hada_w2_b = nn.Parameter(torch.empty(rank, in_features).normal_(std=1.0))

    @classmethod
    def from_parts(cls, name: str, in_features: int, out_features: int, parts: Mapping[str, torch.Tensor]) -> HookedLohaModule:
        _checked(name, parts, "loha")
        if "hada_t1" in parts:
            raise ConfigError(f"{name}: a Tucker (use_tucker) LoHa; FLUX.1 / SD3 Linears take the plain one")
        return cls(in_features, out_features, parts["hada_w1_b"].shape[0], 1.0)

    def _weight(self) -> torch.Tensor:
        return (self.hada_w1_a @ self.hada_w1_b) * (self.hada_w2_a @ self.hada_w2_b)

    def _adapt(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self._weight())

    @torch.no_grad()
    def delta_weight(self) -> torch.Tensor:
        return self._weight().float() * self.scale


class HookedLokrModule(_HookedAdapter):
    """LyCORIS' LoKr on one Linear: ΔW = kron(W1, W2) · scale (see the module docstring for shapes and scale)."""

    kind, markers = "lokr", ("lokr_w1", "lokr_w1_a")
    parts = ("lokr_w1", "lokr_w2", "lokr_w2_a", "lokr_w2_b")

    def __init__(self, in_features: int, out_features: int, rank: int, alpha: float, low_rank: bool | None = None,
                 factors: tuple[tuple[int, int], tuple[int, int]] | None = None) -> None:
        super().__init__(in_features, out_features, rank, alpha)
        (out_l, out_k), (in_m, in_n) = factors or (factorization(out_features), factorization(in_features))
        self.out_l, self.out_k, self.in_m, self.in_n = out_l, out_k, in_m, in_n
        self.low_rank = rank < max(out_k, in_n) / 2 if low_rank is None else low_rank
        self.lokr_w1 = nn.Parameter(torch.empty(out_l, in_m))
        nn.init.kaiming_uniform_(self.lokr_w1, a=math.sqrt(5))
        if self.low_rank:
            self.lokr_w2_a = nn.Parameter(torch.empty(out_k, rank))
            nn.init.kaiming_uniform_(self.lokr_w2_a, a=math.sqrt(5))
            self.lokr_w2_b = nn.Parameter(torch.zeros(rank, in_n))
        else:
            self.lokr_w2 = nn.Parameter(torch.zeros(out_k, in_n))
            self.alpha = float(rank)  # both factors whole: LyCORIS ignores alpha (scale 1) and saves alpha = dim

    @classmethod
    def from_parts(cls, name: str, in_features: int, out_features: int, parts: Mapping[str, torch.Tensor]) -> HookedLokrModule:
        _checked(name, parts, "lokr")
        if "lokr_w1" not in parts or "lokr_t2" in parts:
            raise ConfigError(f"{name}: a LoKr with a low-rank W1 (decompose_both) or Tucker W2; FLUX.1 / SD3 "
                              "Linears take LyCORIS' default LoKr (whole W1)")
        w1 = parts["lokr_w1"]
        low = "lokr_w2" not in parts
        w2 = (parts["lokr_w2_a"].shape[0], parts["lokr_w2_b"].shape[1]) if low else tuple(parts["lokr_w2"].shape)
        if w1.shape[0] * w2[0] != out_features or w1.shape[1] * w2[1] != in_features:
            raise ConfigError(f"{name}: kron({list(w1.shape)}, {list(w2)}) is not this model's {out_features}x"
                              f"{in_features} Linear")
        rank = parts["lokr_w2_b"].shape[0] if low else 1
        return cls(in_features, out_features, rank, 1.0, low, ((w1.shape[0], w2[0]), (w1.shape[1], w2[1])))

    @property
    def scale(self) -> float:
        return self.alpha / self.rank if self.low_rank else 1.0

    def _w2(self) -> torch.Tensor:
        return self.lokr_w2_a @ self.lokr_w2_b if self.low_rank else self.lokr_w2

    def _adapt(self, x: torch.Tensor) -> torch.Tensor:
        # kron(W1, W2) x = W1 · X · W2ᵀ with X = x viewed as [in_m, in_n] (row-major, as kron indexes it)
        lead = x.shape[:-1]
        y = self.lokr_w1 @ x.reshape(*lead, self.in_m, self.in_n) @ self._w2().transpose(0, 1)
        return y.reshape(*lead, self.out_features)

    @torch.no_grad()
    def delta_weight(self) -> torch.Tensor:
        return torch.kron(self.lokr_w1.float(), self._w2().float()) * self.scale


class HookedDoraModule(_HookedAdapter):
    """LyCORIS' DoRA (LoRA with `dora_wd`) on one Linear: W' = m ⊙ (W + ΔW) / ‖W + ΔW‖, the norm per output row
    (`wd_on_out`, what PEFT and our SD DoRA learn), ΔW = alpha / r · up @ down; the hook adds x (W' - W)ᵀ, the same
    change core/lora/kinds.DoraModule bakes. The magnitude `dora_scale` [out, 1] starts as ‖W‖ per row, taken from the
    layer when the network is first hooked on (the network is built from shapes alone); a loaded file's is kept.
    Needs the layer's own weight at every forward, so it is refused with fp8-stored weights (as our SD DoRA is)."""

    kind, markers, needs_layer = "dora", ("dora_scale",), True
    parts = ("lora_down.weight", "lora_up.weight", "dora_scale")

    def __init__(self, in_features: int, out_features: int, rank: int, alpha: float) -> None:
        super().__init__(in_features, out_features, rank, alpha)
        self.down = nn.Parameter(torch.empty(rank, in_features))
        nn.init.kaiming_uniform_(self.down, a=math.sqrt(5))
        self.up = nn.Parameter(torch.zeros(out_features, rank))
        self.dora_scale = nn.Parameter(torch.full((out_features, 1), float("nan")))  # set from W on first hook-up

    @classmethod
    def from_parts(cls, name: str, in_features: int, out_features: int, parts: Mapping[str, torch.Tensor]) -> HookedDoraModule:
        _checked(name, parts, "dora")
        return cls(in_features, out_features, parts["lora_down.weight"].shape[0], 1.0)

    def _params(self) -> dict[str, nn.Parameter]:
        return {"lora_down.weight": self.down, "lora_up.weight": self.up, "dora_scale": self.dora_scale}

    @torch.no_grad()
    def load_parts(self, name: str, parts: Mapping[str, torch.Tensor]) -> None:
        scale = parts.get("dora_scale")
        if scale is not None and scale.numel() == self.out_features and tuple(scale.shape) != (self.out_features, 1):
            parts = {**parts, "dora_scale": scale.reshape(self.out_features, 1)}  # [out] as some writers store it
        super().load_parts(name, parts)

    @torch.no_grad()
    def start_from(self, weight: torch.Tensor) -> None:
        """dora_scale = ‖W‖ per output row, unless it holds values already (a resumed or loaded network)."""
        if bool(torch.isnan(self.dora_scale).any()):
            self.dora_scale.copy_(weight.detach().float().norm(dim=1, keepdim=True).to(self.dora_scale))

    def _change(self, weight: torch.Tensor) -> torch.Tensor:
        w = weight.detach().to(self.down.dtype)
        merged = w + (self.up @ self.down) * self.scale
        return merged * (self.dora_scale / merged.norm(dim=1, keepdim=True).clamp(min=1e-12)) - w

    def forward(self, x: torch.Tensor, layer: nn.Module | None = None) -> torch.Tensor:  # type: ignore[override]
        if layer is None:
            raise ConfigError("a DoRA module needs its layer's weight (hooked with apply_to)")
        return (F.linear(x.to(self.down.dtype), self._change(layer.weight)) * self.multiplier).to(x.dtype)

    @torch.no_grad()
    def delta_weight(self, weight: torch.Tensor | None = None) -> torch.Tensor:  # type: ignore[override]
        if weight is None:
            raise ConfigError("a DoRA module's change depends on the weight it is applied to")
        return self._change(weight).float()


#: the hooked adapter kinds besides plain LoRA (hooked_network.FusedLoraModule), by the trainer's network kind name
HOOKED_KINDS: Registry[type[_HookedAdapter]] = Registry("FLUX.1 / SD3 adapter kind")
HOOKED_KINDS.register("loha")(HookedLohaModule)
HOOKED_KINDS.register("lokr")(HookedLokrModule)
HOOKED_KINDS.register("dora")(HookedDoraModule)


def kind_of_parts(parts: Mapping[str, torch.Tensor]) -> str:
    """"lora" or the LyCORIS kind a file module's tensors (by suffix) are (module_checks.kind_of)."""
    from .module_checks import kind_of

    try:
        return kind_of("module", parts)
    except ValueError as e:
        raise ConfigError(str(e)) from None
