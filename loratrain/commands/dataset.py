from __future__ import annotations

import argparse

from ..cli import COMMANDS


@COMMANDS.register("dataset")
def register(sub: argparse._SubParsersAction) -> None:
    from dataset_tools.frames import FramesConfig
    from dataset_tools.prepare import PrepareConfig
    from dataset_tools.quality.config import CheckConfig

    p = sub.add_parser("dataset", help="prepare repeat folders, check quality, extract video frames")
    ops = p.add_subparsers(dest="dataset_op", required=True)
    prep = ops.add_parser("prepare", help="build <repeats>_<tokens> folders and the dataset TOML",
                          description="Repeats are balanced so repeats x images is about equal across concepts.")
    PrepareConfig.add_arguments(prep)
    prep.set_defaults(run=run_prepare)
    check = ops.add_parser("check", help="report corrupt, small, blurred, duplicate images and caption problems",
                           description="Prints a table (and --json_output); --quarantine DIR moves flagged files, "
                                       "never deletes them. Exit code 1 when an error-level finding remains.")
    CheckConfig.add_arguments(check)
    check.set_defaults(run=run_check)
    frames = ops.add_parser("frames", help="extract frames from a video, dropping near-duplicates and blurred ones")
    FramesConfig.add_arguments(frames)
    frames.set_defaults(run=run_frames)


def run_prepare(args: argparse.Namespace) -> int:
    from dataset_tools.prepare import PrepareConfig, prepare_dataset

    from ..common.progress import TqdmReporter

    result = prepare_dataset(PrepareConfig.from_args(args), TqdmReporter())
    for c in result.concepts + ([result.reg] if result.reg else []):
        print(f"{c.folder}: {len(c.images)} image(s) x {c.repeats} repeats = {len(c.images) * c.repeats}")
    if result.missing_captions:
        print(f"warning: {len(result.missing_captions)} image(s) have no caption; their folder's tokens will be used "
              f"(first: {result.missing_captions[0]})")
    print(f"dataset config: {result.toml}\ntrain with: loratrain train --dataset_config {result.toml} ...")
    return 0


def run_check(args: argparse.Namespace) -> int:
    from dataset_tools.quality.config import CheckConfig
    from dataset_tools.quality.report import check_dataset, format_table

    from ..common.progress import TqdmReporter

    cfg = CheckConfig.from_args(args)
    report = check_dataset(cfg, TqdmReporter(cfg.quiet))
    print(format_table(report))
    moved = {m["from"] for m in report.moved}
    remaining = [f for f in report.findings if f.severity == "error" and f.path not in moved]
    return 1 if remaining else 0


def run_frames(args: argparse.Namespace) -> int:
    from dataset_tools.frames import FramesConfig, extract_frames

    from ..common.progress import TqdmReporter, ctrl_c_stop

    cfg = FramesConfig.from_args(args)
    res = extract_frames(cfg, TqdmReporter(cfg.quiet), ctrl_c_stop("after this frame"))
    print(f"{res.extracted} frame(s) extracted, {len(res.kept)} kept in {cfg.output_dir}, "
          f"{res.dropped_duplicate} near-duplicate(s) and {res.dropped_blurry} blurred frame(s) dropped")
    return 0
