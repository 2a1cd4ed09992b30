from __future__ import annotations

import argparse

from ..cli import COMMANDS


@COMMANDS.register("merge")
def register(sub: argparse._SubParsersAction) -> None:
    from merge.config import MergeConfig

    p = sub.add_parser(
        "merge", help="merge two or three checkpoints (weighted sum / add difference, optional block weights)",
        description="Streaming checkpoint merge. w is always the share of model B: "
                    "weighted_sum = A*(1-w) + B*w, add_difference = A + (B-C)*w.")
    MergeConfig.add_arguments(p)
    p.add_argument("--list_presets", action="store_true", help="print the block-weight presets and exit")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from merge.checkpoint import merge_checkpoints
    from merge.config import MergeConfig
    from merge.presets import merge_presets

    if args.list_presets:
        for name, values in sorted(merge_presets().items()):
            print(f"{name:28s} {','.join(f'{v:.3g}' for v in values)}")
        return 0
    merge_checkpoints(MergeConfig.from_args(args))
    return 0
