from __future__ import annotations

import argparse
from dataclasses import dataclass

from ..cli import COMMANDS
from ..common.config import CommandConfig, ConfigError, opt


@dataclass
class GenerateConfig(CommandConfig):
    model: str = opt("", "base model (diffusers folder or .safetensors)")
    prompt: str = opt("", "prompt")
    negative_prompt: str = opt("", "negative prompt")
    network_weights: list[str] = opt([], "LoRA files, each optionally as PATH:WEIGHT")
    width: int = opt(512, "width")
    height: int = opt(512, "height")
    steps: int = opt(30, "sampling steps")
    cfg_scale: float = opt(7.5, "CFG scale")
    seed: int = opt(0, "seed")
    sampler: str = opt("ddim", "sampler")
    clip_skip: int = opt(1, "clip skip")
    output: str = opt("out.png", "output PNG")
    allow_pickle: bool = opt(False, "allow a pickled .ckpt base model")

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
