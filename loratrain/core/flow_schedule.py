"""Flow-matching maths shared by training and sampling: FLUX.1's shifted schedule, SD3's flow shift, 2x2 latent
packing and RoPE ids, the T5 length rule and the transformer call they all make.

Why in core: the samplers (core/flux_sampling.py, used by `generate`, the grid and training samples) need them,
and features may not import each other; training/flow_matching.py re-exports them beside the training maths.
Formulas and defaults are sd-scripts' and BFL's (checked bit for bit in tests/test_flow_matching.py).
"""
from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

from loratrain.core.errors import ConfigError

if TYPE_CHECKING:  # importing stays light (no torch)
    import torch

#: FLUX.1's image-length-dependent shift: mu is linear from base_shift at 256 tokens to max_shift at 4096 tokens
BASE_SEQ_LEN, MAX_SEQ_LEN, BASE_SHIFT, MAX_SHIFT = 256, 4096, 0.5, 1.15


def t5_max_length(opts: Any, arch: str = "flux", variant: str = "dev") -> int:
    """sd-scripts' T5-XXL length: the option if set, else 512 for FLUX.1 dev and 256 for schnell and SD3.5."""
    if opts.t5xxl_max_token_length is not None:
        return int(opts.t5xxl_max_token_length)
    return 512 if (arch, variant) == ("flux", "dev") else 256


# ---- shifts and schedules ------------------------------------------------------------------------------------------
def shift_sigmas(sigmas: torch.Tensor, shift: float) -> torch.Tensor:
    """SD3's discrete flow shift s*t / (1 + (s-1)*t): s > 1 moves every sigma towards noise, keeping 0 and 1."""
    return (sigmas * shift) / (1 + (shift - 1) * sigmas)


def flux_mu(image_seq_len: int, base_shift: float = BASE_SHIFT, max_shift: float = MAX_SHIFT) -> float:
    """FLUX.1's shift exponent for an image of `image_seq_len` packed tokens: the line through (256, base_shift) and
    (4096, max_shift), extrapolated beyond them. Bigger images keep more signal at a given sigma, so they need more."""
    m = (max_shift - base_shift) / (MAX_SEQ_LEN - BASE_SEQ_LEN)
    b = base_shift - m * BASE_SEQ_LEN
    return m * image_seq_len + b


def time_shift(mu: float, sigma: float, t: torch.Tensor) -> torch.Tensor:
    """FLUX.1's exponential time shift e^mu / (e^mu + (1/t - 1)^sigma); t = 0 and t = 1 stay where they are."""
    return math.exp(mu) / (math.exp(mu) + (1 / t - 1) ** sigma)


def flux_schedule(num_steps: int, image_seq_len: int, base_shift: float = BASE_SHIFT, max_shift: float = MAX_SHIFT,
                  shift: bool = True) -> list[float]:
    """The sigmas a FLUX.1 sampler steps through, from 1 to 0 (num_steps + 1 values): linear, time-shifted by the
    mu of the image's token count (sd-scripts' and BFL's get_schedule). An Euler step is x += (next - cur) * v."""
    import torch

    if num_steps < 1:
        raise ConfigError(f"sample steps {num_steps} must be at least 1")
    sigmas = torch.linspace(1, 0, num_steps + 1)
    if shift:
        sigmas = time_shift(flux_mu(image_seq_len, base_shift, max_shift), 1.0, sigmas)
    return sigmas.tolist()


# ---- FLUX.1 packing ------------------------------------------------------------------------------------------------
def pack_latents(x: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) latents -> (B, H/2 * W/2, C*4) tokens: FLUX sees each 2x2 patch as one token, channels first
    then the patch's row and column (sd-scripts' and diffusers' order, so trained weights mean the same)."""
    b, c, h, w = x.shape
    if h % 2 or w % 2:
        raise ConfigError(f"FLUX packs 2x2 latent patches: latent size {h}x{w} must be even (image sides a multiple of 16)")
    return x.reshape(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, (h // 2) * (w // 2), c * 4)


def unpack_latents(x: torch.Tensor, packed_height: int, packed_width: int) -> torch.Tensor:
    """pack_latents' inverse: (B, h*w, C*4) tokens -> (B, C, 2h, 2w) latents."""
    b, n, d = x.shape
    if n != packed_height * packed_width or d % 4:
        raise ValueError(f"{n} tokens of {d} channels are not a {packed_height}x{packed_width} grid of 2x2 patches")
    x = x.reshape(b, packed_height, packed_width, d // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(b, d // 4, packed_height * 2, packed_width * 2)


def image_ids(packed_height: int, packed_width: int, batch_size: int | None = None) -> torch.Tensor:
    """FLUX's RoPE positions of the image tokens, (h*w, 3) or (B, h*w, 3): [0, row, column] per token, in
    pack_latents' order. Text tokens get all-zero ids (text_ids)."""
    import torch

    ids = torch.zeros(packed_height, packed_width, 3)
    ids[..., 1] = torch.arange(packed_height)[:, None]
    ids[..., 2] = torch.arange(packed_width)[None, :]
    ids = ids.reshape(packed_height * packed_width, 3)
    return ids if batch_size is None else ids[None].repeat(batch_size, 1, 1)


def text_ids(batch_size: int, length: int) -> torch.Tensor:
    """The T5 tokens' RoPE positions: all zero (FLUX gives text no position of its own)."""
    import torch

    return torch.zeros(batch_size, length, 3)


def flux_forward(model: Any, packed: torch.Tensor, packed_height: int, packed_width: int, t5: torch.Tensor,
                 pooled: torch.Tensor, timesteps: torch.Tensor, guidance: float, t5_mask: torch.Tensor | None = None,
                 ) -> torch.Tensor:
    """One FLUX.1 transformer call as training, validation and the sampler make it: packed tokens (B, h*w, C*4), their
    RoPE ids, T5 states with all-zero ids, timesteps = sigma in [0, 1] (B,), CLIP-L pooled, the embedded guidance (the
    same for the batch) and the T5 mask or None. The output is in the same packed layout."""
    import torch

    b, dev = packed.shape[0], packed.device
    return model(packed, image_ids(packed_height, packed_width, b).to(dev), t5, text_ids(b, t5.shape[1]).to(dev),
                 timesteps, pooled, torch.full((b,), float(guidance), device=dev), t5_mask)
