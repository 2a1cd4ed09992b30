"""Staged plans and snapshots: run a recipe's phases, switching on loss thresholds (docs/face-model.md#staged-plans)."""
from __future__ import annotations

from pydantic import BaseModel

from loratrain.core.config import opt
from loratrain.core.errors import Problem


class PlanOptions(BaseModel):
    plan: str = opt("", "plan TOML: ordered phases, each with the options it changes and an end rule "
                        "(configs/face_plans/); resumes in the phase a stop left", path="file", group="plan")
    plan_restart: bool = opt(False, "start the plan from its first phase even if the model is mid-way through it",
                             group="plan")
    pretrain_faceset: str = opt("", "generic faceset a plan's pretrain phases train on (default: src_faceset)",
                                path="dir", group="plan")
    pretrain_random_warp: bool = opt(False, "keep random_warp on while pretraining (the MULAN recipe); "
                                            "DeepFaceLab turns it off", group="plan")
    keep_inter: bool = opt(False, "when pretraining ends, keep the inter layer(s) instead of re-initialising them "
                                  "(the recipe calls deleting them optional: kept, the swap blends more with dst)",
                           group="plan")

    def group_problems(self) -> list[Problem]:
        return []
