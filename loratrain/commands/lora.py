from __future__ import annotations

import argparse

from ..cli import COMMANDS


@COMMANDS.register("lora")
def register(sub: argparse._SubParsersAction) -> None:
    from merge.lora_bake import BakeConfig
    from merge.lora_extract import ExtractConfig
    from merge.lora_merge import LoraMergeConfig

    p = sub.add_parser("lora", help="bake LoRAs into a checkpoint, merge LoRAs, extract a LoRA from two checkpoints")
    actions = p.add_subparsers(dest="lora_command", required=True)
    for name, cfg_cls, text in (
        ("bake", BakeConfig, "bake LoRAs into a checkpoint: W += ratio * up@down * alpha/rank (streamed)"),
        ("merge", LoraMergeConfig, "merge LoRAs into one (concatenate ranks, or SVD to a new rank)"),
        ("extract", ExtractConfig, "extract a LoRA from two checkpoints by SVD (kohya layout)"),
    ):
        q = actions.add_parser(name, help=text, description=text)
        cfg_cls.add_arguments(q)
        q.set_defaults(run=run, lora_config=cfg_cls)


def run(args: argparse.Namespace) -> int:
    from merge.lora_bake import bake_loras
    from merge.lora_extract import extract_lora
    from merge.lora_merge import merge_loras

    cfg = args.lora_config.from_args(args)
    job = {"bake": bake_loras, "merge": merge_loras, "extract": extract_lora}[args.lora_command]
    out = job(cfg)
    print(f"wrote {out}")
    return 0
