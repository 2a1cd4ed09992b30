"""`loratrain generate`: one image from a base model and LoRAs, with the grid's model session."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from loratrain.core.jobs import JobResult, job
from loratrain.core.models.loading import load_model
from loratrain.core.progress import Reporter, StopFlag
from loratrain.core.sampling import SamplePrompt, generate
from loratrain.core.session import ModelSession, lora_use

from .config import GenerateConfig


@dataclass
class GenerateResult(JobResult):
    image: Path | None
    parameters: str = ""

    def summary(self) -> list[str]:
        return [f"wrote {self.image}"] if self.image else ["stopped before the image was made"]


@job
def run_generate(cfg: GenerateConfig, reporter: Reporter, stop: StopFlag) -> GenerateResult:
    """Load the model, apply the LoRAs (kohya or PEFT files) at their weights, sample one image.

    Result: the PNG (with A1111 `parameters`) and its parameter text; the image also reaches the reporter.
    """
    reporter.start(2, "generate", unit="step")
    from loratrain.core.flux_sampling import is_flux_checkpoint
    from loratrain.core.sd3_sampling import SD3Parts, SD3Session, is_sd3_checkpoint

    if is_flux_checkpoint(cfg.model):  # FLUX.1 / SD3: their own samplers and LoRA hooks (core/*_sampling.py)
        from loratrain.core.flux_sampling import FluxParts, FluxSession

        return _generate_flow(cfg, FluxSession(FluxParts.of(cfg)), reporter, stop)
    if is_sd3_checkpoint(cfg.model):
        return _generate_flow(cfg, SD3Session(SD3Parts.of(cfg)), reporter, stop)
    session = ModelSession(load_model, cfg.allow_pickle)
    model = session.ensure(cfg.model)
    reporter.advance(1)
    if stop.is_set():
        return GenerateResult(image=None, stopped=True)
    session.activate([lora_use(v) for v in cfg.network_weights], cfg.sampler)
    prompt = SamplePrompt(cfg.prompt, cfg.negative_prompt, cfg.width, cfg.height, cfg.steps, cfg.cfg_scale, cfg.seed, cfg.sampler)
    made = generate(model, prompt, cfg.output, cfg.sampler, cfg.clip_skip)
    reporter.advance(1)
    reporter.sample([str(made.path)], [cfg.prompt])
    reporter.done("")
    return GenerateResult(image=made.path, parameters=made.parameters)


def _generate_flow(cfg: GenerateConfig, session: Any, reporter: Reporter, stop: StopFlag) -> GenerateResult:
    session.ensure(cfg.model)
    reporter.advance(1)
    if stop.is_set():
        return GenerateResult(image=None, stopped=True)
    session.activate([lora_use(v) for v in cfg.network_weights])
    prompt = SamplePrompt(cfg.prompt, cfg.negative_prompt, cfg.width, cfg.height, cfg.steps, cfg.cfg_scale, cfg.seed,
                          guidance=cfg.guidance)
    made = session.generate(prompt, cfg.output, shift=cfg.shift or None)
    reporter.advance(1)
    reporter.sample([str(made.path)], [cfg.prompt])
    reporter.done("")
    return GenerateResult(image=made.path, parameters=made.parameters)
