"""FLUX.1 base weights stored in float8 (`--fp8_base`) and "scaled fp8" checkpoint files.

Why: FLUX.1's transformer is 11.9 B parameters, 23.8 GB in bf16; stored in float8_e4m3fn it is half that, which with
block swapping is what lets a LoRA train on an 8-12 GB card. The frozen weight stays in fp8 and each Linear casts it
up to the compute dtype only for its own matmul (the cast copy lives for one layer), and the LoRA adds its bf16/fp32
output on top (its forward hook sees the same input), so the adapters train at full precision.

Scale: e4m3 covers +-448 with 3 mantissa bits, and tiny weights fall into its subnormals. Each weight is stored as
`weight / scale` with one float32 `scale_weight` per tensor (absmax / 448), and used as `fp8 * scale`: the same
per-tensor scheme ComfyUI's and sd-scripts' "scaled fp8" files use (`<layer>.scale_weight` beside an fp8
`<layer>.weight`, an optional `<layer>.scale_input` for fp8 matmuls, and a `scaled_fp8` marker tensor). A weight that
is already exactly an fp8 value (an unscaled fp8 file) keeps scale 1, and a scaled file's own scales are reused, so
loading either file with --fp8_base gives back exactly its stored fp8 values.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

FP8 = torch.float8_e4m3fn
FP8_MAX = float(torch.finfo(FP8).max)  # 448
SCALE_WEIGHT, SCALE_INPUT, SCALED_MARKER = ".scale_weight", ".scale_input", "scaled_fp8"
#: the FLUX.1 modules whose Linears go to fp8: the blocks hold 99.7 % of the weights; the embedders and the last
#: layer are small and sit at the model's ends, where fp8's error matters most
FP8_PARTS = ("double_blocks.", "single_blocks.")


def split_scaled(sd: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """A scaled-fp8 state dict as (tensors without the scale keys, {layer path: float32 scale}); the marker and
    input scales (used only by fp8-matmul inference) are dropped. A plain state dict comes back unchanged, no scales."""
    scales = {k[: -len(SCALE_WEIGHT)]: v.float().reshape(()) if v.numel() == 1 else v.float()
              for k, v in sd.items() if k.endswith(SCALE_WEIGHT)}
    if not scales and SCALED_MARKER not in sd:
        return sd, {}
    rest = {k: v for k, v in sd.items() if not k.endswith((SCALE_WEIGHT, SCALE_INPUT)) and k != SCALED_MARKER}
    return rest, scales


def dequantize(sd: dict[str, torch.Tensor], scales: dict[str, torch.Tensor], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """`<layer>.weight` = stored fp8 x its scale, computed in float32 then cast to `dtype` (one tensor at a time)."""
    for path, scale in scales.items():
        key = path + ".weight"
        if key in sd:
            w = sd[key].float()
            sd[key] = (w * (scale if scale.ndim == 0 else scale.reshape(-1, *([1] * (w.ndim - 1))))).to(dtype)
    return sd


def _per_tensor_scale(w: torch.Tensor) -> torch.Tensor:
    """1 when `w` is already exactly representable in fp8 (an fp8 file), else absmax / 448 (a float32 scalar)."""
    if torch.equal(w.to(FP8).to(w.dtype), w):
        return torch.ones((), dtype=torch.float32, device=w.device)
    amax = w.detach().abs().max().float()
    return (amax / FP8_MAX).clamp(min=torch.finfo(torch.float32).tiny)


class Fp8Linear(nn.Linear):
    """A frozen Linear whose weight is stored in float8_e4m3fn (times a per-tensor float32 `scale_weight`) and cast up
    to `compute_dtype` for each matmul. A subclass of nn.Linear, so LoRA hooks and `isinstance` checks still fit."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, compute_dtype: torch.dtype = torch.bfloat16,
                 device: torch.device | str | None = None) -> None:
        super().__init__(in_features, out_features, bias=bias, device="meta")
        self.compute_dtype = compute_dtype
        self.weight = nn.Parameter(torch.empty(out_features, in_features, dtype=FP8, device=device), requires_grad=False)
        if bias:
            self.bias = nn.Parameter(torch.empty(out_features, dtype=compute_dtype, device=device), requires_grad=False)
        self.register_buffer("scale_weight", torch.ones((), dtype=torch.float32, device=device))

    @classmethod
    @torch.no_grad()
    def from_linear(cls, lin: nn.Linear, compute_dtype: torch.dtype, scale: torch.Tensor | None = None) -> Fp8Linear:
        """The fp8 copy of `lin` (its weight freed with it); `scale` = a file's own scale, else chosen here."""
        w = lin.weight.detach()
        new = cls(lin.in_features, lin.out_features, lin.bias is not None, compute_dtype, w.device)
        s = scale.to(w.device, torch.float32) if scale is not None else _per_tensor_scale(w)
        s = s.reshape(-1, 1) if s.numel() > 1 else s.reshape(())  # a per-row scale (out,) broadcasts over columns
        new.scale_weight = s.clone()
        new.weight.data = w.to(FP8) if s.numel() == 1 and s.item() == 1.0 else (w.float() / s).clamp(-FP8_MAX, FP8_MAX).to(FP8)
        if lin.bias is not None:
            new.bias.data = lin.bias.detach().to(compute_dtype)
        return new

    def dequantized(self) -> torch.Tensor:
        return self.weight.to(self.compute_dtype) * self.scale_weight.to(self.compute_dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = self.bias.to(self.compute_dtype) if self.bias is not None else None
        return F.linear(x.to(self.compute_dtype), self.dequantized(), bias)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, stored=float8_e4m3fn, compute={self.compute_dtype}"


def store_in_fp8(model: nn.Module, compute_dtype: torch.dtype, scales: dict[str, torch.Tensor] | None = None,
                 parts: tuple[str, ...] = FP8_PARTS) -> int:
    """Replace every nn.Linear under `parts` (FLUX.1's blocks) by an Fp8Linear, in place; returns how many. Must run
    before LoRA hooks are attached (they hook the Linear objects). `scales`: a scaled file's, by layer path."""
    scales = scales or {}
    n = 0
    for path, module in list(model.named_modules()):
        if not isinstance(module, nn.Linear) or isinstance(module, Fp8Linear) or not path.startswith(parts):
            continue
        parent_path, _, name = path.rpartition(".")
        parent = model.get_submodule(parent_path) if parent_path else model
        setattr(parent, name, Fp8Linear.from_linear(module, compute_dtype, scales.get(path)))
        n += 1
    return n


def parameter_bytes(module: nn.Module) -> int:
    """Bytes held by a module's parameters and buffers (what its stored weights cost, whatever the device)."""
    return sum(t.numel() * t.element_size() for t in (*module.parameters(), *module.buffers()))
