"""DeepFaceLab's AMP model (docs/face-model.md#amp): one encoder, two inters, one decoder shared by src and dst.

Structure (DFL `models/Model_AMP/Model.py`): the encoder is the `t` encoder (five halvings to R/32, 8e
channels), pixel-normed over the flattened output, then a dense layer to `ae_dims`; each inter is a single
dense layer to L*L*ae_dims (L = R/32) reshaped to L x L, no upscale; the decoder is the `-udt` decoder
(four Upscale + residual stages, 8d 8d 4d 2d, four output convolutions and a depth-to-space; a mask branch of
8m 8m 4m 2m m). So AMP has no modifiers: its spec is fixed at u, d, t, and the encoder body, every inter's
`dense2` and the decoder share their names and shapes with a `df-udt` model of the same sizes, which is what
lets `--init_from` move parts between the two (facetrain/parts.py).

Codes: in training the src code takes each channel from inter_src(src) with probability `morph_factor` and
from inter_dst(src) otherwise (one draw per sample and channel); dst's code is inter_dst(dst). The swap
takes the first floor(ae_dims * morph_value) channels from inter_src(dst) and the rest from inter_dst(dst)
(DFL slices the channels; it does not blend values), so morph 1 is inter_src's code alone and morph 0 is
dst's own reconstruction code. The dst mask is the decoder's mask of inter_dst(dst).
"""
from __future__ import annotations

import torch
from torch import nn

from .archi import ARCHITECTURES, Decoder, Encoder, FaceAutoencoder, FaceModelConfig
from .blocks import _init

#: DFL's default and the range its prompt allows
MORPH_FACTOR_DEFAULT = 0.33
MORPH_FACTOR_RANGE = (0.1, 0.5)


class AmpEncoder(Encoder):
    """The `t` encoder body, pixel norm, then DFL's `dense1` (which SAEHD keeps in its inter instead)."""

    def __init__(self, e_ch: int, spec, in_features: int, ae_ch: int) -> None:  # noqa: ANN001
        super().__init__(e_ch, spec)
        self.dense = _init(nn.Linear(in_features, ae_ch))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dense(super().forward(x))


class AmpInter(nn.Module):
    """One dense layer to L*L*c, reshaped (named `dense2` as in DF's inter, so the two exchange weights)."""

    def __init__(self, ae_ch: int, out_ch: int, lowest: int) -> None:
        super().__init__()
        self.lowest, self.out_ch = lowest, out_ch
        self.dense2 = _init(nn.Linear(ae_ch, lowest * lowest * out_ch))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dense2(x).view(-1, self.out_ch, self.lowest, self.lowest)


def morph_mix(src_code: torch.Tensor, dst_code: torch.Tensor, morph: float | torch.Tensor) -> torch.Tensor:
    """DFL's swap code: channels [0, floor(C * morph)) from `src_code`, the rest from `dst_code`.

    Written as a channel mask (channel c is src's when c + 1 <= C * morph, the same test as c < floor(C * morph)
    for whole c) rather than a slice, so an exported graph keeps `morph` as an input; torch.where copies values
    exactly. `morph` is clamped to 0..1 (DFL's slice is undefined outside)."""
    channels = src_code.shape[1]
    if not isinstance(morph, torch.Tensor):  # a tensor (the exported input) stays in the traced graph
        morph = torch.tensor(float(morph))
    m = morph.to(src_code.device, torch.float32).reshape(-1)[:1].clamp(0, 1)  # float32 as DFL, whatever autocast does
    index = torch.arange(1, channels + 1, dtype=torch.float32, device=src_code.device)
    take_src = (index <= m * channels).view(1, channels, 1, 1)
    return torch.where(take_src, src_code, dst_code)


class AMP(FaceAutoencoder):
    inter_names = ("inter_src", "inter_dst")
    decoder_names = ("decoder",)
    #: the only spec AMP has (ArchSpec.parse refuses modifiers for it)
    fixed_modifiers = "udt"
    #: the swap's default morph (SwapConfig's default too); `swap(x, morph)` overrides it per call
    morph_value: float = 1.0
    #: probability that a src code channel comes from inter_src in training (set from --morph_factor)
    morph_factor: float = MORPH_FACTOR_DEFAULT

    def __init__(self, cfg: FaceModelConfig) -> None:
        super().__init__(cfg)
        self.encoder = AmpEncoder(cfg.e_dims, self.spec, self.enc_features, cfg.ae_dims)
        self.inter_src = AmpInter(cfg.ae_dims, cfg.ae_dims, self.lowest)
        self.inter_dst = AmpInter(cfg.ae_dims, cfg.ae_dims, self.lowest)
        self.decoder = Decoder(cfg.ae_dims, cfg.d_dims, cfg.d_mask_dims, self.spec)

    def train_forward(self, src: torch.Tensor, dst: torch.Tensor) -> dict[str, torch.Tensor]:
        src_feat, dst_feat = self.encoder(src), self.encoder(dst)
        src_s, src_d = self.inter_src(src_feat), self.inter_dst(src_feat)
        dst_s, dst_d = self.inter_src(dst_feat), self.inter_dst(dst_feat)
        pick = torch.bernoulli(torch.full((src_s.shape[0], src_s.shape[1], 1, 1), float(self.morph_factor),
                                          device=src_s.device, dtype=src_s.dtype))
        src_code = src_s * pick + src_d * (1 - pick)
        out = {"src_code": src_code, "dst_code": dst_d}
        out["src"], out["src_mask"] = self.decoder(src_code)
        out["dst"], out["dst_mask"] = self.decoder(dst_d)
        out["swap"], out["swap_mask"] = self.decoder(morph_mix(dst_s, dst_d, self.morph_value))
        return out

    def swap(self, dst: torch.Tensor, morph: float | torch.Tensor | None = None
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        feat = self.encoder(dst)
        code_s, code_d = self.inter_src(feat), self.inter_dst(feat)
        face, face_mask = self.decoder(morph_mix(code_s, code_d, self.morph_value if morph is None else morph))
        _, dst_mask = self.decoder(code_d)
        return face, face_mask, dst_mask


ARCHITECTURES.register("amp")(AMP)
