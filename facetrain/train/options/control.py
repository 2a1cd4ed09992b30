"""Finer control: colour-transfer strength, per-part freezes, weight decay, likeness, validation and schedules."""
from __future__ import annotations

from pydantic import BaseModel

from loratrain.core.errors import Problem


class ControlOptions(BaseModel):
    def group_problems(self) -> list[Problem]:
        return []
