"""Per-face losses and the hard-sample sampler."""
from __future__ import annotations

from pydantic import BaseModel

from loratrain.core.errors import Problem


class DiagnosisOptions(BaseModel):
    def group_problems(self) -> list[Problem]:
        return []
