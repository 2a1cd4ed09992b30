"""`loratrain convert`: single-file checkpoint <-> diffusers folder, and pickle -> safetensors."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from loratrain.core.jobs import JobResult, job
from loratrain.core.precision import dtype_of
from loratrain.core.progress import Reporter, StopFlag
from loratrain.core.safe_io import new_output

from .config import ConvertConfig


@dataclass
class ConvertResult(JobResult):
    output: Path | None
    family: str = ""

    def summary(self) -> list[str]:
        return ["stopped; nothing was written"] if self.stopped else [f"wrote {self.output} ({self.family})"]


@job
def run_convert(cfg: ConvertConfig, reporter: Reporter, stop: StopFlag) -> ConvertResult:
    """Load with the trainer's loader (every check included), write the other layout atomically.

    Two units: loading, then writing; stop between them writes nothing.
    """
    from loratrain.core.models.loading import load_model
    from loratrain.core.models.tiny import write_diffusers_folder, write_single_file

    target = new_output(cfg.target, cfg.overwrite)
    reporter.start(2, "convert", unit="step")
    model = load_model(cfg.source, allow_pickle=cfg.allow_pickle)
    reporter.advance(1)
    if stop.is_set():
        return ConvertResult(output=None, stopped=True)
    dtype = dtype_of(cfg.save_precision)
    if target.suffix.lower() == ".safetensors":
        write_single_file(model, target, dtype)
    else:
        model.to("cpu", dtype)
        write_diffusers_folder(model, target, replace=cfg.overwrite)  # atomic; replaces only a diffusers folder
    reporter.advance(1)
    reporter.done("")
    return ConvertResult(output=target, family=model.family.name)
