"""Sample images during training, and the TensorBoard log."""
from __future__ import annotations

from pydantic import BaseModel

from loratrain.core.config import opt
from loratrain.core.errors import Problem

from . import LOGS, SAMPLE


class SamplingOptions(BaseModel):
    sample_prompts: str = opt("", "prompt file (.txt with --n --w --h --s --l --d --ss options)", group=SAMPLE, path="file")
    sample_every_n_steps: int = opt(0, "sample every N steps", ge=0, group=SAMPLE)
    sample_every_n_epochs: int = opt(0, "sample every N epochs", ge=0, group=SAMPLE)
    sample_sampler: str = opt("ddim", "sampler for samples", registry="loratrain.core.samplers:SAMPLERS", group=SAMPLE)
    sample_at_first: bool = opt(False, "sample before training", group=SAMPLE)
    logging_dir: str = opt("", "TensorBoard folder (default <output_dir>/logs)", group=LOGS, advanced=True, path="output")

    def problems(self) -> list[Problem]:
        return []

    def requirements(self) -> list[Problem]:
        """The prompt file exists and each sampler it names is known."""
        from ..config_checks import prompt_problems

        return prompt_problems(self) if self.sample_prompts else []
