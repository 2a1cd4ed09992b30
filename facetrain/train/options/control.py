"""Finer control: colour-transfer strength, per-part freezes, weight decay, likeness, validation and schedules
(docs/face-model.md#finer-control)."""
from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel

from loratrain.core.config import opt
from loratrain.core.errors import Problem

GROUP = "finer control"


class ControlOptions(BaseModel):
    ct_power: float = opt(1.0, "colour-transfer strength: the recoloured src sample mixed with the original "
                               "(0 = no transfer, 1 = the mode's output)", ge=0, le=1, group=GROUP)
    freeze_parts: str = opt("", "comma list of model parts not to train, named as the model's modules: encoder, "
                                "encoder.body.N, inter (DF), inter_AB, inter_B (LIAE), decoder_src, decoder_dst (DF), "
                                "decoder (LIAE), decoder_mask (every mask branch), or any module path such as "
                                "decoder_src.res", group=GROUP)
    weight_decay: float | None = opt(None, "AdamW's decoupled weight decay (default 0.01; 0 = none). AdaBelief and "
                                           "RMSprop (DFL's) have none: a value with them is refused", ge=0, group=GROUP)
    likeness_patience: int = opt(0, "warn when the likeness score has not beaten its best for this many previews "
                                    "(0 = off)", ge=0, group=GROUP)
    likeness_recognizer: str = opt("", "an ArcFace-style face recogniser .onnx of yours for the likeness score "
                                       "(cosine distance); empty: dlib's face embedding", path="file", group=GROUP)
    validation_faces: float = opt(0.0, "faces held out of training from src (and dst) for a validation loss: "
                                       "a count (>= 1) or a share (below 1); 0 = none", ge=0, group=GROUP)
    validation_every: int = opt(100, "validation loss every N iterations (with validation_faces)", ge=1, group=GROUP)
    early_stopping_patience: int = opt(0, "end the run when the validation loss has not improved for this many "
                                          "checks (0 = off; needs validation_faces)", ge=0, group=GROUP)
    lr_schedule: str = opt("constant", "constant, or cosine: decays lr to 0 at max_iters after the warmup",
                           choices=("constant", "cosine"), group=GROUP)
    lr_warmup_iters: int = opt(0, "linear lr warmup from 0 over this many iterations", ge=0, group=GROUP)

    def group_problems(self) -> list[Problem]:
        out: list[Problem] = []
        if self.likeness_recognizer and not Path(self.likeness_recognizer).is_file():
            out.append(("likeness_recognizer", f"recogniser file not found: {self.likeness_recognizer}"))
        optimizer = getattr(self, "optimizer", "adamw")
        if self.weight_decay is not None and self.weight_decay > 0 and optimizer != "adamw":
            out.append(("weight_decay", f"optimizer {optimizer} has no weight decay (DeepFaceLab's has none); use "
                                        "--optimizer adamw, or leave weight_decay unset"))
        if self.early_stopping_patience and not self.validation_faces:
            out.append(("early_stopping_patience", "needs held-out faces: set --validation_faces"))
        if self.validation_faces >= 1 and self.validation_faces != int(self.validation_faces):
            out.append(("validation_faces", "a count of faces (a whole number) or a share below 1"))
        max_iters = getattr(self, "max_iters", 0)
        if self.lr_schedule == "cosine" and self.lr_warmup_iters >= max_iters > 0:
            out.append(("lr_warmup_iters", f"the warmup ({self.lr_warmup_iters}) must end before max_iters ({max_iters})"))
        if self.freeze_parts.strip():
            out += self._part_problems()
        return out

    def _part_problems(self) -> list[Problem]:
        """Unknown part names are refused before any work, against the saved model's archi when there is one
        (archi is a first-run option: the options' value may not be the model's)."""
        from ..control import part_names_problem, saved_archi

        model_dir, name = getattr(self, "model_dir", ""), getattr(self, "model_name", "face")
        archi = getattr(self, "archi", "liae-ud")
        if model_dir:
            archi = saved_archi(Path(model_dir) / f"{name}.safetensors") or archi
        problem = part_names_problem(self.freeze_parts, archi)
        return [("freeze_parts", problem)] if problem else []
