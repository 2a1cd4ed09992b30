from __future__ import annotations

import argparse
from pathlib import Path

from ..cli import COMMANDS


@COMMANDS.register("demo")
def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="train a LoRA+LoCon on a tiny built-in model, end to end, offline")
    p.add_argument("--output_dir", default="demo_output", help="where everything is written")
    p.add_argument("--steps", type=int, default=300, help="optimizer steps")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from ..common.progress import TqdmReporter
    from ..demo import run_demo

    root = Path(args.output_dir).resolve()
    result = run_demo(root, args.steps, TqdmReporter())
    first, last = result.losses[: 20], result.losses[-20:]
    print(f"\nloss: first 20 steps avg {sum(first) / len(first):.4f} -> last 20 steps avg {sum(last) / len(last):.4f}")
    print(f"LoRA (kohya layout): {result.lora_path}")
    print(f"training state (resume): {result.state_dir}")
    print(f"samples: {root / 'output' / 'sample'}")
    print(f"TensorBoard logs: {root / 'output' / 'logs'}  (tensorboard --logdir {root / 'output' / 'logs'})")
    return 0
