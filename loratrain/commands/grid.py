from __future__ import annotations

import argparse

from ..cli import COMMANDS
from ..grid.config import GridConfig


@COMMANDS.register("grid")
def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("grid", help="XY(Z) comparison grid of checkpoints, LoRAs, weights and sampling settings",
                       description="Values: a,b,c (CSV) or on numeric axes 1-5, 1-5 (+2), 0-1 [5].")
    GridConfig.add_arguments(p)
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from ..common.progress import TqdmReporter, ctrl_c_stop
    from ..grid.runner import run_grid

    stop = ctrl_c_stop("after the current cell")
    result = run_grid(GridConfig.from_args(args), TqdmReporter(), stop)
    return 0 if result.complete else 130
