"""The SD3 / SD3.5 MMDiT (3 medium, 3.5 medium, 3.5 large) in the single-file module layout.

Why our own module and not diffusers' `SD3Transformer2DModel`: the files people train on and share are single files
(`model.diffusion_model.joint_blocks.N.x_block.attn.qkv`, ...), sd-scripts' `library/sd3_models.MMDiT` uses the same
module tree, and its LoRAs name those modules (`lora_unet_joint_blocks_0_x_block_attn_qkv`). With the same tree a
checkpoint loads without conversion, a kohya LoRA maps one module to one Linear, and block swapping moves whole
`joint_blocks.N`. `sd3_keys.py` converts to and from diffusers' names; the tests prove this model computes what
diffusers' does.

The architecture: an MM-DiT. Latents are cut into p x p patches by a strided convolution (`x_embedder.proj`) and get a
learned-once 2-D sin-cos position table (`pos_embed`, a max_size x max_size grid stored in every file; the centre crop
of the image's patch grid is added). T5/CLIP tokens go through `context_embedder`. Each joint block has two halves,
`context_block` and `x_block`, with their own AdaLN modulation, fused q/k/v, output projection and GELU MLP; the two
token sets attend jointly. The last block's context half is "pre-only": it feeds keys and values but computes no
output, so it has only `attn.qkv` and a 2-vector modulation. The conditioning vector is MLP(timestep) + MLP(CLIP
pooled). SD3.5 adds RMS q/k norms (`attn.ln_q`, `attn.ln_k`); SD3.5 medium adds MMDiT-X: on its first 13 blocks the
image half also runs a second, image-only self-attention (`x_block.attn2`) from the same normed input with its own
shift/scale/gate (9 modulation vectors instead of 6). Unlike FLUX there is no RoPE and no attention mask.

attn2 is split into the model's heads (24 of 64 channels on 3.5 medium) as in SAI's reference and diffusers.
sd-scripts 48d368f passes its attention() the head count where that function wants the head size, so its attn2 runs
64 heads of 24 channels; its SD3.5-medium outputs differ from these (and diffusers') on the MMDiT-X blocks.
"""
from __future__ import annotations

import math
import re
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

#: key prefixes single files put before the transformer's own keys (SAI's and ComfyUI's files: model.diffusion_model.)
SD3_PREFIXES = SINGLE_FILE_PREFIXES


@dataclass(frozen=True)
class SD3Config:
    """Sizes of an SD3-family MMDiT, named after diffusers' SD3Transformer2DModel config (its docs say what each is).

    `hidden_size` is heads x head size (SAI's files always use 64-channel heads, so depth = heads there; the tiny
    test model does not). `dual_attention_layers` are the blocks with MMDiT-X's second attention; `qk_norm` is
    "rms_norm" or None.
    """

    patch_size: int = 2
    in_channels: int = 16
    out_channels: int = 16
    num_layers: int = 24
    attention_head_dim: int = 64
    num_attention_heads: int = 24
    joint_attention_dim: int = 4096  # T5-XXL hidden size (CLIP-L/G hidden states are zero-padded up to it)
    pooled_projection_dim: int = 2048  # CLIP-L pooled (768) + CLIP-G pooled (1280)
    pos_embed_max_size: int = 192
    dual_attention_layers: tuple[int, ...] = ()
    qk_norm: str | None = None
    mlp_ratio: float = 4.0

    @property
    def hidden_size(self) -> int:
        return self.attention_head_dim * self.num_attention_heads

    @property
    def mlp_hidden(self) -> int:
        return int(self.hidden_size * self.mlp_ratio)

    @property
    def variant(self) -> str:
        """sd-scripts' model_type names (after `stable-diffusion-3-`): "medium" (3.0), "5-medium", "5-large"."""
        if self.qk_norm is None:
            return "medium"
        return "5-medium" if self.dual_attention_layers else "5-large"

    def check(self) -> SD3Config:
        if self.qk_norm not in (None, "rms_norm"):
            raise ConfigError(f"SD3 qk_norm {self.qk_norm!r}: only None (SD3) and 'rms_norm' (SD3.5) exist")
        bad = [i for i in self.dual_attention_layers if not 0 <= i < self.num_layers - 1]
        if bad:  # the last block's context half is pre-only; MMDiT-X never puts attn2 there either
            raise ConfigError(f"SD3 dual_attention_layers {bad}: blocks 0..{self.num_layers - 2} only")
        return self


SD3_MEDIUM = SD3Config()
SD35_LARGE = SD3Config(num_layers=38, num_attention_heads=38, qk_norm="rms_norm")
SD35_MEDIUM = SD3Config(pos_embed_max_size=384, dual_attention_layers=tuple(range(13)), qk_norm="rms_norm")
#: diffusers' own test sizes for SD3Transformer2DModel (tests/models/transformers/test_models_transformer_sd3.py):
#: patch 1, 4 channels, 4 blocks, 4 heads of 8; SD35_TINY is its SD3.5 variant (dual attention on block 0, RMS q/k)
SD3_TINY = SD3Config(patch_size=1, in_channels=4, out_channels=4, num_layers=4, attention_head_dim=8,
                     num_attention_heads=4, joint_attention_dim=32, pooled_projection_dim=64, pos_embed_max_size=96)
SD35_TINY = replace(SD3_TINY, dual_attention_layers=(0,), qk_norm="rms_norm")


def sd3_prefix(keys: object) -> str | None:
    """The prefix in front of a single-file SD3 transformer's keys (`""` when bare), None when these are not SD3 keys."""
    return find_prefix(keys, "joint_blocks.0.x_block.attn.qkv.weight", SD3_PREFIXES)


_REQUIRED = ("x_embedder.proj.weight", "pos_embed", "t_embedder.mlp.0.weight", "y_embedder.mlp.0.weight",
             "context_embedder.weight", "joint_blocks.0.x_block.mlp.fc1.weight", "final_layer.linear.weight")
_ATTN2 = re.compile(r"joint_blocks\.(\d+)\.x_block\.attn2\.qkv\.weight$")


def sd3_config_from_shapes(shapes: dict[str, tuple[int, ...]], source: str = "checkpoint",
                           head_dim: int | None = None) -> SD3Config:
    """The SD3Config a single-file state dict was made with, read from its keys and shapes.

    Depth from the highest joint block, hidden size and patch from `x_embedder.proj`, the position grid from
    `pos_embed`, SD3.5's q/k norm from `ln_q`, MMDiT-X blocks from `x_block.attn2`. The head size is only visible
    when q/k norms exist (their length); SD3 3.0 files have none, and SAI's heads are always 64 channels, so 64 is
    assumed there unless `head_dim` says otherwise.
    """
    prefix = sd3_prefix(shapes)
    if prefix is None:
        if any(k.startswith(("transformer_blocks.", "transformer.transformer_blocks.")) for k in shapes) and \
                any("attn.add_q_proj" in k for k in shapes):
            raise ConfigError(f"{source}: an SD3 transformer in diffusers' layout; convert it with sd3_keys.diffusers_to_sd3")
        raise ConfigError(f"{source}: not an SD3/SD3.5 transformer (no joint_blocks.0.x_block.attn.qkv.weight)")
    sh = {k[len(prefix):]: tuple(v) for k, v in shapes.items() if k.startswith(prefix)}
    missing = [k for k in _REQUIRED if k not in sh]
    if missing:
        raise ConfigError(f"{source}: SD3 transformer without {prefix}{missing[0]} (a partial or damaged file)")
    if "joint_blocks.0.x_block.attn.ln_q.bias" in sh:
        raise ConfigError(f"{source}: SD3 with LayerNorm q/k norms (qk_norm 'ln'): no released model uses it; not supported")
    hidden, in_ch, patch, _ = sh["x_embedder.proj.weight"]
    num_patches = sh["pos_embed"][1]
    grid = math.isqrt(num_patches)
    if grid * grid != num_patches:
        raise ConfigError(f"{source}: SD3 pos_embed holds {num_patches} positions, not a square grid")
    qk = "joint_blocks.0.x_block.attn.ln_q.weight" in sh
    head = sh["joint_blocks.0.x_block.attn.ln_q.weight"][0] if qk else (head_dim or 64)
    if hidden % head:
        raise ConfigError(f"{source}: SD3 hidden size {hidden} is not a multiple of the head size {head}")
    context_out, context_in = sh["context_embedder.weight"]
    if context_out != hidden:
        raise ConfigError(f"{source}: SD3 context_embedder outputs {context_out}, not the hidden size {hidden}")
    keys = set(sh)
    dual = tuple(sorted(int(m.group(1)) for k in keys if (m := _ATTN2.match(k))))
    return SD3Config(patch_size=patch, in_channels=in_ch, out_channels=sh["final_layer.linear.weight"][0] // (patch * patch),
                     num_layers=block_count(keys, "joint_blocks."), attention_head_dim=head, num_attention_heads=hidden // head,
                     joint_attention_dim=context_in, pooled_projection_dim=sh["y_embedder.mlp.0.weight"][1],
                     pos_embed_max_size=grid, dual_attention_layers=dual, qk_norm="rms_norm" if qk else None,
                     mlp_ratio=sh["joint_blocks.0.x_block.mlp.fc1.weight"][0] / hidden).check()


# ---- modules (attribute names are the checkpoint's key names) ---------------------------------------------------

def _modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """LayerNorm (no affine, eps 1e-6), then x * (1 + scale) + shift with (B, hidden) vectors."""
    return layer_norm(x) * (1 + scale[:, None]) + shift[:, None]


class RMSNorm(nn.Module):
    """SD3.5's q/k norm over one head's channels with a learned `weight`, in float32 (eps 1e-6)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight)


class Attention(nn.Module):
    """Fused q/k/v (laid out [q | k | v], each head-major), optional RMS q/k norms, optional output projection."""

    def __init__(self, dim: int, heads: int, qk_norm: bool, with_proj: bool = True) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        if with_proj:
            self.proj = nn.Linear(dim, dim)
        if qk_norm:
            self.ln_q, self.ln_k = RMSNorm(dim // heads), RMSNorm(dim // heads)

    def qkv_heads(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(B, L, dim) -> q, k, v as (B, heads, L, head size), q and k normed when the model has q/k norms."""
        q, k, v = split_heads(self.qkv(x), self.heads)
        if hasattr(self, "ln_q"):
            q, k = self.ln_q(q).to(v.dtype), self.ln_k(k).to(v.dtype)
        return q, k, v


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """(B, H, L, D) -> (B, L, H*D) through PyTorch's SDPA (flash / memory-efficient kernels where available)."""
    return F.scaled_dot_product_attention(q, k, v).transpose(1, 2).flatten(2)


class MLP(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(dim, hidden), nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class DiTHalf(nn.Module):
    """One stream's half of a joint block (sd-scripts' SingleDiTBlock; its LoRA targets every Linear in here).

    Modulation vectors, in file order: [shift, scale, gate] for attention, the same for the MLP, and with MMDiT-X
    the same for attn2; a pre-only half has just [shift, scale].
    """

    def __init__(self, cfg: SD3Config, pre_only: bool = False, dual: bool = False) -> None:
        super().__init__()
        h = cfg.hidden_size
        self.pre_only, self.dual = pre_only, dual
        n_mod = 2 if pre_only else (9 if dual else 6)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(h, n_mod * h))
        self.attn = Attention(h, cfg.num_attention_heads, cfg.qk_norm is not None, with_proj=not pre_only)
        if dual:
            self.attn2 = Attention(h, cfg.num_attention_heads, cfg.qk_norm is not None)
        if not pre_only:
            self.mlp = MLP(h, cfg.mlp_hidden)

    def mods(self, c: torch.Tensor) -> tuple[torch.Tensor, ...]:
        lin = self.adaLN_modulation[1]
        return self.adaLN_modulation(c).chunk(lin.out_features // lin.in_features, dim=-1)

    def attn_update(self, x: torch.Tensor, attn_out: torch.Tensor, mods: tuple[torch.Tensor, ...]) -> torch.Tensor:
        return x + mods[2][:, None] * self.attn.proj(attn_out)

    def mlp_update(self, x: torch.Tensor, mods: tuple[torch.Tensor, ...]) -> torch.Tensor:
        _, _, _, shift, scale, gate = mods[:6]
        return x + gate[:, None] * self.mlp(_modulate(x, shift, scale))


class JointBlock(nn.Module):
    def __init__(self, cfg: SD3Config, index: int) -> None:
        super().__init__()
        self.context_block = DiTHalf(cfg, pre_only=index == cfg.num_layers - 1)
        self.x_block = DiTHalf(cfg, dual=index in cfg.dual_attention_layers)

    def forward(self, context: torch.Tensor, x: torch.Tensor, c: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor]:
        cm, xm = self.context_block.mods(c), self.x_block.mods(c)
        cq, ck, cv = self.context_block.attn.qkv_heads(_modulate(context, cm[0], cm[1]))
        xq, xk, xv = self.x_block.attn.qkv_heads(_modulate(x, xm[0], xm[1]))
        n_ctx = context.shape[1]
        out = _attend(torch.cat([cq, xq], 2), torch.cat([ck, xk], 2), torch.cat([cv, xv], 2))
        x_new = self.x_block.attn_update(x, out[:, n_ctx:], xm)
        if self.x_block.dual:  # MMDiT-X: image-only attention from the same input with attn2's own shift/scale/gate
            shift2, scale2, gate2 = xm[6:9]
            out2 = _attend(*self.x_block.attn2.qkv_heads(_modulate(x, shift2, scale2)))
            x_new = x_new + gate2[:, None] * self.x_block.attn2.proj(out2)
        x_new = self.x_block.mlp_update(x_new, xm)
        if self.context_block.pre_only:
            return None, x_new
        cm_out = self.context_block.attn_update(context, out[:, :n_ctx], cm)
        return self.context_block.mlp_update(cm_out, cm), x_new


class PatchEmbed(nn.Module):
    def __init__(self, cfg: SD3Config) -> None:
        super().__init__()
        self.proj = nn.Conv2d(cfg.in_channels, cfg.hidden_size, cfg.patch_size, stride=cfg.patch_size)


class Embedder(nn.Module):
    """Linear -> SiLU -> Linear (t_embedder on the 256-channel timestep embedding, y_embedder on CLIP pooled)."""

    def __init__(self, in_dim: int, hidden: int) -> None:
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(in_dim, hidden), nn.SiLU(), nn.Linear(hidden, hidden))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp(x)


class FinalLayer(nn.Module):
    def __init__(self, cfg: SD3Config) -> None:
        super().__init__()
        h = cfg.hidden_size
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(h, 2 * h))  # [shift | scale]
        self.linear = nn.Linear(h, cfg.patch_size ** 2 * cfg.out_channels)

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=-1)
        return self.linear(_modulate(x, shift, scale))


class SD3Transformer(BlockCheckpointing, nn.Module):
    """SD3/SD3.5 over latents: (B, C, H, W) -> (B, out_channels, H, W), the flow-matching velocity."""

    def __init__(self, cfg: SD3Config = SD35_LARGE) -> None:
        super().__init__()
        self.config = cfg.check()
        h = cfg.hidden_size
        self.x_embedder = PatchEmbed(cfg)
        # the position table is part of every SD3 file (a fixed sin-cos grid there); it loads with the weights
        self.register_buffer("pos_embed", torch.zeros(1, cfg.pos_embed_max_size ** 2, h))
        self.t_embedder = Embedder(256, h)
        self.y_embedder = Embedder(cfg.pooled_projection_dim, h)
        self.context_embedder = nn.Linear(cfg.joint_attention_dim, h)
        self.joint_blocks = nn.ModuleList(JointBlock(cfg, i) for i in range(cfg.num_layers))
        self.final_layer = FinalLayer(cfg)

    def cropped_pos_embed(self, rows: int, cols: int) -> torch.Tensor:
        """The centre rows x cols of the position grid, as (1, rows*cols, hidden) (what SD3 was trained with)."""
        m = self.config.pos_embed_max_size
        if rows > m or cols > m:
            raise ConfigError(f"SD3 latent of {rows}x{cols} patches exceeds the model's {m}x{m} position grid "
                              f"(at most {m * self.config.patch_size * 8} pixels a side)")
        top, left = (m - rows) // 2, (m - cols) // 2
        return self.pos_embed.view(1, m, m, -1)[:, top:top + rows, left:left + cols].reshape(1, rows * cols, -1)

    def forward(self, x: torch.Tensor, timesteps: torch.Tensor, context: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """x (B, C, H, W) latents, timesteps (B,) on the 0..1000 scale (sigma * 1000, as sd-scripts and diffusers
        pass them), context (B, L, joint_attention_dim) T5 + CLIP tokens, y (B, pooled_projection_dim) CLIP pooled."""
        p = self.config.patch_size
        batch, _, height, width = x.shape
        if height % p or width % p:
            raise ConfigError(f"SD3 latent {height}x{width} is not a multiple of the patch size {p}")
        dtype = self.context_embedder.weight.dtype
        rows, cols = height // p, width // p
        tokens = self.x_embedder.proj(x.to(dtype)).flatten(2).transpose(1, 2)
        tokens = tokens + self.cropped_pos_embed(rows, cols).to(dtype)
        c = self.t_embedder(timestep_embedding(timesteps, 256, factor=1.0).to(dtype)) + self.y_embedder(y.to(dtype))
        ctx = self.context_embedder(context.to(dtype))
        for block in self.joint_blocks:
            ctx, tokens = self._run(block, ctx, tokens, c)
        out = self.final_layer(self._back(tokens), c)
        out = out.view(batch, rows, cols, p, p, -1).permute(0, 5, 1, 3, 2, 4)
        return out.reshape(batch, -1, height, width)
