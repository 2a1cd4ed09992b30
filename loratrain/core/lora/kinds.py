"""The weight change each LyCORIS module kind stores, from the published formulas (docs/lora-formats.md#module-kinds).

A registry keyed by kind: each entry recognises its tensor suffixes and turns them into a module whose
`delta(shape, base)` is the dense change of the target weight. LoRA/LoCon live in `files.py`; this file holds
LoHa, LoKr, (IA)^3, full `diff` and the DoRA wrapper any of them can carry (`dora_scale`). Kinds whose change
depends on the weight itself ((IA)^3, DoRA) need `base`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch

from loratrain.core.registry import Registry


def _fit(name: str, d: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    from .module_checks import fits_weight

    return fits_weight(name, d, shape)


def _tucker(t: torch.Tensor, wa: torch.Tensor, wb: torch.Tensor) -> torch.Tensor:
    """LyCORIS' CP/Tucker rebuild: core t [r, r, kh, kw] with wa [r, out] and wb [r, in] -> [out, in, kh, kw]."""
    return torch.einsum("i j k l, j r, i p -> p r k l", t.float(), wb.float(), wa.float())


@dataclass
class TensorModule:
    """One module of a LyCORIS file: its tensors by suffix and its alpha; a kind subclass turns them into dW."""

    name: str
    tensors: dict[str, torch.Tensor]
    alpha: float = 1.0
    kind: ClassVar[str] = ""
    markers: ClassVar[tuple[str, ...]] = ()  # a module holding any of these suffixes is of this kind
    needs_base: ClassVar[bool] = False  # its change depends on the model's own weight

    def delta(self, shape: tuple[int, ...], base: torch.Tensor | None = None) -> torch.Tensor:
        raise NotImplementedError


MODULE_KINDS: Registry[type[TensorModule]] = Registry("LyCORIS module kind")


@MODULE_KINDS.register("loha")
class LohaModule(TensorModule):
    """dW = (w1_a @ w1_b) * (w2_a @ w2_b) * alpha / r (Hadamard product; effective rank up to r^2)."""

    kind, markers = "loha", ("hada_w1_a",)

    @property
    def rank(self) -> int:
        return self.tensors["hada_w1_b"].shape[0]

    def delta(self, shape: tuple[int, ...], base: torch.Tensor | None = None) -> torch.Tensor:
        t = self.tensors
        if "hada_t1" in t:
            w1, w2 = _tucker(t["hada_t1"], t["hada_w1_a"], t["hada_w1_b"]), _tucker(t["hada_t2"], t["hada_w2_a"], t["hada_w2_b"])
        else:
            w1 = t["hada_w1_a"].float() @ t["hada_w1_b"].float()
            w2 = t["hada_w2_a"].float() @ t["hada_w2_b"].float()
        return _fit(self.name, w1 * w2 * (self.alpha / self.rank), shape)


@MODULE_KINDS.register("lokr")
class LokrModule(TensorModule):
    """dW = kron(W1, W2), each factor stored whole or as a low-rank pair; alpha / r applies only when a factor
    is low-rank (LyCORIS ignores alpha for a "full matrix" LoKr)."""

    kind, markers = "lokr", ("lokr_w1", "lokr_w1_a")

    def _factor(self, i: int) -> torch.Tensor:
        t = self.tensors
        if f"lokr_w{i}" in t:
            return t[f"lokr_w{i}"].float()
        if f"lokr_t{i}" in t:
            return _tucker(t[f"lokr_t{i}"], t[f"lokr_w{i}_a"], t[f"lokr_w{i}_b"])
        return t[f"lokr_w{i}_a"].float() @ t[f"lokr_w{i}_b"].float()

    @property
    def scale(self) -> float:
        t = self.tensors
        low = [k for k in ("lokr_w2_b", "lokr_w1_b") if k in t]
        return self.alpha / t[low[0]].shape[0] if low else 1.0

    def delta(self, shape: tuple[int, ...], base: torch.Tensor | None = None) -> torch.Tensor:
        w1, w2 = self._factor(1), self._factor(2)
        if len(shape) == 4 and w2.dim() == 2 and math.prod(shape[2:]) > 1:
            w2 = w2.reshape(w2.shape[0], -1, *shape[2:])
        if w2.dim() == 4:
            w1 = w1.reshape(*w1.shape, 1, 1)
        return _fit(self.name, torch.kron(w1, w2) * self.scale, shape)


@MODULE_KINDS.register("ia3")
class Ia3Module(TensorModule):
    """(IA)^3: a learned per-channel scale of the weight, so dW = W * w along the output channels (or the
    input channels when `on_input`)."""

    kind, markers, needs_base = "ia3", ("on_input",), True

    def delta(self, shape: tuple[int, ...], base: torch.Tensor | None = None) -> torch.Tensor:
        if base is None:
            raise ValueError(f"{self.name}: an (IA)^3 module scales the model's own weight; bake it into a checkpoint")
        w = self.tensors["weight"].float().flatten()
        view = [1] * len(shape)
        view[1 if bool(self.tensors["on_input"].item()) else 0] = -1
        return base.float().reshape(shape) * w.reshape(view)


@MODULE_KINDS.register("full")
class FullModule(TensorModule):
    """LyCORIS "full": the whole dW (and bias change, which merging ignores) stored as `diff`."""

    kind, markers = "full", ("diff",)

    def delta(self, shape: tuple[int, ...], base: torch.Tensor | None = None) -> torch.Tensor:
        return _fit(self.name, self.tensors["diff"].float(), shape)


def oft_constrained(blocks: torch.Tensor, constraint: float) -> torch.Tensor:
    """The blocks scaled so that the norm of Q = B - B^T (over all blocks of the module) is at most `constraint`:
    Q is linear in B, so scaling B scales Q. A file holding these already-constrained blocks has the same effect in
    every reader whose constraint is at least that norm, whatever its `alpha` means (see docs/compatibility.md)."""
    b = blocks.float()
    norm = (b - b.transpose(1, 2)).flatten().norm()
    return b * ((norm.clamp(max=constraint) + 1e-8) / (norm + 1e-8))


def oft_rotation(blocks: torch.Tensor, constraint: float) -> torch.Tensor:
    """OFT's block rotations (sd-scripts networks.oft, LyCORIS diag-oft): Q = B - B^T (skew-symmetric), its norm
    capped at `constraint`, then the Cayley transform R = (I + Q)(I - Q)^-1, one orthogonal matrix per block."""
    b = oft_constrained(blocks, constraint)
    q = b - b.transpose(1, 2)
    eye = torch.eye(b.shape[-1], device=b.device).expand_as(q)
    return (eye + q) @ torch.linalg.inv(eye - q)


def oft_rotate_rows(w: torch.Tensor, rotation: torch.Tensor) -> torch.Tensor:
    """W' = R^T W block by block along the output channels: what OFT's module applies to the weight."""
    k, n, _ = rotation.shape
    rows = w.float().reshape(k, n, -1)
    return torch.einsum("knm,knp->kmp", rotation, rows).reshape(w.shape)


@MODULE_KINDS.register("oft")
class OftModule(TensorModule):
    """OFT: `oft_blocks` [blocks, n, n] and `alpha`, under sd-scripts' names (`oft_unet_*`) or LyCORIS' (`lora_unet_*`,
    diag-oft). Both trainers mean `alpha` as the constraint per output channel (the norm cap is alpha * out_dim), and so
    does A1111; ComfyUI reads it as the absolute cap. Files our trainer writes in the `lora_unet_*` layout hold blocks
    already inside the cap with alpha = the absolute cap, so both readings agree on them.
    W' = R^T W with R from oft_rotation, so dW = W' - W; at weight w, (w (R - I) + I)^T W - W = w * dW."""

    kind, markers, needs_base = "oft", ("oft_blocks",), True

    def delta(self, shape: tuple[int, ...], base: torch.Tensor | None = None) -> torch.Tensor:
        if base is None:
            raise ValueError(f"{self.name}: an OFT module rotates the model's own weight; bake it into a checkpoint")
        w = base.float().reshape(shape)
        blocks = self.tensors["oft_blocks"]
        if shape[0] != blocks.shape[0] * blocks.shape[1]:
            raise ValueError(f"{self.name}: OFT blocks {list(blocks.shape)} do not fit the weight {list(shape)}")
        return oft_rotate_rows(w, oft_rotation(blocks, self.alpha * shape[0])) - w


@dataclass
class DoraModule:
    """Weight-decomposed: W' = m * (W + dW) / ||W + dW||, the norm per output channel (`wd_on_out`, the
    default: dora_scale [out, 1, ...]) or per input channel (dora_scale [1, in, ...]); the change is W' - W."""

    inner: object
    scale: torch.Tensor
    needs_base: bool = True

    @property
    def name(self) -> str:
        return self.inner.name  # type: ignore[attr-defined]

    @property
    def kind(self) -> str:
        return "dora+" + self.inner.kind  # type: ignore[attr-defined]

    def delta(self, shape: tuple[int, ...], base: torch.Tensor | None = None) -> torch.Tensor:
        if base is None:
            raise ValueError(f"{self.name}: a DoRA module rescales the model's own weight; bake it into a checkpoint")
        w = base.float().reshape(shape)
        merged = w + self.inner.delta(shape, w)  # type: ignore[attr-defined]
        m = self.scale.float().flatten()
        if m.numel() == shape[0] and self.scale.shape[0] == shape[0]:  # per output channel (wd_on_out)
            norm = merged.reshape(shape[0], -1).norm(dim=1)
            factor = (m / norm.clamp(min=1e-12)).reshape(-1, *([1] * (len(shape) - 1)))
        else:  # per input channel
            norm = merged.transpose(0, 1).reshape(shape[1], -1).norm(dim=1)
            factor = (m / norm.clamp(min=1e-12)).reshape(1, -1, *([1] * (len(shape) - 2)))
        return merged * factor - w


def lycoris_module(name: str, parts: dict[str, torch.Tensor]) -> object | None:
    """The module these tensors describe, or None when they are not a LyCORIS kind (plain LoRA is read elsewhere).
    LoHa and LoKr parts are checked first (module_checks.py): a file that lacks a part or lies about a shape is a
    ValueError naming the module, never a traceback or a quietly wrong ΔW."""
    from .module_checks import check_loha, check_lokr, check_values, kind_of

    kind = kind_of(name, parts)
    if kind == "loha":
        check_loha(name, parts)
    elif kind == "lokr":
        check_lokr(name, parts)
    else:
        check_values(name, parts)
    cls = next((MODULE_KINDS.get(k) for k in MODULE_KINDS.names() if any(m in parts for m in MODULE_KINDS.get(k).markers)), None)
    if cls is None:
        return None
    tensors = {k: v for k, v in parts.items() if k not in ("alpha", "dora_scale")}
    rank_key = next((k for k in ("hada_w1_b", "lokr_w2_b", "lokr_w1_b") if k in tensors), None)
    rank = float(tensors[rank_key].shape[0]) if rank_key else 1.0
    alpha_t = parts.get("alpha")
    alpha = float(alpha_t) if alpha_t is not None and float(alpha_t) != 0 else rank  # 0 or absent: scale 1
    if cls.kind == "oft":  # OFT's alpha is its constraint, kept as it is
        alpha = float(alpha_t) if alpha_t is not None else 1e-3
    module = cls(name, tensors, alpha)
    return DoraModule(module, parts["dora_scale"]) if "dora_scale" in parts else module
