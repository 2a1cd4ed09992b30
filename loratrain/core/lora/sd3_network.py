"""LoRA on the SD3/SD3.5 MMDiT in sd-scripts' `networks/lora_sd3.py` file layout.

Why a plain module and not PEFT: the same reasons as FLUX's (flux_network.py): sd-scripts' `split_qkv` trains one
LoRA per q / k / v slice of a fused Linear and saves them as one block-diagonal LoRA, and the model's own state dict
and key names must stay the single file's. Each adapter's output is added to its layer's output by a forward hook.

File layout (what sd-scripts writes, key for key and shape for shape): module `lora_unet_<single-file path with _>`,
`lora_down.weight` [rank, in], `lora_up.weight` [out, rank], `alpha` a float32 scalar; y = Wx + alpha/rank * up(down(x)).
Default targets: every Linear inside each joint block's two halves (sd-scripts targets the `SingleDiTBlock` class):
`adaLN_modulation.1`, `attn.qkv`, `attn.proj`, `mlp.fc1`, `mlp.fc2`, and on SD3.5 medium's MMDiT-X blocks `attn2.qkv`,
`attn2.proj`; the last block's pre-only context half has only `adaLN_modulation.1` and `attn.qkv`. The q/k norms are
not Linears and are never targets. network_args, with sd-scripts' names and meanings:
  * context_attn_dim, context_mlp_dim, context_mod_dim, x_attn_dim, x_mlp_dim, x_mod_dim: the rank of that kind of
    module (0 leaves it out); `x_attn_dim` covers attn2 too, as sd-scripts' name match does.
  * emb_dims [context_embedder, t_embedder, x_embedder, y_embedder, final_mod, final_linear]: ranks for the
    embedders and final layer (0 leaves one out). The x_embedder is the patchifying Conv2d: its `lora_down` is a
    conv with the same p x p kernel and stride [rank, in, p, p], `lora_up` a 1x1 conv [out, rank, 1, 1]; with
    conv_dim / conv_alpha set, sd-scripts gives it conv_dim and conv_alpha instead (kept).
  * train_block_indices "all" / "none" / "0-5,10": joint blocks outside the selection get no LoRA. sd-scripts checks
    indices against 999; we refuse one the model does not have rather than silently training nothing there.
  * split_qkv: one adapter per q/k/v slice of every `attn.qkv` / `attn2.qkv`; the file entry has rank 3r with the
    three ups on the block diagonal. As for FLUX, sd-scripts saves the per-slice alpha there so every reader applies
    1/3 of what was trained; we write alpha * 3 so alpha / file rank is the trained scale everywhere.
Dropouts (neuron, rank, module) are training-time regularisers of sd-scripts' module, not part of the file; they
are not implemented here.
"""
from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from loratrain.core.errors import ConfigError
from loratrain.core.models.sd3 import SD3Config

from .hooked_network import (  # noqa: F401  (PREFIX, kohya_name: public here too)
    PREFIX,
    FusedLoraModule,
    HookedLoraNetwork,
    file_kind,
    group_kohya,
    kohya_name,
    kohya_ranks,
    kohya_state_dict,
    load_kohya_state_dict,
    make_adapter,
    save_kohya,
)

#: type_dims order (sd-scripts'): (network_arg, half, kind); kind is matched against the module path like theirs
TYPE_DIMS = (("context_attn_dim", "context_block", "attn"), ("context_mlp_dim", "context_block", "mlp"),
             ("context_mod_dim", "context_block", "adaLN_modulation"), ("x_attn_dim", "x_block", "attn"),
             ("x_mlp_dim", "x_block", "mlp"), ("x_mod_dim", "x_block", "adaLN_modulation"))
#: emb_dims order (sd-scripts'): context, t, x, y, final_mod, final_linear
EMB_GROUPS = (("context_embedder",), ("t_embedder.mlp.0", "t_embedder.mlp.2"), ("x_embedder.proj",),
              ("y_embedder.mlp.0", "y_embedder.mlp.2"), ("final_layer.adaLN_modulation.1",), ("final_layer.linear",))
CONV = "x_embedder.proj"


def half_linears(cfg: SD3Config, index: int) -> dict[str, tuple[int, int]]:
    """(in, out) of each Linear in joint block `index`'s two halves, by path relative to the block."""
    h, m = cfg.hidden_size, cfg.mlp_hidden
    out: dict[str, tuple[int, int]] = {}
    for half in ("context_block", "x_block"):
        pre_only = half == "context_block" and index == cfg.num_layers - 1
        dual = half == "x_block" and index in cfg.dual_attention_layers
        out[f"{half}.adaLN_modulation.1"] = (h, (2 if pre_only else 9 if dual else 6) * h)
        out[f"{half}.attn.qkv"] = (h, 3 * h)
        if not pre_only:
            out.update({f"{half}.attn.proj": (h, h), f"{half}.mlp.fc1": (h, m), f"{half}.mlp.fc2": (m, h)})
        if dual:
            out.update({f"{half}.attn2.qkv": (h, 3 * h), f"{half}.attn2.proj": (h, h)})
    return out


def linear_shapes(cfg: SD3Config) -> dict[str, tuple[int, int]]:
    """(in, out) of every layer an SD3 LoRA may target, by single-file path, from the config alone. The x_embedder
    conv is listed by its channels (in, out); its kernel is the patch size."""
    h, p = cfg.hidden_size, cfg.patch_size
    out = {"context_embedder": (cfg.joint_attention_dim, h), "t_embedder.mlp.0": (256, h), "t_embedder.mlp.2": (h, h),
           CONV: (cfg.in_channels, h), "y_embedder.mlp.0": (cfg.pooled_projection_dim, h), "y_embedder.mlp.2": (h, h),
           "final_layer.adaLN_modulation.1": (h, 2 * h), "final_layer.linear": (h, p * p * cfg.out_channels)}
    for i in range(cfg.num_layers):
        out.update({f"joint_blocks.{i}.{k}": v for k, v in half_linears(cfg, i).items()})
    return out


def split_sizes(path: str, cfg: SD3Config) -> tuple[int, ...] | None:
    """The output slices split_qkv trains separately: q/k/v of every fused attention projection."""
    return (cfg.hidden_size,) * 3 if path.endswith(("attn.qkv", "attn2.qkv")) else None


def parse_block_selection(selection: str, depth: int) -> set[int]:
    """sd-scripts' train_block_indices: "all", "none" or "", or comma-separated indices and inclusive ranges."""
    text = str(selection).strip()
    if text == "all":
        return set(range(depth))
    if text in ("none", ""):
        return set()
    chosen: set[int] = set()
    for part in text.split(","):
        try:
            lo, _, hi = part.partition("-")
            start, end = int(lo), int(hi) if hi.strip() else int(lo)
        except ValueError:
            raise ConfigError(f"network_args train_block_indices={selection!r}: use all, none or e.g. 0-5,10") from None
        if not 0 <= start <= end < depth:
            raise ConfigError(f"network_args train_block_indices={selection!r}: {part.strip()} is outside this model's "
                              f"joint blocks 0-{depth - 1}")
        chosen.update(range(start, end + 1))
    return chosen


def sd3_lora_targets(cfg: SD3Config, rank: int = 4, alpha: float = 1.0, type_dims: dict[str, int] | None = None,
                     emb_dims: list[int] | None = None, train_block_indices: str | None = None,
                     conv_dim: int | None = None, conv_alpha: float | None = None) -> dict[str, tuple[int, float]]:
    """Single-file path -> (rank, alpha) of the modules sd-scripts' lora_sd3 trains with these network_args."""
    type_dims = dict(type_dims or {})
    unknown = sorted(set(type_dims) - {t[0] for t in TYPE_DIMS})
    if unknown:
        raise ConfigError(f"network_args {unknown[0]}: not one of lora_sd3's {', '.join(t[0] for t in TYPE_DIMS)}")
    blocks = None if train_block_indices is None else parse_block_selection(train_block_indices, cfg.num_layers)
    out: dict[str, tuple[int, float]] = {}
    for i in range(cfg.num_layers):
        for path in half_linears(cfg, i):
            r = rank
            for arg, half, kind in TYPE_DIMS:  # first matching kind with a value wins, as in sd-scripts
                if type_dims.get(arg) is not None and path.startswith(half) and kind in path:
                    r = int(type_dims[arg])
                    break
            if r and (blocks is None or i in blocks):
                out[f"joint_blocks.{i}.{path}"] = (r, alpha)
    if emb_dims is not None:
        if len(emb_dims) != 6:
            raise ConfigError(f"network_args emb_dims={emb_dims}: give 6 ranks (context, t, x, y, final_mod, final_linear)")
        for group, r in zip(EMB_GROUPS, emb_dims):
            for path in group:
                if path == CONV and conv_dim is not None:  # sd-scripts: conv_dim/conv_alpha win for the one conv
                    r_conv, a_conv = int(conv_dim), 1.0 if conv_alpha is None else float(conv_alpha)
                    if r_conv:
                        out[path] = (r_conv, a_conv)
                elif r:
                    out[path] = (int(r), alpha)
    return out


class SD3ConvLoraModule(nn.Module):
    """LoRA on the patchifying Conv2d: a p x p strided conv down to rank channels, then a 1x1 conv up."""

    layer = nn.Conv2d

    def __init__(self, in_channels: int, out_channels: int, kernel: int, rank: int, alpha: float) -> None:
        super().__init__()
        self.in_features, self.out_features, self.kernel = in_channels, out_channels, kernel
        self.rank, self.alpha, self.multiplier = rank, float(alpha), 1.0
        self.down = nn.Parameter(torch.empty(rank, in_channels, kernel, kernel))
        self.up = nn.Parameter(torch.zeros(out_channels, rank, 1, 1))
        nn.init.kaiming_uniform_(self.down, a=math.sqrt(5))  # sd-scripts' init: zero up, so a no-op at the start

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.conv2d(F.conv2d(x.to(self.down.dtype), self.down, stride=self.kernel), self.up)
        return (y * (self.scale * self.multiplier)).to(x.dtype)

    @torch.no_grad()
    def delta_weight(self) -> torch.Tensor:
        """The dense ΔW [out, in, p, p] added to the conv's weight (multiplier 1), float32."""
        return torch.einsum("or,rikl->oikl", self.up[:, :, 0, 0].float(), self.down.float()) * self.scale

    def kohya_tensors(self) -> dict[str, torch.Tensor]:
        return {"lora_down.weight": self.down.detach(), "lora_up.weight": self.up.detach(),
                "alpha": torch.tensor(self.alpha, dtype=torch.float32)}

    @torch.no_grad()
    def load_kohya(self, name: str, down: torch.Tensor, up: torch.Tensor, alpha: float) -> None:
        if tuple(down.shape) != tuple(self.down.shape) or tuple(up.shape) != tuple(self.up.shape):
            raise ConfigError(f"{name}: lora_down {list(down.shape)} / lora_up {list(up.shape)} do not fit this model "
                              f"(want {list(self.down.shape)} / {list(self.up.shape)})")
        self.down.copy_(down), self.up.copy_(up)
        self.alpha = float(alpha)


class SD3LoraNetwork(HookedLoraNetwork):
    """One adapter per target, keyed by its kohya name; `apply_to(model)` hooks them onto the model's layers."""

    label = "SD3"

    def __init__(self, cfg: SD3Config, targets: dict[str, tuple[int, float]], split_qkv: bool = False,
                 kind: str = "lora", file_parts: dict[str, dict[str, torch.Tensor]] | None = None,
                 source: str = "") -> None:
        def make(path: str, shape: tuple[int, int], target: tuple[int, float]) -> nn.Module:
            r, a = target
            label = f"{source}: {kohya_name(path)}" if source else kohya_name(path)
            if path == CONV:
                if kind != "lora":
                    raise ConfigError(f"{label}: a {kind} module on x_embedder (the patchifying conv); LoHa / LoKr "
                                      "train Linears only here (emb_dims' x_embedder rank is a LoRA argument)")
                return SD3ConvLoraModule(*shape, cfg.patch_size, r, a)
            return make_adapter(kind, label, shape, r, a, split_sizes(path, cfg) if split_qkv else None,
                                (file_parts or {}).get(path))

        super().__init__(cfg, split_qkv, linear_shapes(cfg), targets, make)
        self.kind = kind


def create_sd3_lora(cfg: SD3Config, rank: int = 4, alpha: float = 1.0, split_qkv: bool = False,
                    type_dims: dict[str, int] | None = None, emb_dims: list[int] | None = None,
                    train_block_indices: str | None = None, conv_dim: int | None = None,
                    conv_alpha: float | None = None, kind: str = "lora") -> SD3LoraNetwork:
    """A new network as sd-scripts' `create_network(network_dim=rank, network_alpha=alpha, **network_args)` builds it
    (type_dims holds the six *_dim args by name); kind loha / lokr puts LyCORIS' adapters on the same Linears."""
    return SD3LoraNetwork(cfg, sd3_lora_targets(cfg, rank, alpha, type_dims, emb_dims, train_block_indices,
                                                conv_dim, conv_alpha), split_qkv, kind)


def kohya_sd3_state_dict(network: SD3LoraNetwork, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """The network as sd-scripts' lora_sd3 saves it (alpha stays float32)."""
    return kohya_state_dict(network, dtype)


def load_kohya_sd3_state_dict(network: SD3LoraNetwork, sd: dict[str, torch.Tensor], source: str = "LoRA") -> None:
    """Reverse of kohya_sd3_state_dict: fill a network built with the same targets (every module must be there)."""
    load_kohya_state_dict(network, sd, source)


def sd3_lora_from_kohya(cfg: SD3Config, sd: dict[str, torch.Tensor], split_qkv: bool = False,
                        source: str = "LoRA") -> SD3LoraNetwork:
    """A network shaped by a kohya-layout SD3 LoRA (its modules, ranks and alphas) with its weights loaded."""
    groups = group_kohya(sd, source)
    by_name = {kohya_name(p): p for p in linear_shapes(cfg)}
    unknown = sorted(n for n in groups if n not in by_name)
    if unknown:
        hint = " (text-encoder LoRAs load elsewhere)" if unknown[0].startswith("lora_te") else \
            " (a LoRA for another SD3 size or variant?)"
        raise ConfigError(f"{source}: {unknown[0]} names no layer of this SD3 {cfg.variant} model{hint}")
    kind = file_kind(groups, source)
    if kind != "lora":  # LyCORIS: each module shaped by its own tensors
        parts = {by_name[n]: g for n, g in groups.items()}
        network = SD3LoraNetwork(cfg, dict.fromkeys(parts, (1, 1.0)), False, kind, parts, source)
    else:
        ranks = kohya_ranks(groups, by_name, lambda p: len(split_sizes(p, cfg) or (1,)) if split_qkv else 1, source)
        network = SD3LoraNetwork(cfg, {p: (r, 1.0) for p, r in ranks.items()}, split_qkv)
    load_kohya_state_dict(network, sd, source, groups)
    return network


def save_sd3_lora(network: SD3LoraNetwork, path: str | Path, metadata: dict[str, str] | None = None,
                  dtype: torch.dtype | None = None) -> Path:
    """Write the kohya-layout safetensors file (atomically, like every output)."""
    return save_kohya(kohya_state_dict(network, dtype), path, metadata)
