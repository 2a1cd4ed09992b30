from __future__ import annotations

import argparse

from ..cli import COMMANDS


@COMMANDS.register("convert")
def register(sub: argparse._SubParsersAction) -> None:
    from merge.convert import ConvertConfig

    p = sub.add_parser("convert", help="single-file checkpoint <-> diffusers folder",
                       description="Convert SD1/SD2/SDXL between an LDM single file (.safetensors) and a diffusers folder.")
    ConvertConfig.add_arguments(p)
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from merge.convert import ConvertConfig, convert

    out = convert(ConvertConfig.from_args(args))
    print(f"wrote {out}")
    return 0
