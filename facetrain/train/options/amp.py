"""AMP's morph factor and reusing parts of another model at a first run (docs/face-model.md#amp)."""
from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel

from loratrain.core.config import opt
from loratrain.core.errors import ConfigError, Problem


class AmpOptions(BaseModel):
    morph_factor: float = opt(0.33, "AMP: share of each src code's channels taken from inter_src while training (DFL's "
                                    "default 0.33; smaller = more src-like expressions)", ge=0.1, le=0.5, group="amp")
    init_from: str = opt("", "first run only: copy parts of this face model (.safetensors) into the new one, where "
                             "the shapes fit (SAEHD <-> AMP); the log names every layer not copied", path="file",
                         group="reuse")
    init_parts: str = opt("encoder,inter,decoder", "the parts --init_from copies: a comma list of encoder, inter, decoder",
                          group="reuse")

    def group_problems(self) -> list[Problem]:
        out: list[Problem] = []
        if self.init_from:
            from ...parts import parse_parts

            if not Path(self.init_from).is_file():
                out.append(("init_from", f"model file not found: {self.init_from}"))
            try:
                parse_parts(self.init_parts)
            except ConfigError as e:
                out.append(("init_parts", str(e).partition(": ")[2]))
        return out
