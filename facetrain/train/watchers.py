"""Things that follow a face training run without being part of its maths: per-face bookkeeping, a plan's end
rule, validation and early stopping, likeness warnings. The loop calls each at fixed points; any call may
return a reason to end the run, and the loop then saves and returns with that reason in `result.ended_by`.

A feature adds its watcher in `watchers_for`, one line, so the loop itself never grows a branch per feature.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from loratrain.core.progress import Reporter

    from .trainer import FaceTrainer, FaceTrainResult


class Watcher:
    """Base: every hook does nothing. `state()` is stored in the model file's info under the watcher's `name` and
    handed back to `restore()` on resume, so what a watcher counts survives a stop."""

    name = ""

    def start(self, trainer: FaceTrainer, result: FaceTrainResult, writer: Any) -> None:
        """Before the first step (datasets exist: `trainer.src`, `trainer.dst`)."""

    def after_step(self, trainer: FaceTrainer, logs: dict[str, float]) -> str | None:
        """After every iteration (`trainer.last_faces`, `trainer.last_per_sample` hold its faces and losses)."""
        return None

    def after_preview(self, trainer: FaceTrainer, likeness: float | None, logs: dict[str, float]) -> str | None:
        """After each preview (every `preview_every`), with the likeness score when there is one."""
        return None

    def state(self) -> dict:
        return {}

    def restore(self, state: dict) -> None:
        """`state` comes from a file: check what is read."""

    def finish(self, trainer: FaceTrainer, result: FaceTrainResult) -> None:
        """After the last save (also when stopped or ended by a rule)."""


def watchers_for(trainer: FaceTrainer, reporter: Reporter) -> list[Watcher]:
    """The watchers the options ask for (each feature adds its own line here)."""
    out: list[Watcher] = []
    if trainer.cfg.init_from:
        from ..parts import InitFromWatcher

        out.append(InitFromWatcher(reporter))  # first: copies parts of another model before anything reads the weights
    from .amp_hooks import AmpWatcher

    out.append(AmpWatcher())  # AMP models: the morph factor and DFL's dst background term
    from .control import control_watchers

    out += control_watchers(trainer, reporter)  # face grow's lock, likeness curve and warning, validation + early stop
    if trainer.cfg.teacher and trainer.cfg.distill_weight > 0:
        from .distill import DistillWatcher

        out.append(DistillWatcher())  # loads the teacher, adds the distillation loss term
    from .diagnosis import diagnosis_watchers

    out += diagnosis_watchers(trainer, reporter)  # per-face losses (and the table the hard-sample sampler reads)
    return out
