"""LoRA on the FLUX.1 transformer in sd-scripts' `networks/lora_flux.py` file layout.

Why a plain module and not PEFT: sd-scripts' `split_qkv` trains one LoRA per q / k / v (and MLP-in) slice of a fused
Linear and saves them as one block-diagonal LoRA; PEFT has no such layer. Each adapter here is a small module whose
output is added to its Linear's output by a forward hook, so the model's own state dict and key names stay BFL's.

File layout (what sd-scripts writes, key for key and shape for shape): module `lora_unet_<BFL path with _>`,
`lora_down.weight` [rank, in], `lora_up.weight` [out, rank], `alpha` a float32 scalar; y = Wx + alpha/rank * up(down(x)).
Default targets: every Linear of every double block (img/txt mod.lin, attn.qkv, attn.proj, mlp.0, mlp.2) and single
block (linear1, linear2, modulation.lin); `train_blocks` all/single/double narrows them, `in_dims` (img, time, vector,
guidance, txt ranks) adds the input embedders. With `split_qkv` a fused Linear's file entry is rank n*r: `lora_down`
is the n downs stacked, `lora_up` holds each slice's up on the block diagonal. sd-scripts keeps the per-slice alpha
there, so every reader (diffusers, ComfyUI, sd-scripts' own inference) applies 1/n of what was trained; we write
alpha * n so that alpha / file rank is the trained scale and the file means the same ΔW everywhere. (sd-scripts at
48d368f also fails to build split_qkv on double blocks; the layout we write for them is its state_dict()'s.)
"""
from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from loratrain.core.errors import ConfigError
from loratrain.core.models.flux import FluxConfig

PREFIX = "lora_unet_"
DOUBLE = ("img_mod.lin", "img_attn.qkv", "img_attn.proj", "img_mlp.0", "img_mlp.2",
          "txt_mod.lin", "txt_attn.qkv", "txt_attn.proj", "txt_mlp.0", "txt_mlp.2")
SINGLE = ("linear1", "linear2", "modulation.lin")
#: in_dims order (sd-scripts'): img, time, vector, guidance, txt
IN_GROUPS = (("img_in",), ("time_in.in_layer", "time_in.out_layer"), ("vector_in.in_layer", "vector_in.out_layer"),
             ("guidance_in.in_layer", "guidance_in.out_layer"), ("txt_in",))
TRAIN_BLOCKS = ("all", "single", "double")


def kohya_name(path: str) -> str:
    return PREFIX + path.replace(".", "_")


def linear_shapes(cfg: FluxConfig) -> dict[str, tuple[int, int]]:
    """(in, out) of every Linear a FLUX LoRA may target, by BFL path; from the config alone (no model needed)."""
    h, m = cfg.hidden_size, cfg.mlp_hidden
    block = {"img_mod.lin": (h, 6 * h), "img_attn.qkv": (h, 3 * h), "img_attn.proj": (h, h),
             "img_mlp.0": (h, m), "img_mlp.2": (m, h)}
    block.update({"txt" + k[3:]: v for k, v in block.items()})
    out = {"img_in": (cfg.in_channels, h), "time_in.in_layer": (256, h), "time_in.out_layer": (h, h),
           "vector_in.in_layer": (cfg.vec_in_dim, h), "vector_in.out_layer": (h, h), "txt_in": (cfg.context_in_dim, h)}
    if cfg.guidance_embed:
        out.update({"guidance_in.in_layer": (256, h), "guidance_in.out_layer": (h, h)})
    for i in range(cfg.depth):
        out.update({f"double_blocks.{i}.{k}": block[k] for k in DOUBLE})
    single = {"linear1": (h, 3 * h + m), "linear2": (h + m, h), "modulation.lin": (h, 3 * h)}
    for i in range(cfg.depth_single_blocks):
        out.update({f"single_blocks.{i}.{k}": v for k, v in single.items()})
    return out


def split_sizes(path: str, cfg: FluxConfig) -> tuple[int, ...] | None:
    """The output slices split_qkv trains separately: q/k/v of a double block's qkv, q/k/v/MLP-in of linear1."""
    if path.endswith("attn.qkv"):
        return (cfg.hidden_size,) * 3
    if path.endswith("linear1"):
        return (cfg.hidden_size,) * 3 + (cfg.mlp_hidden,)
    return None


def flux_lora_targets(cfg: FluxConfig, rank: int, train_blocks: str = "all",
                      in_dims: list[int] | None = None) -> dict[str, int]:
    """BFL path -> rank of the modules sd-scripts' lora_flux trains with these network_args."""
    if train_blocks not in TRAIN_BLOCKS:
        raise ConfigError(f"network_args train_blocks={train_blocks!r}: use one of {', '.join(TRAIN_BLOCKS)}")
    shapes = linear_shapes(cfg)
    want = {"all": ("double_blocks.", "single_blocks."), "single": ("single_blocks.",), "double": ("double_blocks.",)}
    out = {p: rank for p in shapes if p.startswith(want[train_blocks])}
    if in_dims is not None:
        if len(in_dims) != 5:
            raise ConfigError(f"network_args in_dims={in_dims}: give 5 ranks (img, time, vector, guidance, txt)")
        for group, r in zip(IN_GROUPS, in_dims):
            out.update({p: int(r) for p in group if r and p in shapes})
    return out


class FluxLoraModule(nn.Module):
    """alpha/rank * up(down(x)) for one Linear; with `splits`, one (down, up) pair per output slice, concatenated."""

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


class FluxLoraNetwork(nn.Module):
    """One FluxLoraModule per target, keyed by its kohya name; `apply_to(model)` hooks them onto the model's Linears."""

    def __init__(self, cfg: FluxConfig, ranks: dict[str, int], alpha: float | dict[str, float] = 1.0,
                 split_qkv: bool = False) -> None:
        super().__init__()
        self.config, self.split_qkv = cfg, split_qkv
        shapes = linear_shapes(cfg)
        unknown = sorted(set(ranks) - set(shapes))
        if unknown:
            raise ConfigError(f"FLUX LoRA: no Linear {unknown[0]} in this model")
        self.paths = {kohya_name(p): p for p in ranks}
        self.lora = nn.ModuleDict({
            kohya_name(p): FluxLoraModule(*shapes[p], r, alpha[p] if isinstance(alpha, dict) else alpha,
                                          split_sizes(p, cfg) if split_qkv else None)
            for p, r in ranks.items()})
        self._hooks: list[torch.utils.hooks.RemovableHandle] = []

    def apply_to(self, model: nn.Module) -> FluxLoraNetwork:
        """Add each adapter's output to its Linear's (forward hooks; the model's weights and keys are untouched)."""
        self.remove()
        modules = dict(model.named_modules())
        for name, path in self.paths.items():
            lin, lora = modules.get(path), self.lora[name]
            if not isinstance(lin, nn.Linear) or (lin.in_features, lin.out_features) != (lora.in_features, lora.out_features):
                raise ConfigError(f"FLUX LoRA {name}: the model has no {lora.in_features}->{lora.out_features} Linear at {path}")
            self._hooks.append(lin.register_forward_hook(lambda _m, args, out, lora=lora: out + lora(args[0])))
        return self

    def remove(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks = []

    def set_multiplier(self, value: float) -> None:
        for m in self.lora.values():
            m.multiplier = value


def create_flux_lora(cfg: FluxConfig, rank: int = 4, alpha: float = 1.0, train_blocks: str = "all",
                     split_qkv: bool = False, in_dims: list[int] | None = None) -> FluxLoraNetwork:
    """A new network as sd-scripts' `create_network(network_dim=rank, network_alpha=alpha, **network_args)` builds it."""
    return FluxLoraNetwork(cfg, flux_lora_targets(cfg, rank, train_blocks, in_dims), alpha, split_qkv)


def kohya_flux_state_dict(network: FluxLoraNetwork, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """The network as sd-scripts' lora_flux saves it (alpha stays float32)."""
    out = {}
    for name, module in network.lora.items():
        for part, t in module.kohya_tensors().items():
            out[f"{name}.{part}"] = t.to(dtype) if dtype is not None and part != "alpha" else t.clone()
    return out


def _group(sd: dict[str, torch.Tensor], source: str) -> dict[str, dict[str, torch.Tensor]]:
    groups: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in sd.items():
        name, _, part = key.partition(".")
        if part not in ("lora_down.weight", "lora_up.weight", "alpha"):
            raise ConfigError(f"{source}: {key} is not part of a kohya LoRA (lora_down.weight / lora_up.weight / alpha)")
        groups.setdefault(name, {})[part] = value
    for name, parts in groups.items():
        if "lora_down.weight" not in parts or "lora_up.weight" not in parts:
            raise ConfigError(f"{source}: module {name} lacks lora_down or lora_up")
    return groups


def load_kohya_flux_state_dict(network: FluxLoraNetwork, sd: dict[str, torch.Tensor], source: str = "LoRA") -> None:
    """Reverse of kohya_flux_state_dict: fill a network built with the same targets (every module must be there)."""
    groups = _group(sd, source)
    extra, missing = sorted(set(groups) - set(network.lora)), sorted(set(network.lora) - set(groups))
    if extra or missing:
        raise ConfigError(f"{source}: modules do not match the network ({'extra ' + extra[0] if extra else ''}"
                          f"{' ' if extra and missing else ''}{'missing ' + missing[0] if missing else ''})")
    for name, parts in groups.items():
        down, up = parts["lora_down.weight"].float(), parts["lora_up.weight"].float()
        alpha = float(parts["alpha"]) if "alpha" in parts and float(parts["alpha"]) != 0 else float(down.shape[0])
        network.lora[name].load_kohya(name, down, up, alpha)


def flux_lora_from_kohya(cfg: FluxConfig, sd: dict[str, torch.Tensor], split_qkv: bool = False,
                         source: str = "LoRA") -> FluxLoraNetwork:
    """A network shaped by a kohya-layout FLUX LoRA (its modules, ranks and alphas) with its weights loaded."""
    groups = _group(sd, source)
    by_name = {kohya_name(p): p for p in linear_shapes(cfg)}
    unknown = sorted(n for n in groups if n not in by_name)
    if unknown:
        raise ConfigError(f"{source}: {unknown[0]} names no Linear of this FLUX model (text-encoder LoRAs load elsewhere)")
    ranks = {}
    for name, parts in groups.items():
        n = len(split_sizes(by_name[name], cfg) or (1,)) if split_qkv else 1
        rank = parts["lora_down.weight"].shape[0]
        if rank % n:
            raise ConfigError(f"{source}: {name} has rank {rank}, not a multiple of its {n} split_qkv slices")
        ranks[by_name[name]] = rank // n
    network = FluxLoraNetwork(cfg, ranks, 1.0, split_qkv)
    load_kohya_flux_state_dict(network, sd, source)
    return network


def save_flux_lora(network: FluxLoraNetwork, path: str | Path, metadata: dict[str, str] | None = None,
                   dtype: torch.dtype | None = None) -> Path:
    """Write the kohya-layout safetensors file (atomically, like every output)."""
    from loratrain.core.safe_io import save_safetensors

    save_safetensors(kohya_flux_state_dict(network, dtype), path, metadata)
    return Path(path)
