"""`loratrain <command>`: the parser is generated from the job table; every command runs the same way.

parse -> check the job's optional extras -> merge TOML and flags, validate once -> run the job with a
console reporter and a Ctrl-C stop flag -> print its summary -> exit with its code. Every user or
environment error (bad option, missing file, disk full, a file where a folder should be) ends as one
line naming the path and what to do, exit 2; `LORATRAIN_DEBUG=1` shows the traceback instead.
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Any

from .core.jobs import describe_error, is_user_error
from .jobs import GROUPS, JOBS, JobSpec, missing_extras


def _parser(parent: Any, name: str, help_text: str, description: str = "") -> argparse.ArgumentParser:
    return parent.add_parser(name, help=help_text, description=description or help_text, allow_abbrev=False)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="loratrain", allow_abbrev=False,
                                     description="Fine-tune SD1/SD2/SDXL with LoRA / LoCon, prepare datasets, merge and "
                                                 "convert checkpoints, train face models: offline.")
    root = parser.add_subparsers(dest="command", required=True)
    specs = [JOBS.get(name) for name in JOBS]
    ui = _parser(root, "ui", "the web app: a page per tool (pip install 'loratrain[ui]')",
                 "Serves the Gradio app on 127.0.0.1 (another address needs --auth); every path it takes must lie "
                 "inside the workspace roots (--root, default the current folder).")
    from loratrain.ui.config import UiConfig

    UiConfig.add_arguments(ui)
    ui.set_defaults(job=None)
    _add_level(root, specs, ())
    return parser


def _add_level(subparsers: Any, specs: list[JobSpec], prefix: tuple[str, ...]) -> None:
    """One level of commands under `prefix`: `face` holds `face swap`, and `face xseg` holds `face xseg train`.
    A word can be a job and a group at once (`demo` runs, `demo face` too)."""
    heads: dict[str, list[JobSpec]] = {}
    for spec in specs:
        heads.setdefault(spec.path[len(prefix)], []).append(spec)
    for head, members in heads.items():
        path = (*prefix, head)
        leaf = next((s for s in members if s.path == path), None)
        deeper = [s for s in members if len(s.path) > len(path)]
        if leaf is not None:
            p = _parser(subparsers, head, leaf.help, leaf.description)
            _add_job(p, leaf)
        else:
            words = sorted({s.path[len(path)] for s in deeper})
            p = _parser(subparsers, head, GROUPS.get(" ".join(path), " / ".join(words)))
        if deeper:
            words = list(dict.fromkeys(s.path[len(path)] for s in deeper))
            ops = p.add_subparsers(dest="_".join(path) + "_op", required=leaf is None, metavar="{" + ",".join(words) + "}")
            _add_level(ops, deeper, path)


def _add_job(parser: argparse.ArgumentParser, spec: JobSpec) -> None:
    spec.config_class().add_arguments(parser, fixed=set(spec.fixed))
    parser.set_defaults(job=spec)


def run_job(spec: JobSpec, args: argparse.Namespace) -> int:
    from .console import ConsoleReporter, ctrl_c_stop, quiet_irrelevant_library_messages

    quiet_irrelevant_library_messages()
    hint = missing_extras(spec)
    if hint:
        raise ImportError(hint)
    cfg = spec.config_class().from_args(args, fixed=spec.fixed)
    stop = ctrl_c_stop(spec.stop_when)
    # under torchrun / accelerate launch only the first process talks; the others' errors still reach stderr
    if os.environ.get("RANK", "0") == "0":
        reporter = ConsoleReporter(quiet=bool(getattr(cfg, "quiet", False)))
    else:
        from loratrain.core.progress import NullReporter

        reporter = NullReporter()
    result = spec.run_function()(cfg, reporter, stop)
    return result.exit_code


def run_ui(args: argparse.Namespace) -> int:
    import importlib.util

    from loratrain.ui.config import UiConfig

    if importlib.util.find_spec("gradio") is None:
        raise ImportError("the app needs gradio: pip install 'loratrain[ui]'")
    from loratrain.ui.app import serve

    serve(UiConfig.from_args(args))
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.job is None:
            return run_ui(args)
        return run_job(args.job, args)
    except KeyboardInterrupt:
        print("\naborted", file=sys.stderr)
        return 130
    except Exception as e:
        if os.environ.get("LORATRAIN_DEBUG") or not is_user_error(e):
            raise
        for line in describe_error(e).splitlines():
            print(f"error: {line}", file=sys.stderr)
        return 2
