"""AMP's morph factor, reusing parts of another model, teacher -> student distillation, several processes."""
from __future__ import annotations

from pydantic import BaseModel

from loratrain.core.errors import Problem


class AmpOptions(BaseModel):
    def group_problems(self) -> list[Problem]:
        return []
