"""Staged plans and snapshots: run a recipe's phases, switching on loss thresholds (docs/face-model.md)."""
from __future__ import annotations

from pydantic import BaseModel

from loratrain.core.errors import Problem


class PlanOptions(BaseModel):
    def group_problems(self) -> list[Problem]:
        return []
