"""Chroma (lodestone's 8.9B FLUX.1-schnell derivative) in BFL's module layout, on FLUX.1's own blocks.

Why a variant of our FluxTransformer and not a model of its own: Chroma keeps every double/single block Linear of
FLUX.1 under the same names (`double_blocks.N.img_attn.qkv`, `single_blocks.N.linear1`, ...), so sd-scripts' lora_flux
LoRAs, block swapping and the BFL<->diffusers key tables apply unchanged. What Chroma removes: CLIP-L (`vector_in`),
`time_in`, `guidance_in` and every per-block modulation Linear (`img_mod`, `txt_mod`, `modulation`, the final
`adaLN_modulation`). What it adds: `distilled_guidance_layer`, an "approximator" MLP (in_proj, n residual
RMSNorm->MLP layers, out_proj) that maps [timestep sinusoid | guidance sinusoid | sinusoid of the row index * 1000]
to one hidden-size vector per modulation row at once (3 per single block, 6 + 6 per double block, 2 final), laid out
as sd-scripts' `distribute_modulations` reads them: all single blocks, then every double block's img rows, then
every double block's txt rows, then the final (shift, scale).

The T5 mask as sd-scripts applies it for Chroma: each prompt attends its first mask.sum() + 1 T5 tokens (its words,
its EOS and one padding token), the rest are trimmed from the batch or masked as keys; images always attend.
The modulation vectors are computed without gradients, as sd-scripts computes them (the approximator never trains).
"""
from __future__ import annotations

from dataclasses import replace

import torch
from torch import nn

from loratrain.core.errors import ConfigError

from .dit_parts import timestep_embedding
from .flux import (
    FLUX_TINY,
    DoubleStreamBlock,
    FluxConfig,
    FluxTransformer,
    LastLayer,
    MLPEmbedder,
    RMSNorm,
    SingleStreamBlock,
    rope_angles,
)

#: Chroma1 (HD / Base): FLUX.1's blocks and sizes, no CLIP-L, a 64 -> 5120 x 5 -> 3072 approximator
CHROMA = FluxConfig(vec_in_dim=0, guidance_embed=False, chroma=True)
#: the tiny test size of FLUX_TINY's blocks with a small approximator
CHROMA_TINY = replace(FLUX_TINY, vec_in_dim=0, guidance_embed=False, chroma=True, approximator_in_dim=16,
                      approximator_hidden=24, approximator_depth=2)
#: sd-scripts' attn_padding: padding T5 tokens each prompt attends beyond its mask
ATTN_PADDING = 1


class Approximator(nn.Module):
    """x -> in_proj -> n x (x + MLP(RMSNorm(x))) -> out_proj; attribute names are the checkpoint's."""

    def __init__(self, in_dim: int, out_dim: int, hidden: int, depth: int) -> None:
        super().__init__()
        self.in_proj = nn.Linear(in_dim, hidden)
        self.layers = nn.ModuleList(MLPEmbedder(hidden, hidden) for _ in range(depth))
        self.norms = nn.ModuleList(RMSNorm(hidden) for _ in range(depth))
        self.out_proj = nn.Linear(hidden, out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.in_proj(x)
        for layer, norm in zip(self.layers, self.norms):
            x = x + layer(norm(x))
        return self.out_proj(x)


def text_keep_lengths(txt_mask: torch.Tensor, length: int) -> torch.Tensor:
    """(B,) T5 tokens each prompt attends: its mask's count + ATTN_PADDING, at most `length` (sd-scripts' rule)."""
    return (txt_mask[:, :length].sum(dim=-1).to(torch.int64) + ATTN_PADDING).clamp(0, length)


class ChromaTransformer(FluxTransformer):
    """Chroma over packed latent tokens: (B, L_img, in_channels) -> the same shape (the flow-matching velocity)."""

    def __init__(self, cfg: FluxConfig = CHROMA) -> None:
        nn.Module.__init__(self)
        if not cfg.chroma:
            raise ConfigError("ChromaTransformer needs a Chroma config (FluxConfig(chroma=True))")
        self.config = cfg.check()
        h = cfg.hidden_size
        self.img_in = nn.Linear(cfg.in_channels, h)
        self.distilled_guidance_layer = Approximator(cfg.approximator_in_dim, h, cfg.approximator_hidden,
                                                     cfg.approximator_depth)
        self.txt_in = nn.Linear(cfg.context_in_dim, h)
        self.double_blocks = nn.ModuleList(DoubleStreamBlock(cfg) for _ in range(cfg.depth))
        self.single_blocks = nn.ModuleList(SingleStreamBlock(cfg) for _ in range(cfg.depth_single_blocks))
        self.final_layer = LastLayer(h, cfg.in_channels, modulated=False)
        self.register_buffer("mod_index", torch.arange(cfg.modulation_count), persistent=False)

    def approximator_input(self, timesteps: torch.Tensor, guidance: torch.Tensor) -> torch.Tensor:
        """(B, rows, in_dim): [sinusoid(t) | sinusoid(guidance) | sinusoid(row index)] per modulation row, each
        sinusoid with FLUX's x1000 time factor (the row index too, as Chroma was trained)."""
        quarter = self.config.approximator_in_dim // 4
        rows = self.mod_index.shape[0]
        tg = torch.cat([timestep_embedding(timesteps, quarter), timestep_embedding(guidance, quarter)], dim=-1)
        index = timestep_embedding(self.mod_index, 2 * quarter)
        b = tg.shape[0]
        return torch.cat([tg[:, None].expand(b, rows, -1), index[None].expand(b, -1, -1)], dim=-1)

    @torch.no_grad()
    def modulations(self, timesteps: torch.Tensor, guidance: torch.Tensor) -> torch.Tensor:
        """(B, rows, hidden): every block's shift / scale / gate vectors for these timesteps (in [0, 1])."""
        dtype = self.img_in.weight.dtype
        return self.distilled_guidance_layer(self.approximator_input(timesteps, guidance).to(dtype))

    def forward(self, img: torch.Tensor, img_ids: torch.Tensor, txt: torch.Tensor, txt_ids: torch.Tensor,
                timesteps: torch.Tensor, y: torch.Tensor | None = None, guidance: torch.Tensor | None = None,
                txt_mask: torch.Tensor | None = None) -> torch.Tensor:
        """FluxTransformer's call; `y` (CLIP pooled) is ignored, `guidance` (B,) feeds the approximator (0 when None:
        Chroma is not guidance-distilled), txt_mask (B, L_txt) limits each prompt's T5 tokens (see text_keep_lengths)."""
        cfg = self.config
        dtype = self.img_in.weight.dtype
        if guidance is None:
            guidance = torch.zeros_like(timesteps, dtype=torch.float32)
        mods = self.modulations(timesteps, guidance)
        x, t = self.img_in(img.to(dtype)), self.txt_in(txt.to(dtype))
        mask = None
        if txt_mask is not None:  # trim to the longest kept prompt, mask the rest of the shorter ones
            keep = text_keep_lengths(txt_mask, t.shape[1])
            n = int(keep.max())
            t, txt_ids = t[:, :n], txt_ids[..., :n, :]
            mask = torch.arange(n, device=keep.device)[None] < keep[:, None]
        if txt_ids.ndim != img_ids.ndim:
            txt_ids, img_ids = (i if i.ndim == 3 else i[None].expand(img.shape[0], -1, -1) for i in (txt_ids, img_ids))
        pe = rope_angles(torch.cat([txt_ids, img_ids], dim=-2), cfg.axes_dim, cfg.theta)
        singles, depth = 3 * cfg.depth_single_blocks, cfg.depth
        for i, block in enumerate(self.double_blocks):
            img_rows = singles + 6 * i
            txt_rows = singles + 6 * depth + 6 * i
            vec = torch.cat([mods[:, img_rows:img_rows + 6], mods[:, txt_rows:txt_rows + 6]], dim=1)
            x, t = self._run(block, x, t, vec, pe, mask)
        n_txt = t.shape[1]
        x = torch.cat([t, x], dim=1)
        for i, block in enumerate(self.single_blocks):
            x = self._run(block, x, mods[:, 3 * i:3 * i + 3], pe, mask)
        return self.final_layer(self._back(x[:, n_txt:]), mods[:, -2:])


def build_transformer(cfg: FluxConfig) -> FluxTransformer:
    """The transformer a config describes: ChromaTransformer for Chroma, FluxTransformer for FLUX.1 dev / schnell."""
    return ChromaTransformer(cfg) if cfg.chroma else FluxTransformer(cfg)
