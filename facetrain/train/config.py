"""Options of `loratrain face train`, with DeepFaceLab's SAEHD names and meanings (docs/face-model.md#options)."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from loratrain.core.config import JobConfig, opt
from loratrain.core.devices import DEVICES
from loratrain.core.errors import Problem
from loratrain.core.precision import CANONICAL

from ..face_types import FACE_TYPES
from .options import finite_problems
from .options.amp import AmpOptions
from .options.control import ControlOptions
from .options.diagnosis import DiagnosisOptions
from .options.distill import DistillOptions
from .options.plan import PlanOptions

#: the option groups beyond SAEHD's own, each with its `group_problems`
GROUPS = (PlanOptions, DiagnosisOptions, ControlOptions, AmpOptions, DistillOptions)

CT_MODES = ("rct", "lct", "mkl", "idt", "sot")  # facetrain.color registers exactly these (checked by a test)
#: DeepFaceLab's pretrain rules: the options pretraining forces (said in the log when they change a value)
PRETRAIN_SETTINGS: dict[str, Any] = {
    "random_warp": False, "random_src_flip": True, "random_dst_flip": True, "gan_power": 0.0, "true_face_power": 0.0,
    "face_style_power": 0.0, "bg_style_power": 0.0, "lr_dropout": False, "random_hsv_power": 0.0, "uniform_yaw": True,
}


class FaceTrainConfig(DistillOptions, AmpOptions, ControlOptions, DiagnosisOptions, PlanOptions, JobConfig):
    model_dir: str = opt("", "folder of the model (created; an existing model there is resumed)", positional=True, path="output")
    src_faceset: str = opt("", "aligned faces of the person to put in (src)", path="dir")
    dst_faceset: str = opt("", "aligned faces of the video to put them onto (dst)", path="dir")
    model_name: str = opt("face", "file name stem of the saved model (one name, no folder)", path="name")
    archi: str = opt("liae-ud", "df or liae, with modifiers -u -d -t -c (e.g. df-ud, liae-udt), or amp; first run only")
    resolution: int = opt(128, "face resolution (multiple of 16, or 32 with -d / -t); first run only")
    face_type: str = opt("wf", "h, mf, f, wf or head; faces of another type are re-cropped", choices=list(FACE_TYPES))
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
    ct_mode: str = opt("none", "colour transfer of src samples toward random dst samples: none, rct, lct, mkl, idt, sot, "
                               "or random (one of them per sample)", choices=("none", *CT_MODES, "random"))
    optimizer: str = opt("adabelief", "adabelief (DFL's), adamw or rmsprop", registry="loratrain.facetrain.optim:OPTIMIZERS")
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
    precision: str = opt("fp32", "fp32, bf16 or fp16 autocast (GPU)", choices=CANONICAL)
    channels_last: bool = opt(False, "channels-last memory format (faster convolutions on recent GPUs)")
    device: str = opt("auto", "auto, cpu or cuda", choices=DEVICES)
    workers: int = opt(2, "data loader worker processes (0 = in the main process)", ge=0)
    seed: int = opt(0, "random seed")
    quiet: bool = opt(False, "no progress bar")

    def problems(self) -> list[Problem]:
        from ..models.archi import ArchSpec

        out: list[Problem] = []
        try:
            spec = ArchSpec.parse(self.archi)
        except ValueError as e:
            return out + [("archi", str(e))]
        mult = spec.resolution_multiple()
        if self.resolution < mult or self.resolution % mult:
            out.append(("resolution", f"must be a multiple of {mult} for archi {self.archi}"))
        if self.true_face_power and spec.kind != "df":
            out.append(("true_face_power", "works with DF models only (as in DeepFaceLab)"))
        if self.e_dims % 2 or self.d_dims % 2:
            out.append(("e_dims", "e_dims and d_dims must be even"))
        if self.batch_size < 1 or self.gradient_accumulation_steps < 1:
            out.append(("batch_size", "batch_size and gradient_accumulation_steps must be at least 1"))
        finite = [p for group in GROUPS for p in finite_problems(self, group)]  # inf passes ge=0: options/__init__.py
        if finite:
            return out + finite  # the groups' own checks assume finite numbers
        return out + [p for group in GROUPS for p in group.group_problems(self)]

    def requirements(self) -> list[Problem]:
        out: list[Problem] = []
        if not self.model_dir:
            out.append(("model_dir", "is required"))
        if not self.src_faceset or (not self.dst_faceset and not self.pretrain):
            out.append(("src_faceset", "give --src_faceset and --dst_faceset (or --pretrain with --src_faceset)"))
        for name in ("src_faceset", "dst_faceset"):
            folder = getattr(self, name)
            if folder and not Path(folder).is_dir():
                out.append((name, f"faceset folder not found: {folder}"))
        return out

    def effective(self) -> tuple["FaceTrainConfig", list[str]]:
        """The options training really uses, and a note per option a mode (pretrain) changed."""
        if not self.pretrain:
            return self, []
        forced = {k: v for k, v in PRETRAIN_SETTINGS.items() if not (k == "random_warp" and self.pretrain_random_warp)}
        changed = {k: v for k, v in forced.items() if getattr(self, k) != v}
        notes = [f"pretrain sets {k} = {v} (was {getattr(self, k)}), as DeepFaceLab's pretraining does" for k, v in changed.items()]
        return self.model_copy(update=changed), notes

    def arch_config(self) -> Any:
        """The FaceModelConfig these options build (d_mask_dims 0 -> d_dims/3 rounded up to even)."""
        from ..models.archi import FaceModelConfig

        m = self.d_mask_dims or ((self.d_dims // 3 + 1) // 2 * 2)
        return FaceModelConfig(self.archi, self.resolution, self.ae_dims, self.e_dims, self.d_dims, max(2, m))
