from __future__ import annotations

import argparse

from ..cli import COMMANDS
from ..common.progress import TqdmReporter, ctrl_c_stop
from ..training.config import TrainConfig


@COMMANDS.register("train")
def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="train a LoRA / LoCon", description="Train a LoRA; options use sd-scripts names.")
    TrainConfig.add_arguments(p)
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from ..training.trainer import train

    cfg = TrainConfig.from_args(args)
    stop = ctrl_c_stop("after this step and saving a resumable state")
    result = train(cfg, TqdmReporter(), stop)
    return 130 if result.stopped else 0
