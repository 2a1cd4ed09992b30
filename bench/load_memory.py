"""Peak memory of loading a base model for training, against the size of what training needs.

    python bench/load_memory.py [--family sdxl] [--cache DIR] [--dtype bf16]

Builds a real-layout single-file checkpoint once (real key names and shapes, random fp16 values;
SDXL: 6.9 GB), then loads it in a fresh subprocess each way, alternated:
  ours      `load_model(path, dtype=bf16)`: UNet and text encoders read straight into bf16 one tensor
            at a time, VAE float32 (what `loratrain train --mixed_precision bf16` does)
  baseline  `load_model(path)` (float32) then cast to bf16: how the trainer loaded before, and how a
            plain load-then-cast loader works
Prints each one's peak RSS (VmHWM of the loading process, which includes ~0.4 GB of Python and
torch) as a ratio to the model's size in the training dtypes (UNet + text encoders in bf16, VAE in
fp32). The bar (issue 15): ours <= 1.2.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchutil import build_checkpoint, peak_rss_mib  # noqa: E402


def load(path: str, mode: str, dtype_name: str) -> dict:
    import torch

    from loratrain.core.models.loading import load_model, move
    from loratrain.core.precision import dtype_of

    dtype = dtype_of(dtype_name)
    start = peak_rss_mib()
    t0 = time.perf_counter()
    if mode == "ours":
        model = load_model(path, dtype=dtype)
    else:
        model = load_model(path)
        for m in (model.unet, *model.text_encoders):
            move(m, "cpu", dtype)
    seconds = time.perf_counter() - t0
    parts = [model.unet, *model.text_encoders, model.vae]
    size = sum(p.numel() * p.element_size() for m in parts for p in m.parameters())
    dtypes = sorted({str(p.dtype) for m in (model.unet, *model.text_encoders) for p in m.parameters()})
    assert all(p.dtype == torch.float32 for p in model.vae.parameters())
    return {"peak_mib": peak_rss_mib(), "before_mib": start, "seconds": seconds, "size_mib": size / 2 ** 20, "dtypes": dtypes}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--family", default="sdxl", choices=["sd1", "sd2", "sdxl"])
    ap.add_argument("--dtype", default="bf16", choices=["bf16", "fp16"])
    ap.add_argument("--cache", default=os.path.join(tempfile.gettempdir(), "loratrain-bench"))
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(load(args.child[0], args.child[1], args.dtype)))
        return
    path = Path(args.cache) / f"{args.family}-real-layout.safetensors"
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        print(f"building {path} ...", flush=True)
        build_checkpoint(args.family, path, seed=0)
    print(f"{path.name}: {path.stat().st_size / 2 ** 30:.2f} GiB on disk (fp16)")
    results: dict[str, list[dict]] = {"ours": [], "baseline": []}
    for _ in range(args.rounds):
        for mode in ("ours", "baseline"):
            out = subprocess.run([sys.executable, __file__, "--dtype", args.dtype, "--child", str(path), mode],
                                 capture_output=True, text=True, check=True)
            results[mode].append(json.loads(out.stdout.strip().splitlines()[-1]))
    for mode, runs in results.items():
        best = min(runs, key=lambda r: r["peak_mib"])
        print(f"{mode:9s} peak RSS {best['peak_mib'] / 1024:6.2f} GiB = {best['peak_mib'] / best['size_mib']:.2f} x the model "
              f"in training dtypes ({best['size_mib'] / 1024:.2f} GiB: {'/'.join(best['dtypes'])} + fp32 VAE); "
              f"python+torch before loading {best['before_mib'] / 1024:.2f} GiB; {best['seconds']:.1f} s")
    ours = min(r["peak_mib"] / r["size_mib"] for r in results["ours"])
    print(f"bar: peak RSS <= 1.2 x model size -> {ours:.2f} {'PASS' if ours <= 1.2 else 'FAIL'}")


if __name__ == "__main__":
    main()
