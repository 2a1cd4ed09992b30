"""Options of `loratrain face train`, with DeepFaceLab's SAEHD names and meanings (reference §1)."""
from __future__ import annotations

from dataclasses import dataclass

from loratrain.common.config import CommandConfig, ConfigError, opt

from ..face_types import FACE_TYPES
from ..models.archi import ArchSpec, FaceModelConfig
from ..optim import OPTIMIZERS


CT_MODES = ("rct", "lct", "mkl", "idt", "sot")  # facetrain.color registers exactly these (checked by a test)


@dataclass
class FaceTrainConfig(CommandConfig):
    model_dir: str = opt("", "folder of the model (created; an existing model there is resumed)", metadata={"positional": True})
    src_faceset: str = opt("", "aligned faces of the person to put in (src)")
    dst_faceset: str = opt("", "aligned faces of the video to put them onto (dst)")
    model_name: str = opt("face", "file name stem of the saved model")
    archi: str = opt("liae-ud", "df or liae, with modifiers -u -d -t -c (e.g. df-ud, liae-udt); first run only")
    resolution: int = opt(128, "face resolution (multiple of 16, or 32 with -d / -t); first run only")
    face_type: str = opt("wf", "h, mf, f, wf or head; faces of another type are re-cropped", metadata={"choices": list(FACE_TYPES)})
    ae_dims: int = opt(256, "autoencoder bottleneck width")
    e_dims: int = opt(64, "encoder base channels")
    d_dims: int = opt(64, "decoder base channels")
    d_mask_dims: int = opt(0, "mask decoder base channels (0 = d_dims/3 rounded up to even)")
    masked_training: bool = opt(True, "learn only inside the (blurred) face mask")
    eyes_mouth_prio: bool = opt(False, "300x L1 weight on eyes and mouth")
    uniform_yaw: bool = opt(False, "sample faces evenly over 128 yaw bins")
    blur_out_mask: bool = opt(False, "blur the background outside the mask in the targets")
    random_warp: bool = opt(True, "grid-warp the network input (turn off for the sharpening phase)")
    random_hsv_power: float = opt(0.0, "random hue/saturation/value shift of the src input (e.g. 0.05)")
    random_src_flip: bool = opt(False, "random horizontal flips of src (p=0.4)")
    random_dst_flip: bool = opt(True, "random horizontal flips of dst (p=0.4)")
    ct_mode: str = opt("none", "colour transfer of src samples toward random dst samples: none, rct, lct, mkl, idt, sot")
    optimizer: str = opt("adabelief", "adabelief (DFL's), adamw or rmsprop")
    lr: float = opt(5e-5, "learning rate")
    lr_dropout: bool = opt(False, "random sparse updates (30% of weights per step) with a 500-step cosine lr")
    clipgrad: bool = opt(False, "clip the global gradient norm at 1.0")
    batch_size: int = opt(8, "faces per step (each of src and dst)")
    gradient_accumulation_steps: int = opt(1, "steps whose gradients are summed before an update")
    gan_power: float = opt(0.0, "patch discriminator power (e.g. 0.1, after random_warp is off)")
    gan_patch_size: int = opt(0, "discriminator receptive field (0 = resolution/8)")
    gan_dims: int = opt(16, "discriminator base channels")
    true_face_power: float = opt(0.0, "DF only: code discriminator pushing the src code toward dst codes (e.g. 0.01)")
    face_style_power: float = opt(0.0, "0-100: match the swap's colour statistics to dst inside the face")
    bg_style_power: float = opt(0.0, "0-100: match the swap's background to dst")
    pretrain: bool = opt(False, "pretrain on a generic faceset (src and dst); switching it off later resets the inter layers")
    freeze_encoder: bool = opt(False, "do not train the encoder")
    freeze_inter: bool = opt(False, "do not train the inter layer(s) (DF: inter; LIAE: inter_AB and inter_B)")
    freeze_decoder: bool = opt(False, "do not train the face decoder(s) (the mask branch has its own flag)")
    freeze_decoder_mask: bool = opt(False, "do not train the mask branch")
    max_iters: int = opt(1000, "stop after this many iterations (counted across resumes)")
    save_every: int = opt(500, "save every N iterations (and at the end)")
    keep_backups: int = opt(3, "rotating backups of earlier saves kept in backups/")
    preview_every: int = opt(100, "write the preview image every N iterations")
    precision: str = opt("fp32", "fp32, bf16 or fp16 autocast (GPU)", metadata={"choices": ["fp32", "bf16", "fp16"]})
    channels_last: bool = opt(False, "channels-last memory format (faster convolutions on recent GPUs)")
    device: str = opt("auto", "auto, cpu or cuda")
    workers: int = opt(2, "data loader worker processes (0 = in the main process)")
    seed: int = opt(0, "random seed")
    quiet: bool = opt(False, "no progress bar")

    def validate(self) -> None:
        if not self.model_dir:
            raise ConfigError("model_dir is required")
        if not self.src_faceset or (not self.dst_faceset and not self.pretrain):
            raise ConfigError("give --src_faceset and --dst_faceset (or --pretrain with --src_faceset)")
        try:
            spec = ArchSpec.parse(self.archi)
        except ValueError as e:
            raise ConfigError(str(e)) from None
        mult = spec.resolution_multiple()
        if self.resolution < mult or self.resolution % mult:
            raise ConfigError(f"resolution must be a multiple of {mult} for archi {self.archi}")
        if self.ct_mode not in ("none", *CT_MODES):
            raise ConfigError(f"ct_mode must be none or one of {', '.join(CT_MODES)}")
        if self.optimizer not in OPTIMIZERS:
            raise ConfigError(f"optimizer must be one of {', '.join(OPTIMIZERS.names())}")
        if self.true_face_power and spec.kind != "df":
            raise ConfigError("true_face_power works with DF models only (as in DeepFaceLab)")
        if self.e_dims % 2 or self.d_dims % 2:
            raise ConfigError("e_dims and d_dims must be even")
        if self.batch_size < 1 or self.gradient_accumulation_steps < 1:
            raise ConfigError("batch_size and gradient_accumulation_steps must be at least 1")
        if self.pretrain:
            # DeepFaceLab's pretrain rules
            self.random_warp, self.random_src_flip, self.random_dst_flip = False, True, True
            self.gan_power = self.true_face_power = self.face_style_power = self.bg_style_power = 0.0
            self.lr_dropout, self.random_hsv_power, self.uniform_yaw = False, 0.0, True

    def model_config(self) -> FaceModelConfig:
        m = self.d_mask_dims or ((self.d_dims // 3 + 1) // 2 * 2)
        return FaceModelConfig(self.archi, self.resolution, self.ae_dims, self.e_dims, self.d_dims, max(2, m))
