"""Options of `loratrain face xseg train | apply | remove | undo` (light to import: no torch, no OpenCV)."""
from __future__ import annotations

from loratrain.core.config import JobConfig, opt
from loratrain.core.devices import DEVICES
from loratrain.core.errors import Problem

from ..face_types import FACE_TYPES


class XSegTrainConfig(JobConfig):
    faceset: str = opt("", "aligned faces, some labelled with include/exclude polygons (src, or any)", positional=True,
                       path="dir")
    model: str = opt("", "the segmenter's .safetensors file (created; an existing one there is resumed)", positional=True,
                     path="output")
    dst_faceset: str = opt("", "a second faceset whose labelled faces are trained on too (dst)", path="dir")
    iterations: int = opt(3000, "train until this iteration (a resumed run continues to it)", ge=1)
    batch_size: int = opt(8, "faces per step", ge=1, le=256)
    lr: float = opt(1e-4, "Adam learning rate (DFL's XSeg uses 1e-4)", gt=0, le=1)
    holdout: int = opt(0, "labelled faces kept out of training to measure IoU (0 = a tenth of them, at least 1 when "
                          "there are 5 or more)", ge=0)
    resolution: int = opt(256, "segmenter resolution (DFL's XSeg: 256); first run only", ge=32, le=1024, group="model")
    base_channels: int = opt(32, "channels of the first level; first run only", ge=4, le=128, group="model")
    depth: int = opt(6, "halvings in the U-Net (resolution must divide by 2^depth); first run only", ge=2, le=8,
                     group="model")
    face_type: str = opt("", "crop faces to this type (empty: the faceset's own)", choices=["", *FACE_TYPES], group="model")
    random_warp: bool = opt(True, "grid-warp and shift / rotate / scale the samples", group="augmentation")
    random_flip: bool = opt(True, "horizontal flips", group="augmentation")
    random_color: bool = opt(True, "brightness, contrast and hue jitter", group="augmentation")
    random_blur: bool = opt(True, "random Gaussian or motion blur", group="augmentation")
    random_occluders: bool = opt(True, "paste pieces of other faces (with their labels) over the face: teaches the mask "
                                       "to leave out what covers it", group="augmentation")
    save_every: int = opt(500, "save the model every N iterations", ge=1, group="saving")
    preview_every: int = opt(100, "preview predicted masks on unlabelled faces and measure held-out IoU every N "
                                  "iterations", ge=1, group="saving")
    keep_backups: int = opt(3, "rotating backups of the model kept beside it", ge=0, group="saving")
    seed: int = opt(0, "random seed", group="saving")
    device: str = opt("auto", "auto, cpu, cuda, mps", choices=list(DEVICES))
    workers: int = opt(1, "prepare the next batch in a background thread while one trains (0: no thread)", ge=0, le=1)

    def requirements(self) -> list[Problem]:
        out: list[Problem] = [(name, "is required") for name in ("faceset", "model") if not getattr(self, name)]
        if self.model and not self.model.lower().endswith(".safetensors"):
            out.append(("model", "must end in .safetensors"))
        if self.resolution % (2 ** self.depth):
            out.append(("resolution", f"must be divisible by 2^depth = {2 ** self.depth}"))
        return out


class XSegApplyConfig(JobConfig):
    faceset: str = opt("", "the faceset whose masks are written", positional=True, path="dir")
    model: str = opt("", "a segmenter from `face xseg train`", positional=True, path="file")
    batch_size: int = opt(16, "faces per forward pass", ge=1, le=1024)
    keep_labels: bool = opt(True, "hand-labelled faces get their polygons' mask, not the prediction")
    device: str = opt("auto", "auto, cpu, cuda, mps", choices=list(DEVICES))

    def requirements(self) -> list[Problem]:
        return [(name, "is required") for name in ("faceset", "model") if not getattr(self, name)]


class XSegRemoveConfig(JobConfig):
    faceset: str = opt("", "the faceset whose XSeg masks are removed (the polygons stay)", positional=True, path="dir")
    only_applied: bool = opt(False, "remove only masks written by `face xseg apply` (keep ones imported from DeepFaceLab)")

    def requirements(self) -> list[Problem]:
        return [("faceset", "is required")] if not self.faceset else []


class XSegUndoConfig(JobConfig):
    faceset: str = opt("", "the faceset whose newest `xseg apply` or `xseg remove` is undone", positional=True, path="dir")

    def requirements(self) -> list[Problem]:
        return [("faceset", "is required")] if not self.faceset else []
