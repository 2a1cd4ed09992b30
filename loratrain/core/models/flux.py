"""The FLUX.1 transformer (dev, schnell) in Black Forest Labs' own module layout.

Why our own module and not diffusers' `FluxTransformer2DModel`: the files people train on and share are BFL single
files (`double_blocks.N.img_attn.qkv`, `single_blocks.N.linear1`, ...) and sd-scripts' LoRAs name those modules
(`lora_unet_double_blocks_0_img_attn_qkv`). With the same module tree, a checkpoint loads without conversion, a
kohya LoRA maps one module to one Linear, and block swapping moves whole `double_blocks.N` / `single_blocks.N`.
`flux_keys.py` converts to and from diffusers' names; the tests prove this model computes what diffusers' does.

The architecture: an MM-DiT. Image tokens (2x2-packed latents) and T5 tokens get their own projections, modulations
and MLPs in the double-stream blocks but attend jointly; the single-stream blocks run one sequence [txt, img] with
attention and MLP in parallel from one fused input projection (`linear1`) and one fused output (`linear2`). The
conditioning vector is MLP(timestep) + MLP(CLIP pooled) (+ MLP(guidance) for dev) and drives every modulation.
Positions are 3-axis RoPE (index, row, column) over pairs of adjacent channels; queries and keys are RMS-normed.

Chroma (lodestone's FLUX.1-schnell derivative) shares these blocks without their modulation Linears: one
"approximator" MLP makes every block's shift/scale/gate vectors at once (core/models/chroma.py). The blocks here take
either the conditioning vector (FLUX.1: each block's own `*_mod.lin` / `modulation.lin` turns it into vectors) or,
when built for Chroma, their vectors ready-made.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import nn

from loratrain.core.errors import ConfigError

from .dit_parts import (
    SINGLE_FILE_PREFIXES,
    BlockCheckpointing,
    block_count,
    find_prefix,
    layer_norm,
    rms_norm,
    split_heads,
    timestep_embedding,
)

#: key prefixes single files put before the transformer's own keys (ComfyUI saves under model.diffusion_model.)
FLUX_PREFIXES = SINGLE_FILE_PREFIXES


@dataclass(frozen=True)
class FluxConfig:
    """Sizes of a FLUX.1 transformer, named as BFL's `FluxParams` names them."""

    in_channels: int = 64  # 16 latent channels x 2x2 patch
    vec_in_dim: int = 768  # CLIP-L pooled output
    context_in_dim: int = 4096  # T5-XXL hidden size
    hidden_size: int = 3072
    mlp_ratio: float = 4.0
    num_heads: int = 24
    depth: int = 19
    depth_single_blocks: int = 38
    axes_dim: tuple[int, ...] = (16, 56, 56)
    theta: int = 10_000
    qkv_bias: bool = True
    guidance_embed: bool = True  # dev is guidance-distilled; schnell has no guidance_in
    #: Chroma: no time_in / vector_in / guidance_in and no per-block modulation; the approximator's sizes instead
    chroma: bool = False
    approximator_in_dim: int = 64  # 16 timestep + 16 guidance + 32 modulation-index sinusoid channels
    approximator_hidden: int = 5120
    approximator_depth: int = 5

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def mlp_hidden(self) -> int:
        return int(self.hidden_size * self.mlp_ratio)

    @property
    def variant(self) -> str:
        return "chroma" if self.chroma else "dev" if self.guidance_embed else "schnell"

    @property
    def modulation_count(self) -> int:
        """Chroma's approximator output rows: 3 per single block, 6 + 6 per double block (img, txt), 2 final."""
        return 3 * self.depth_single_blocks + 12 * self.depth + 2

    def check(self) -> FluxConfig:
        if self.hidden_size % self.num_heads:
            raise ConfigError(f"FLUX hidden size {self.hidden_size} is not a multiple of its {self.num_heads} heads")
        if sum(self.axes_dim) != self.head_dim or any(d % 2 for d in self.axes_dim):
            raise ConfigError(f"FLUX RoPE axes {list(self.axes_dim)} must be even and sum to the head size {self.head_dim}")
        if self.chroma and (self.approximator_in_dim % 4 or self.guidance_embed):
            raise ConfigError(f"Chroma: approximator input {self.approximator_in_dim} must be a multiple of 4 "
                              "(timestep, guidance and 2x index channels) and there is no guidance_in")
        return self


FLUX_DEV = FluxConfig()
FLUX_SCHNELL = replace(FLUX_DEV, guidance_embed=False)
#: diffusers' own test sizes for FluxTransformer2DModel (patch 1, 4 channels, 1+1 blocks, 2 heads of 16)
FLUX_TINY = FluxConfig(in_channels=4, vec_in_dim=32, context_in_dim=32, hidden_size=32, num_heads=2, depth=1,
                       depth_single_blocks=1, axes_dim=(4, 4, 8), guidance_embed=False)
#: RoPE axes are not stored in a file: the known split per head size (FLUX.1's 128, the tiny test model's 16)
_AXES_BY_HEAD = {128: (16, 56, 56), 16: (4, 4, 8)}


def flux_prefix(keys: object) -> str | None:
    """The prefix in front of a BFL-layout transformer's keys (`""` when bare), None when these are not FLUX keys."""
    return find_prefix(keys, "double_blocks.0.img_attn.qkv.weight", FLUX_PREFIXES)


_REQUIRED = ("img_in.weight", "txt_in.weight", "vector_in.in_layer.weight", "double_blocks.0.img_mlp.0.weight",
             "double_blocks.0.img_attn.norm.query_norm.scale")


def flux_config_from_shapes(shapes: dict[str, tuple[int, ...]], source: str = "checkpoint",
                            axes_dim: tuple[int, ...] | None = None) -> FluxConfig:
    """The FluxConfig a BFL-layout state dict was made with, read from its keys and shapes.

    dev has `guidance_in`, schnell none; depth is the highest block index + 1; hidden size from `img_in`, head size
    from the q-norm scale, MLP ratio from `img_mlp.0`. Chroma (no per-block modulation) is named, not guessed.
    """
    prefix = flux_prefix(shapes)
    if prefix is None:
        if any(k.startswith(("transformer_blocks.", "transformer.transformer_blocks.")) for k in shapes):
            raise ConfigError(f"{source}: a FLUX transformer in diffusers' layout; convert it with flux_keys.diffusers_to_bfl")
        raise ConfigError(f"{source}: not a FLUX.1 transformer (no double_blocks.0.img_attn.qkv.weight)")
    sh = {k[len(prefix):]: tuple(v) for k, v in shapes.items() if k.startswith(prefix)}
    if "distilled_guidance_layer.in_proj.weight" in sh:
        return _chroma_config(sh, prefix, source, axes_dim)
    if "double_blocks.0.img_mod.lin.weight" not in sh:
        raise ConfigError(f"{source}: FLUX blocks without modulation (Chroma-style) but no distilled_guidance_layer "
                          "(the approximator making their modulation): a partial or damaged file")
    missing = [k for k in _REQUIRED if k not in sh]
    if missing:
        raise ConfigError(f"{source}: FLUX transformer without {prefix}{missing[0]} (a partial or damaged file)")
    return FluxConfig(vec_in_dim=sh["vector_in.in_layer.weight"][1], guidance_embed="guidance_in.in_layer.weight" in sh,
                      **_block_sizes(sh, source, axes_dim)).check()


def _block_sizes(sh: dict[str, tuple[int, ...]], source: str, axes_dim: tuple[int, ...] | None) -> dict[str, object]:
    """The sizes FLUX.1 and Chroma read alike from their shared blocks."""
    hidden, in_ch = sh["img_in.weight"]
    head = sh["double_blocks.0.img_attn.norm.query_norm.scale"][0]
    axes = tuple(axes_dim) if axes_dim else _AXES_BY_HEAD.get(head)
    if axes is None:
        raise ConfigError(f"{source}: FLUX with head size {head}: its RoPE axes are unknown; pass axes_dim")
    keys = set(sh)
    return dict(in_channels=in_ch, context_in_dim=sh["txt_in.weight"][1], hidden_size=hidden,
                mlp_ratio=sh["double_blocks.0.img_mlp.0.weight"][0] / hidden, num_heads=hidden // head,
                depth=block_count(keys, "double_blocks."), depth_single_blocks=block_count(keys, "single_blocks."),
                axes_dim=axes, qkv_bias="double_blocks.0.img_attn.qkv.bias" in keys)


_CHROMA_REQUIRED = ("img_in.weight", "txt_in.weight", "distilled_guidance_layer.out_proj.weight",
                    "double_blocks.0.img_mlp.0.weight", "double_blocks.0.img_attn.norm.query_norm.scale")


def _chroma_config(sh: dict[str, tuple[int, ...]], prefix: str, source: str,
                   axes_dim: tuple[int, ...] | None) -> FluxConfig:
    """Chroma: FLUX.1's blocks without their modulation Linears, and the approximator's sizes from its Linears."""
    missing = [k for k in _CHROMA_REQUIRED if k not in sh]
    if missing:
        raise ConfigError(f"{source}: Chroma transformer without {prefix}{missing[0]} (a partial or damaged file)")
    approx_hidden, approx_in = sh["distilled_guidance_layer.in_proj.weight"]
    return FluxConfig(vec_in_dim=0, guidance_embed=False, chroma=True, approximator_in_dim=approx_in,
                      approximator_hidden=approx_hidden,
                      approximator_depth=block_count(set(sh), "distilled_guidance_layer.layers."),
                      **_block_sizes(sh, source, axes_dim)).check()


# ---- maths ------------------------------------------------------------------------------------------------------

def rope_angles(ids: torch.Tensor, axes_dim: tuple[int, ...], theta: int) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin, (B, 1, L, head_dim/2), of each position id axis times its frequencies (angles in float64)."""
    if ids.ndim == 2:
        ids = ids[None]
    parts = []
    for i, d in enumerate(axes_dim):
        omega = 1.0 / theta ** (torch.arange(0, d, 2, dtype=torch.float64, device=ids.device) / d)
        parts.append(ids[..., i].to(torch.float64)[..., None] * omega)
    ang = torch.cat(parts, dim=-1)[:, None]
    return ang.cos().float(), ang.sin().float()


def apply_rope(x: torch.Tensor, pe: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """Rotate each adjacent channel pair (x0, x1) by its angle; computed in float32."""
    cos, sin = pe
    xf = x.float().unflatten(-1, (-1, 2))
    x0, x1 = xf[..., 0], xf[..., 1]
    return torch.stack([x0 * cos - x1 * sin, x0 * sin + x1 * cos], dim=-1).flatten(-2).type_as(x)


def joint_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pe: tuple[torch.Tensor, torch.Tensor],
                    mask: torch.Tensor | None) -> torch.Tensor:
    """(B, H, L, D) -> (B, L, H*D): RoPE on q and k, then PyTorch's SDPA (flash / memory-efficient where available)."""
    out = F.scaled_dot_product_attention(apply_rope(q, pe), apply_rope(k, pe), v, attn_mask=mask)
    return out.transpose(1, 2).flatten(2)


# ---- modules (attribute names are the checkpoint's key names) ---------------------------------------------------

class MLPEmbedder(nn.Module):
    def __init__(self, in_dim: int, hidden: int) -> None:
        super().__init__()
        self.in_layer, self.out_layer = nn.Linear(in_dim, hidden), nn.Linear(hidden, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out_layer(F.silu(self.in_layer(x)))


class RMSNorm(nn.Module):
    """RMS norm over the head channels with a learned `scale`, in float32 (eps 1e-6)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.scale)


class QKNorm(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.query_norm, self.key_norm = RMSNorm(dim), RMSNorm(dim)


class Modulation(nn.Module):
    """silu(vec) -> n (shift, scale, gate) vectors, each (B, 1, hidden)."""

    def __init__(self, dim: int, n: int) -> None:
        super().__init__()
        self.lin = nn.Linear(dim, n * dim)

    def forward(self, vec: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return self.lin(F.silu(vec))[:, None].chunk(self.lin.out_features // self.lin.in_features, dim=-1)


class SelfAttention(nn.Module):
    def __init__(self, dim: int, heads: int, bias: bool) -> None:
        super().__init__()
        self.qkv = nn.Linear(dim, 3 * dim, bias=bias)
        self.norm = QKNorm(dim // heads)
        self.proj = nn.Linear(dim, dim)


def _mlp(dim: int, hidden: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(dim, hidden), nn.GELU(approximate="tanh"), nn.Linear(hidden, dim))


def _key_mask(txt_mask: torch.Tensor | None, total: int) -> torch.Tensor | None:
    """A (B, 1, 1, L) boolean key mask hiding padded T5 tokens (sd-scripts' --apply_t5_attn_mask); images all attend."""
    if txt_mask is None:
        return None
    keep = txt_mask.to(torch.bool)
    img = torch.ones(keep.shape[0], total - keep.shape[1], dtype=torch.bool, device=keep.device)
    return torch.cat([keep, img], dim=1)[:, None, None, :]


class DoubleStreamBlock(nn.Module):
    def __init__(self, cfg: FluxConfig) -> None:
        super().__init__()
        h = cfg.hidden_size
        self.num_heads = cfg.num_heads
        if not cfg.chroma:
            self.img_mod, self.txt_mod = Modulation(h, 6), Modulation(h, 6)
        self.img_attn = SelfAttention(h, cfg.num_heads, cfg.qkv_bias)
        self.txt_attn = SelfAttention(h, cfg.num_heads, cfg.qkv_bias)
        self.img_mlp, self.txt_mlp = _mlp(h, cfg.mlp_hidden), _mlp(h, cfg.mlp_hidden)

    def _qkv(self, x: torch.Tensor, attn: SelfAttention, shift: torch.Tensor, scale: torch.Tensor):
        q, k, v = split_heads(attn.qkv((1 + scale) * layer_norm(x) + shift), self.num_heads)
        return attn.norm.query_norm(q).to(v.dtype), attn.norm.key_norm(k).to(v.dtype), v

    def forward(self, img: torch.Tensor, txt: torch.Tensor, vec: torch.Tensor, pe: tuple[torch.Tensor, torch.Tensor],
                txt_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """vec: FLUX.1's conditioning (B, hidden), or Chroma's 12 vectors (B, 12, hidden): img's 6, then txt's."""
        if hasattr(self, "img_mod"):
            i_sh1, i_sc1, i_g1, i_sh2, i_sc2, i_g2 = self.img_mod(vec)
            t_sh1, t_sc1, t_g1, t_sh2, t_sc2, t_g2 = self.txt_mod(vec)
        else:
            i_sh1, i_sc1, i_g1, i_sh2, i_sc2, i_g2, t_sh1, t_sc1, t_g1, t_sh2, t_sc2, t_g2 = vec.split(1, dim=1)
        iq, ik, iv = self._qkv(img, self.img_attn, i_sh1, i_sc1)
        tq, tk, tv = self._qkv(txt, self.txt_attn, t_sh1, t_sc1)
        n_txt = txt.shape[1]
        out = joint_attention(torch.cat([tq, iq], 2), torch.cat([tk, ik], 2), torch.cat([tv, iv], 2), pe,
                              _key_mask(txt_mask, n_txt + img.shape[1]))
        img = img + i_g1 * self.img_attn.proj(out[:, n_txt:])
        img = img + i_g2 * self.img_mlp((1 + i_sc2) * layer_norm(img) + i_sh2)
        txt = txt + t_g1 * self.txt_attn.proj(out[:, :n_txt])
        txt = txt + t_g2 * self.txt_mlp((1 + t_sc2) * layer_norm(txt) + t_sh2)
        return img, txt


class SingleStreamBlock(nn.Module):
    def __init__(self, cfg: FluxConfig) -> None:
        super().__init__()
        h = cfg.hidden_size
        self.num_heads, self.hidden, self.mlp_hidden = cfg.num_heads, h, cfg.mlp_hidden
        self.linear1 = nn.Linear(h, 3 * h + cfg.mlp_hidden)  # [q | k | v | mlp in]
        self.linear2 = nn.Linear(h + cfg.mlp_hidden, h)  # [attention out | mlp hidden] -> h
        self.norm = QKNorm(cfg.head_dim)
        if not cfg.chroma:
            self.modulation = Modulation(h, 3)

    def forward(self, x: torch.Tensor, vec: torch.Tensor, pe: tuple[torch.Tensor, torch.Tensor],
                txt_mask: torch.Tensor | None = None) -> torch.Tensor:
        """vec: FLUX.1's conditioning (B, hidden), or Chroma's (shift, scale, gate) vectors (B, 3, hidden)."""
        shift, scale, gate = self.modulation(vec) if hasattr(self, "modulation") else vec.split(1, dim=1)
        qkv, mlp = self.linear1((1 + scale) * layer_norm(x) + shift).split([3 * self.hidden, self.mlp_hidden], dim=-1)
        q, k, v = split_heads(qkv, self.num_heads)
        q, k = self.norm.query_norm(q).to(v.dtype), self.norm.key_norm(k).to(v.dtype)
        out = joint_attention(q, k, v, pe, _key_mask(txt_mask, x.shape[1]))
        return x + gate * self.linear2(torch.cat([out, F.gelu(mlp, approximate="tanh")], dim=-1))


class LastLayer(nn.Module):
    def __init__(self, hidden: int, out_channels: int, modulated: bool = True) -> None:
        super().__init__()
        if modulated:  # Chroma's final (shift, scale) come from its approximator
            self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden, 2 * hidden))  # [shift | scale]
        self.linear = nn.Linear(hidden, out_channels)

    def forward(self, x: torch.Tensor, vec: torch.Tensor) -> torch.Tensor:
        if hasattr(self, "adaLN_modulation"):
            shift, scale = self.adaLN_modulation(vec)[:, None].chunk(2, dim=-1)
        else:
            shift, scale = vec.split(1, dim=1)
        return self.linear((1 + scale) * layer_norm(x) + shift)


class FluxTransformer(BlockCheckpointing, nn.Module):
    """FLUX.1 over packed latent tokens: (B, L_img, in_channels) -> the same shape (the flow-matching velocity)."""

    def __init__(self, cfg: FluxConfig = FLUX_DEV) -> None:
        super().__init__()
        if cfg.chroma:
            raise ConfigError("a Chroma config builds chroma.ChromaTransformer (use chroma.build_transformer)")
        self.config = cfg.check()
        h = cfg.hidden_size
        self.img_in = nn.Linear(cfg.in_channels, h)
        self.time_in = MLPEmbedder(256, h)
        self.vector_in = MLPEmbedder(cfg.vec_in_dim, h)
        if cfg.guidance_embed:
            self.guidance_in = MLPEmbedder(256, h)
        self.txt_in = nn.Linear(cfg.context_in_dim, h)
        self.double_blocks = nn.ModuleList(DoubleStreamBlock(cfg) for _ in range(cfg.depth))
        self.single_blocks = nn.ModuleList(SingleStreamBlock(cfg) for _ in range(cfg.depth_single_blocks))
        self.final_layer = LastLayer(h, cfg.in_channels)

    def forward(self, img: torch.Tensor, img_ids: torch.Tensor, txt: torch.Tensor, txt_ids: torch.Tensor,
                timesteps: torch.Tensor, y: torch.Tensor, guidance: torch.Tensor | None = None,
                txt_mask: torch.Tensor | None = None) -> torch.Tensor:
        """img (B, L_img, C), txt (B, L_txt, T5 dim), ids (L, 3) or (B, L, 3), timesteps (B,) in [0, 1], y (B, CLIP
        pooled), guidance (B,) for dev (the CFG scale it was distilled on, e.g. 3.5), txt_mask (B, L_txt) optional."""
        dtype = self.img_in.weight.dtype
        vec = self.time_in(timestep_embedding(timesteps).to(dtype))
        if self.config.guidance_embed:
            if guidance is None:
                raise ConfigError("FLUX.1 dev is guidance-distilled: pass a guidance scale (e.g. 3.5)")
            vec = vec + self.guidance_in(timestep_embedding(guidance).to(dtype))
        vec = vec + self.vector_in(y.to(dtype))
        x, t = self.img_in(img.to(dtype)), self.txt_in(txt.to(dtype))
        if txt_ids.ndim != img_ids.ndim:
            txt_ids, img_ids = (i if i.ndim == 3 else i[None].expand(img.shape[0], -1, -1) for i in (txt_ids, img_ids))
        pe = rope_angles(torch.cat([txt_ids, img_ids], dim=-2), self.config.axes_dim, self.config.theta)
        for block in self.double_blocks:
            x, t = self._run(block, x, t, vec, pe, txt_mask)
        n_txt = t.shape[1]
        x = torch.cat([t, x], dim=1)
        for block in self.single_blocks:
            x = self._run(block, x, vec, pe, txt_mask)
        return self.final_layer(self._back(x[:, n_txt:]), vec)
