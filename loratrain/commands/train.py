from __future__ import annotations

import argparse
import signal

from ..cli import COMMANDS
from ..common.progress import StopFlag, TqdmReporter
from ..training.config import TrainConfig


@COMMANDS.register("train")
def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="train a LoRA / LoCon", description="Train a LoRA; options use sd-scripts names.")
    TrainConfig.add_arguments(p)
    p.set_defaults(run=run)


def install_ctrl_c(stop: StopFlag) -> None:
    """First Ctrl-C: finish the step, save a resumable state, exit. Second: abort at once."""
    def handler(signum, frame):  # noqa: ANN001
        if stop.is_set():
            raise KeyboardInterrupt
        stop.set()
        print("\nstopping after this step and saving a resumable state (Ctrl-C again to abort)", flush=True)

    signal.signal(signal.SIGINT, handler)


def run(args: argparse.Namespace) -> int:
    from ..training.trainer import train

    cfg = TrainConfig.from_args(args)
    stop = StopFlag()
    install_ctrl_c(stop)
    result = train(cfg, TqdmReporter(), stop)
    return 130 if result.stopped else 0
