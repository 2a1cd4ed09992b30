from __future__ import annotations

import argparse
from dataclasses import dataclass

from ..cli import COMMANDS
from ..common.config import ConfigError, opt
from ..common.sampling_options import SamplingOptions


@dataclass
class GenerateConfig(SamplingOptions):
    network_weights: list[str] = opt([], "LoRA files as PATH[:WEIGHT[:BLOCKS]] (BLOCKS: a LoRA block-weight preset or 12/17/20/26 values)")
    output: str = opt("out.png", "output PNG")

    def validate(self) -> None:
        if self.steps < 1:
            raise ConfigError("steps must be at least 1")


@COMMANDS.register("generate")
def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("generate", help="generate an image with a base model and LoRAs")
    GenerateConfig.add_arguments(p)
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from ..generation import generate_image

    cfg = GenerateConfig.from_args(args)
    if not cfg.model or not cfg.prompt:
        raise ConfigError("--model and --prompt are required")
    path = generate_image(cfg)
    print(f"wrote {path}")
    return 0
