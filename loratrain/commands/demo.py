from __future__ import annotations

import argparse
from pathlib import Path

from ..cli import COMMANDS


@COMMANDS.register("demo")
def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="train a LoRA+LoCon on a tiny built-in model (or `demo face`), end to end, offline")
    p.add_argument("what", nargs="?", default="lora", choices=["lora", "face"],
                   help="lora (default) or face: extract, align and train a face model on bundled photos")
    p.add_argument("--output_dir", default=None, help="where everything is written (default demo_output / demo_face)")
    p.add_argument("--steps", type=int, default=None, help="optimizer steps (default 300; face: 400 iterations)")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from ..common.progress import TqdmReporter

    if args.what == "face":
        return run_face(args)
    from ..demo import run_demo

    root = Path(args.output_dir or "demo_output").resolve()
    result = run_demo(root, args.steps or 300, TqdmReporter())
    first, last = result.losses[: 20], result.losses[-20:]
    print(f"\nloss: first 20 steps avg {sum(first) / len(first):.4f} -> last 20 steps avg {sum(last) / len(last):.4f}")
    print(f"LoRA (kohya layout): {result.lora_path}")
    print(f"training state (resume): {result.state_dir}")
    print(f"samples: {root / 'output' / 'sample'}")
    print(f"TensorBoard logs: {root / 'output' / 'logs'}  (tensorboard --logdir {root / 'output' / 'logs'})")
    return 0


def run_face(args: argparse.Namespace) -> int:
    from facetrain import require_extras

    require_extras("cv2", "dlib", "skimage", "onnx")
    from facetrain.demo import run_face_demo

    from ..common.progress import TqdmReporter

    root = Path(args.output_dir or "demo_face").resolve()
    res = run_face_demo(root, args.steps or 400, TqdmReporter())
    print(f"\nfaces: {res.src_faces} src + {res.dst_faces} dst extracted and aligned")
    print(f"loss (src+dst): first 20 iterations avg {res.first:.4f} -> last 20 avg {res.last:.4f}")
    print(f"model: {res.model_path}\nONNX (.dfm contract): {res.onnx_path}")
    print(f"preview (src | pred src | dst | pred dst | swap): {res.preview_path}")
    return 0
