"""`loratrain <command>`: each command module registers a parser and calls one library function."""
from __future__ import annotations

import argparse
import os
import sys
from typing import Callable

from .common.config import ConfigError
from .common.registry import Registry

COMMANDS: Registry[Callable[[argparse._SubParsersAction], None]] = Registry("command")


def build_parser() -> argparse.ArgumentParser:
    from .commands import convert, dataset, demo, face, generate, grid, lora, merge, tag, tags, train  # noqa: F401  (each registers itself)

    parser = argparse.ArgumentParser(prog="loratrain", description="Fine-tune SD1/SD2/SDXL with LoRA / LoCon, merge and convert checkpoints, offline.")
    sub = parser.add_subparsers(dest="command", required=True)
    for name in COMMANDS:
        COMMANDS.get(name)(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    args = build_parser().parse_args(argv)
    try:
        return int(args.run(args) or 0)
    except (ConfigError, FileNotFoundError, ValueError, ImportError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
