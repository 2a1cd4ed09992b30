from __future__ import annotations

import argparse

from ..cli import COMMANDS


@COMMANDS.register("tag")
def register(sub: argparse._SubParsersAction) -> None:
    from dataset_tools.tagger.config import TagConfig

    p = sub.add_parser("tag", help="caption a folder of images with a WD14 tagger (ONNX)",
                       description="Writes <image>.txt captions with a SmilingWolf WD tagger. Every written caption is "
                                   "journalled: `loratrain tags undo DIR` restores the previous files.")
    TagConfig.add_arguments(p)
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from dataset_tools.tagger.config import TagConfig
    from dataset_tools.tagger.runner import tag_images

    from ..common.progress import TqdmReporter, ctrl_c_stop

    cfg = TagConfig.from_args(args)
    result = tag_images(cfg, TqdmReporter(cfg.quiet), ctrl_c_stop("after this batch"))
    print(f"provider: {result.provider} | {result.tagged} tagged, {result.written} caption(s) written, "
          f"{result.skipped_existing} skipped (caption exists), {len(result.failed)} unreadable")
    if result.frequency:
        top = ", ".join(f"{t} ({n})" for t, n in result.frequency.most_common(15))
        print(f"most frequent tags: {top}")
    if result.failed:
        print("unreadable images:\n  " + "\n  ".join(result.failed))
    return 130 if result.stopped else 0
