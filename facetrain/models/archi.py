"""Encoder / Inter / Decoder and the DF and LIAE wiring (docs/face-model.md#architecture).

`archi` strings are DFL's: `df` or `liae`, optionally `-` and any of u (pixel-normed code), d (half-res
decoder with a depth-to-space output), t (deeper encoder / decoder), c (x*cos(x) activations); or `amp`
(DFL's AMP model, in models/amp.py, whose structure is fixed).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from loratrain.core.registry import Registry

from .blocks import Downscale, ResidualBlock, Upscale, _init, pixel_norm


@dataclass(frozen=True)
class ArchSpec:
    kind: str
    u: bool = False
    d: bool = False
    t: bool = False
    c: bool = False

    @classmethod
    def parse(cls, archi: str) -> "ArchSpec":
        kind, _, mods = archi.lower().partition("-")
        if kind not in ARCHITECTURES:
            raise ValueError(f"unknown archi {archi!r}: use df or liae, optionally with -u, -d, -t, -c (e.g. liae-ud), "
                             "or amp")
        fixed = getattr(ARCHITECTURES.get(kind), "fixed_modifiers", None)
        if fixed is not None:  # a model with one structure (AMP): no modifiers to choose
            if mods:
                raise ValueError(f"archi {archi!r}: {kind} takes no modifiers (its structure is fixed)")
            mods = fixed
        bad = set(mods) - set("udtc")
        if bad:
            raise ValueError(f"archi {archi!r}: unknown modifier(s) {''.join(sorted(bad))}; allowed: u d t c")
        return cls(kind, "u" in mods, "d" in mods, "t" in mods, "c" in mods)

    def resolution_multiple(self) -> int:
        return 32 if self.d or self.t else 16


class Encoder(nn.Module):
    def __init__(self, e_ch: int, spec: ArchSpec) -> None:
        super().__init__()
        c = spec.c
        if spec.t:
            self.body = nn.Sequential(Downscale(3, e_ch, c), ResidualBlock(e_ch, c), Downscale(e_ch, e_ch * 2, c),
                                      Downscale(e_ch * 2, e_ch * 4, c), Downscale(e_ch * 4, e_ch * 8, c),
                                      Downscale(e_ch * 8, e_ch * 8, c), ResidualBlock(e_ch * 8, c))
        else:
            chans = [3] + [e_ch * min(2 ** i, 8) for i in range(4)]
            self.body = nn.Sequential(*[Downscale(a, b, c) for a, b in zip(chans, chans[1:])])
        self.out_ch = e_ch * 8
        self.u = spec.u

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.flatten(self.body(x), 1)
        return pixel_norm(x) if self.u else x


class Inter(nn.Module):
    def __init__(self, in_features: int, ae_ch: int, out_ch: int, lowest: int, spec: ArchSpec) -> None:
        super().__init__()
        self.lowest, self.out_ch = lowest, out_ch
        self.dense1 = nn.Linear(in_features, ae_ch)
        self.dense2 = nn.Linear(ae_ch, lowest * lowest * out_ch)
        self.upscale = None if spec.t else Upscale(out_ch, out_ch, spec.c)
        _init(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.dense2(self.dense1(x)).view(-1, self.out_ch, self.lowest, self.lowest)
        return self.upscale(x) if self.upscale is not None else x


class Decoder(nn.Module):
    def __init__(self, in_ch: int, d_ch: int, m_ch: int, spec: ArchSpec) -> None:
        super().__init__()
        c = spec.c
        main = [d_ch * 8, d_ch * 8, d_ch * 4, d_ch * 2] if spec.t else [d_ch * 8, d_ch * 4, d_ch * 2]
        mask = [m_ch * 8, m_ch * 8, m_ch * 4, m_ch * 2] if spec.t else [m_ch * 8, m_ch * 4, m_ch * 2]
        if spec.d:
            mask.append(m_ch)
        self.ups = nn.ModuleList(Upscale(a, b, c) for a, b in zip([in_ch] + main[:-1], main))
        self.res = nn.ModuleList(ResidualBlock(b, c) for b in main)
        self.upms = nn.ModuleList(Upscale(a, b, c) for a, b in zip([in_ch] + mask[:-1], mask))
        self.d = spec.d
        if spec.d:
            self.out = nn.ModuleList([nn.Conv2d(main[-1], 3, 1)] + [nn.Conv2d(main[-1], 3, 3, padding=1) for _ in range(3)])
        else:
            self.out = nn.ModuleList([nn.Conv2d(main[-1], 3, 1)])
        self.out_mask = nn.Conv2d(mask[-1], 1, 1)
        _init(self)

    def forward(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = z
        for up, res in zip(self.ups, self.res):
            x = res(up(x))
        if self.d:
            x = nn.functional.pixel_shuffle(torch.cat([conv(x) for conv in self.out], 1), 2)
        else:
            x = self.out[0](x)
        m = z
        for up in self.upms:
            m = up(m)
        return torch.sigmoid(x), torch.sigmoid(self.out_mask(m))


@dataclass
class FaceModelConfig:
    archi: str = "liae-ud"
    resolution: int = 128
    ae_dims: int = 256
    e_dims: int = 64
    d_dims: int = 64
    d_mask_dims: int = 22


class FaceAutoencoder(nn.Module):
    """Shared pieces of DF and LIAE; subclasses wire the codes."""

    inter_names: tuple[str, ...] = ()
    decoder_names: tuple[str, ...] = ()

    def __init__(self, cfg: FaceModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.spec = ArchSpec.parse(cfg.archi)
        mult = self.spec.resolution_multiple()
        if cfg.resolution % mult:
            raise ValueError(f"resolution {cfg.resolution} must be a multiple of {mult} for archi {cfg.archi}")
        self.encoder = Encoder(cfg.e_dims, self.spec)
        enc_res = cfg.resolution // (32 if self.spec.t else 16)
        self.enc_features = enc_res * enc_res * self.encoder.out_ch
        self.lowest = cfg.resolution // (32 if self.spec.d else 16)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The swap, as exported: (face in src's likeness, its mask, the dst mask)."""
        return self.swap(x)


class DF(FaceAutoencoder):
    inter_names = ("inter",)
    decoder_names = ("decoder_src", "decoder_dst")

    def __init__(self, cfg: FaceModelConfig) -> None:
        super().__init__(cfg)
        self.inter = Inter(self.enc_features, cfg.ae_dims, cfg.ae_dims, self.lowest, self.spec)
        self.decoder_src = Decoder(cfg.ae_dims, cfg.d_dims, cfg.d_mask_dims, self.spec)
        self.decoder_dst = Decoder(cfg.ae_dims, cfg.d_dims, cfg.d_mask_dims, self.spec)

    def train_forward(self, src: torch.Tensor, dst: torch.Tensor) -> dict[str, torch.Tensor]:
        src_code, dst_code = self.inter(self.encoder(src)), self.inter(self.encoder(dst))
        out = {"src_code": src_code, "dst_code": dst_code}
        out["src"], out["src_mask"] = self.decoder_src(src_code)
        out["dst"], out["dst_mask"] = self.decoder_dst(dst_code)
        out["swap"], out["swap_mask"] = self.decoder_src(dst_code)
        return out

    def swap(self, dst: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        code = self.inter(self.encoder(dst))
        face, face_mask = self.decoder_src(code)
        _, dst_mask = self.decoder_dst(code)
        return face, face_mask, dst_mask


class LIAE(FaceAutoencoder):
    inter_names = ("inter_AB", "inter_B")
    decoder_names = ("decoder",)

    def __init__(self, cfg: FaceModelConfig) -> None:
        super().__init__(cfg)
        self.inter_AB = Inter(self.enc_features, cfg.ae_dims, cfg.ae_dims * 2, self.lowest, self.spec)
        self.inter_B = Inter(self.enc_features, cfg.ae_dims, cfg.ae_dims * 2, self.lowest, self.spec)
        self.decoder = Decoder(cfg.ae_dims * 4, cfg.d_dims, cfg.d_mask_dims, self.spec)

    def train_forward(self, src: torch.Tensor, dst: torch.Tensor) -> dict[str, torch.Tensor]:
        src_ab = self.inter_AB(self.encoder(src))
        dst_feat = self.encoder(dst)
        dst_ab, dst_b = self.inter_AB(dst_feat), self.inter_B(dst_feat)
        src_code = torch.cat([src_ab, src_ab], 1)
        dst_code = torch.cat([dst_b, dst_ab], 1)
        swap_code = torch.cat([dst_ab, dst_ab], 1)
        out = {"src_code": src_code, "dst_code": dst_code}
        out["src"], out["src_mask"] = self.decoder(src_code)
        out["dst"], out["dst_mask"] = self.decoder(dst_code)
        out["swap"], out["swap_mask"] = self.decoder(swap_code)
        return out

    def swap(self, dst: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        feat = self.encoder(dst)
        ab, b = self.inter_AB(feat), self.inter_B(feat)
        face, face_mask = self.decoder(torch.cat([ab, ab], 1))
        _, dst_mask = self.decoder(torch.cat([b, ab], 1))
        return face, face_mask, dst_mask


ARCHITECTURES: Registry[type[FaceAutoencoder]] = Registry("face architecture")
ARCHITECTURES.register("df")(DF)
ARCHITECTURES.register("liae")(LIAE)
from . import amp  # noqa: E402,F401  (registers "amp"; it builds on the classes above)


def build_model(cfg: FaceModelConfig) -> FaceAutoencoder:
    return ARCHITECTURES.get(ArchSpec.parse(cfg.archi).kind)(cfg)
