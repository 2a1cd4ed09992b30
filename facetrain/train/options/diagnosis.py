"""Per-face losses and the hard-sample sampler (docs/face-model.md#per-face-diagnosis-and-hard-samples).

The bookkeeping is on by default because it is cheap (a few array writes per step, measured by
bench/face_train.py) and because the question "which faces does the model fail on?" is asked after a run,
when it is too late to switch it on.
"""
from __future__ import annotations

from pydantic import BaseModel

from loratrain.core.config import opt
from loratrain.core.errors import Problem


class DiagnosisOptions(BaseModel):
    face_stats: bool = opt(True, "keep a moving average of each face's src / dst loss and mask difference, saved beside "
                                 "the model as <model_name>.faces.json (read by `loratrain face report`)", group="diagnosis")
    face_stats_decay: float = opt(0.8, "weight of a face's old average each time it is drawn again: "
                                       "new = decay * old + (1 - decay) * loss", ge=0.0, lt=1.0, group="diagnosis")
    hard_sample_power: float = opt(0.0, "hard-sample focus: draw each face with probability proportional to its average "
                                        "loss ** power (0 = uniform, 1 = proportional to the loss, 2 = sharper); "
                                        "needs face_stats", ge=0.0, le=4.0, group="diagnosis")

    def group_problems(self) -> list[Problem]:
        if self.hard_sample_power > 0 and not self.face_stats:
            return [("hard_sample_power", "needs --face_stats (the sampler draws by the per-face losses it keeps)")]
        return []
