"""What one module of a LoRA / LyCORIS file must hold before any maths is done with it.

Why a module of its own: every reader (`files.read_lora` for bake and the SD paths, `hooked_network.group_kohya` for
FLUX.1 / SD3 training and sampling, the text-encoder hooks) takes files users download, and a file that lies about
its shapes, lacks a part, mixes two kinds or carries NaN must be refused with its file and module named, not end in
a traceback, a NaN image or a quietly reshaped ΔW. The shapes are LyCORIS' (docs/lora-formats.md):
- LoRA: lora_down [r, in(, kh, kw)], lora_up [out, r(, 1, 1)];
- LoHa: hada_w?_a [out, r] @ hada_w?_b [r, in·k·k], both products the same shape; Tucker: hada_t? [r, r, kh, kw]
  with hada_w?_a [r, out], hada_w?_b [r, in];
- LoKr: W1 = lokr_w1 or lokr_w1_a @ lokr_w1_b, W2 = lokr_w2 or lokr_w2_a @ lokr_w2_b (Tucker: lokr_t2 with
  lokr_w2_a [r, out_k], lokr_w2_b [r, in_n]), each factor in exactly one form;
- alpha: one finite number.
Every message starts with `name`, which callers make "<file>: <module>".
"""
from __future__ import annotations

from collections.abc import Mapping

import torch

LORA = ("lora_down.weight", "lora_up.weight")
LOHA = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")
LOKR = ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2")


def kind_of(name: str, parts: Mapping[str, torch.Tensor]) -> str:
    """"lora", "loha" or "lokr" from a module's part names (any `hada_*` / `lokr_*` part, so a LoHa missing its
    hada_w1_a is still a LoHa and is told what it lacks); a module with both is refused."""
    loha, lokr = any(k.startswith("hada_") for k in parts), any(k.startswith("lokr_") for k in parts)
    if loha and lokr:
        raise ValueError(f"{name} mixes LoHa (hada_*) and LoKr (lokr_*) parts: one kind per module")
    if "dora_scale" in parts and (loha or lokr):
        raise ValueError(f"{name}: DoRA on a {'LoHa' if loha else 'LoKr'} module; FLUX.1 / SD3 take DoRA on LoRA only")
    return "loha" if loha else "lokr" if lokr else "dora" if "dora_scale" in parts else "lora"


def check_module(name: str, parts: Mapping[str, torch.Tensor]) -> str:
    """Check a LoRA / LoHa / LoKr module's parts; returns its kind."""
    kind = kind_of(name, parts)
    {"lora": check_lora, "dora": check_dora, "loha": check_loha, "lokr": check_lokr}[kind](name, parts)
    return kind


def check_values(name: str, parts: Mapping[str, torch.Tensor]) -> None:
    """Finite numbers only, and an alpha that is one number."""
    alpha = parts.get("alpha")
    if alpha is not None and alpha.numel() != 1:
        raise ValueError(f"{name}.alpha holds {alpha.numel()} values; alpha is one number")
    for key, t in parts.items():
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise ValueError(f"{name}.{key} holds NaN or infinite values (a damaged or diverged file)")


def _matrix(name: str, parts: Mapping[str, torch.Tensor], key: str) -> torch.Tensor:
    t = parts.get(key)
    if t is None:
        raise ValueError(f"{name} lacks {key}")
    if t.dim() != 2:
        raise ValueError(f"{name}.{key} is {list(t.shape)}; it is a matrix")
    return t


def _pair(name: str, parts: Mapping[str, torch.Tensor], a: str, b: str) -> tuple[int, int]:
    """The (out, in) of a @ b, after checking both are matrices whose rank sides agree."""
    ta, tb = _matrix(name, parts, a), _matrix(name, parts, b)
    if ta.shape[1] != tb.shape[0]:
        raise ValueError(f"{name}: {a} {list(ta.shape)} and {b} {list(tb.shape)} do not multiply (ranks "
                         f"{ta.shape[1]} and {tb.shape[0]})")
    return ta.shape[0], tb.shape[1]


def _tucker(name: str, parts: Mapping[str, torch.Tensor], t: str, a: str, b: str) -> None:
    core, ta, tb = parts[t], _matrix(name, parts, a), _matrix(name, parts, b)
    if core.dim() != 4 or ta.shape[0] != core.shape[0] or tb.shape[0] != core.shape[1]:
        raise ValueError(f"{name}: Tucker core {t} {list(core.shape)} does not fit {a} {list(ta.shape)} and {b} "
                         f"{list(tb.shape)}")


def check_lora(name: str, parts: Mapping[str, torch.Tensor]) -> None:
    down, up = parts.get(LORA[0]), parts.get(LORA[1])
    if down is None or up is None:
        raise ValueError(f"{name} lacks {LORA[1] if down is not None else LORA[0]}")
    mixed = sorted(k for k in parts if k in LOHA + LOKR)
    if mixed:
        raise ValueError(f"{name} mixes LoRA's lora_down / lora_up with LyCORIS' {mixed[0]}: one kind per module")
    if down.dim() < 2 or up.dim() < 2 or up.shape[1] != down.shape[0]:
        raise ValueError(f"{name}: lora_down {list(down.shape)} and lora_up {list(up.shape)} do not multiply")
    check_values(name, parts)


def check_dora(name: str, parts: Mapping[str, torch.Tensor]) -> None:
    """LoRA's parts plus a magnitude per output channel (LyCORIS' wd_on_out: dora_scale [out, 1])."""
    check_lora(name, parts)
    scale, up = parts["dora_scale"], parts["lora_up.weight"]
    if scale.numel() != up.shape[0]:
        raise ValueError(f"{name}.dora_scale has {scale.numel()} values for {up.shape[0]} output channels (only "
                         "per-output-channel DoRA, LyCORIS' wd_on_out, is read here)")


def check_loha(name: str, parts: Mapping[str, torch.Tensor]) -> None:
    if "hada_t1" in parts or "hada_t2" in parts:
        for i in (1, 2):
            if f"hada_t{i}" not in parts:
                raise ValueError(f"{name}: a Tucker LoHa needs both hada_t1 and hada_t2")
            _tucker(name, parts, f"hada_t{i}", f"hada_w{i}_a", f"hada_w{i}_b")
    else:
        w1, w2 = _pair(name, parts, "hada_w1_a", "hada_w1_b"), _pair(name, parts, "hada_w2_a", "hada_w2_b")
        if w1 != w2:
            raise ValueError(f"{name}: hada_w1 gives {list(w1)} but hada_w2 {list(w2)}; a LoHa multiplies them element-wise")
    check_values(name, parts)


def check_lokr(name: str, parts: Mapping[str, torch.Tensor]) -> None:
    for i in (1, 2):
        whole, low = f"lokr_w{i}" in parts, f"lokr_w{i}_a" in parts or f"lokr_w{i}_b" in parts
        if whole == low:
            raise ValueError(f"{name}: W{i} must be either lokr_w{i} or the pair lokr_w{i}_a / lokr_w{i}_b "
                             f"({'both are there' if whole else 'neither is there'})")
        if whole:
            w = parts[f"lokr_w{i}"]
            if w.dim() not in (2, 4) or (i == 1 and w.dim() != 2):
                raise ValueError(f"{name}.lokr_w{i} is {list(w.shape)}; it is a matrix")
        elif i == 2 and "lokr_t2" in parts:
            _tucker(name, parts, "lokr_t2", "lokr_w2_a", "lokr_w2_b")
        else:
            _pair(name, parts, f"lokr_w{i}_a", f"lokr_w{i}_b")
    check_values(name, parts)


def fits_weight(name: str, delta: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """ΔW as the weight's shape. Only the layouts files really use are reshaped: the same output channels, the rest
    flattened (LyCORIS stores a conv's hada_w?_b as [r, in·kh·kw]; a 1x1 conv's weight is [out, in, 1, 1]). A ΔW whose
    element count merely matches (a transposed or re-factored LoKr) is refused."""
    import math

    if tuple(delta.shape) == tuple(shape):
        return delta
    if delta.dim() == 0 or not shape or delta.shape[0] != shape[0] or delta.numel() != math.prod(shape):
        raise ValueError(f"{name}: ΔW {list(delta.shape)} does not fit the model weight {list(shape)}")
    return delta.reshape(shape)
