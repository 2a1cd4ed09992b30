"""What the flow-family training tests (FLUX.1, Chroma, SD3, text-encoder LoRA) share: a config from CLI flags, and a
run stopped after a given step (for the stop-and-resume-equals-an-unbroken-run checks)."""
from __future__ import annotations

from typing import Any

from loratrain.core.progress import RecordingReporter, StopFlag


def config_from_args(args: list[str]) -> Any:
    """The CLI's flags as a TrainConfig (switches have no value; a flag with several values, e.g. --network_args a=1 b=2,
    gives a list)."""
    from loratrain.training.config import TrainConfig

    flat: dict[str, Any] = {}
    i = 0
    while i < len(args):
        j = i + 1
        while j < len(args) and not args[j].startswith("--"):
            j += 1
        values = args[i + 1:j]
        flat[args[i][2:]] = True if not values else values[0] if len(values) == 1 else values
        i = j
    return TrainConfig.build(flat)


class StopAt(RecordingReporter):
    """Asks the run to stop once `step` optimizer steps are done (the trainer finishes the step and saves a state)."""

    def __init__(self, stop: StopFlag, step: int = 2) -> None:
        super().__init__()
        self.stop_flag, self.at = stop, step

    def advance(self, n: int = 1, **metrics: Any) -> None:
        super().advance(n, **metrics)
        if metrics and self.step >= self.at:
            self.stop_flag.set()


def run_stopped_at(args: list[str], step: int = 2) -> Any:
    """`loratrain train` in process with these flags, stopped after `step` steps; asserts it stopped there."""
    from loratrain.training.trainer import run_train

    stop = StopFlag()
    result = run_train(config_from_args(args), StopAt(stop, step), stop)
    assert result.stopped and result.global_step == step
    return result
