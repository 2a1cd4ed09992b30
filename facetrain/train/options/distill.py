"""Teacher -> student distillation: a trained face model's outputs as a second target (docs/face-model.md#distillation).

The recipe trains a slimmer model (fewer dims) against a trained one as well as the ground truth, then trains it
alone. The teacher is checked here, before any work: its resolution and face type must be the student's, since the
two models see the same crops and their outputs are compared pixel for pixel.
"""
from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel

from loratrain.core.config import opt
from loratrain.core.errors import ConfigError, Problem

DISTILL_LOSSES = ("saehd", "mse")


class DistillOptions(BaseModel):
    teacher: str = opt("", "a trained face model (.safetensors) whose outputs the model also learns (distillation); "
                       "same resolution and face type", path="file", group="distillation")
    distill_weight: float = opt(1.0, "weight of the match to the teacher beside the ground truth (0 = ground truth only)",
                                ge=0, group="distillation")
    distill_ratio: float = opt(1.0, "src : dst weight ratio of the match to the teacher (2 = src counts twice dst; "
                               "the swap counts as src)", gt=0, group="distillation")
    distill_loss: str = opt("saehd", "saehd: DSSIM + MSE inside the mask, as the ground truth is learned; mse: plain MSE",
                            choices=DISTILL_LOSSES, group="distillation")
    distill_swap: bool = opt(True, "also match the teacher's swap (dst through the src decoder), which has no ground truth",
                             group="distillation")

    def group_problems(self) -> list[Problem]:
        if not self.teacher:
            return []
        try:
            info = teacher_info(self.teacher)
        except ConfigError as e:
            return [("teacher", str(e))]
        out: list[Problem] = []
        # the student's fields live in FaceTrainConfig, which inherits this class
        s_res, s_type = getattr(self, "resolution", None), getattr(self, "face_type", None)
        model_dir, model_name = getattr(self, "model_dir", ""), getattr(self, "model_name", "face")
        res = info.get("model", {}).get("resolution")
        if s_res is not None and res != s_res:
            out.append(("teacher", f"{self.teacher} is a {res} px model; the student trains at {s_res} px "
                        f"(give --resolution {res}: the outputs are compared pixel for pixel)"))
        ftype = info.get("options", {}).get("face_type")
        if ftype and s_type is not None and ftype != s_type:
            out.append(("teacher", f"{self.teacher} was trained on face type {ftype!r}, the student on {s_type!r}: "
                        f"give --face_type {ftype}"))
        if model_dir and _same_file(Path(model_dir) / f"{model_name}.safetensors", Path(self.teacher)):
            out.append(("teacher", "is the model this run trains (and overwrites); copy it elsewhere or choose another model_dir"))
        return out


def teacher_info(path: str | Path) -> dict:
    """The teacher file's face-model header (architecture, options), read without loading its weights.

    The header is untrusted: its types and sizes, and the file's tensor names and shapes against the model it
    describes, are checked here (train/model_file.py), so a malformed teacher is refused before anything is built."""
    from loratrain.core.paths import confine

    from ..model_file import check_model_file

    p = confine(path, "teacher")
    if not p.is_file():
        raise ConfigError(f"teacher model not found: {path}")
    try:
        info, cfg = check_model_file(p)
    except ConfigError as e:
        raise ConfigError(f"teacher {e}; give a face.safetensors") from None
    return {**info, "model": {**info["model"], "resolution": cfg.resolution}}


def _same_file(a: Path, b: Path) -> bool:
    try:
        return a.exists() and b.exists() and a.samefile(b)
    except OSError:
        return False
