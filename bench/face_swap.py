"""Face swap throughput: the whole pipeline against the model's predict alone on the same faces (the ceiling).

    python bench/face_swap.py [--frames 48] [--resolution 128] [--size 256] [--device auto]

Builds a generated clip (still camera, the bundled photo re-coloured, a tone as audio) and an untrained
DF-UD model of DeepFaceLab's default size (speed does not depend on the weights), then, side by side in one
run: (1) predict alone on the aligned faces of every frame, batched as the swap batches them; (2) the whole
`face swap` (decode, detect, align, predict, merge, label, encode) with detection; (3) the same with the faces
taken from a dst faceset extracted beforehand (DFL's way). Prints frames/s, the ratio to the ceiling (target
>= 0.7) and the peak RSS.
"""
from __future__ import annotations

import argparse
import json
import resource
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np


def build_model(path: Path, resolution: int) -> None:
    import torch

    from loratrain.core.safe_io import save_safetensors
    from loratrain.facetrain.models.archi import FaceModelConfig
    from loratrain.facetrain.models.archi import build_model as build
    from loratrain.facetrain.train.state import CONFIG_KEY

    torch.manual_seed(0)
    cfg = FaceModelConfig("df-ud", resolution, 256, 64, 64, 22)
    model = build(cfg)
    info = {"model": asdict(cfg), "options": {"face_type": "wf"}, "iteration": 0}
    save_safetensors({k: v.contiguous() for k, v in model.state_dict().items()}, path, {CONFIG_KEY: json.dumps(info)})


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--frames", type=int, default=48)
    ap.add_argument("--resolution", type=int, default=128)
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--batch_size", type=int, default=8)
    ap.add_argument("--device", default="auto")
    args = ap.parse_args()

    from loratrain.core.progress import NullReporter
    from loratrain.facetrain.demo_data import make_clip
    from loratrain.facetrain.extract.config import ExtractConfig
    from loratrain.facetrain.extract.extract import run_face_extract
    from loratrain.facetrain.faceset import list_faces, read_meta
    from loratrain.facetrain.swap.compose import prepare
    from loratrain.facetrain.swap.config import SwapConfig
    from loratrain.facetrain.swap.media import open_source
    from loratrain.facetrain.swap.predict import load_predictor
    from loratrain.facetrain.swap.run import run_face_swap

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        clip = make_clip(root / "clip.mp4", frames=args.frames, fps=25, size=args.size)
        model = root / "face.safetensors"
        build_model(model, args.resolution)
        run_face_extract(ExtractConfig(input=str(clip), output_dir=str(root / "dst"), image_size=args.resolution, max_faces=1,
                                       upsample=0), NullReporter())
        faces = {read_meta(p).source_filename.split("#")[1]: read_meta(p).source_landmarks for p in list_faces(root / "dst")}
        source = open_source(clip)
        frames = {i: rgb for i, rgb in source.frames(0, 0)}
        crops = np.stack([prepare(frames[int(k)][..., ::-1].astype(np.float32) / 255, np.asarray(lm), args.resolution, "wf").dst
                          for k, lm in sorted(faces.items())])
        predictor = load_predictor(model, args.device)
        predictor.predict(crops[:args.batch_size])  # warm-up
        t = time.perf_counter()
        for i in range(0, len(crops), args.batch_size):
            predictor.predict(crops[i:i + args.batch_size])
        ceiling = len(crops) / (time.perf_counter() - t)

        rows = []
        for label, kw in (("swap, detecting faces", {}), ("swap, faces from a dst faceset", {"dst_faceset": str(root / "dst")})):
            out = root / f"out_{len(rows)}.mp4"
            cfg = SwapConfig(input=str(clip), model=str(model), output=str(out), batch_size=args.batch_size, device=args.device,
                             segment_frames=max(args.frames, 48), **kw)
            t = time.perf_counter()
            res = run_face_swap(cfg, NullReporter())
            fps = res.frames / (time.perf_counter() - t)
            rows.append((label, fps, res.faces))
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"clip {args.frames} frames {args.size}x{args.size}, model df-ud {args.resolution} px (ae 256, e 64, d 64), "
          f"batch {args.batch_size}, {len(crops)} faces")
    print(f"{'predict alone (ceiling)':34s} {ceiling:7.2f} faces/s")
    for label, fps, n in rows:
        print(f"{label:34s} {fps:7.2f} frames/s  ratio to ceiling {fps / ceiling:.2f}  ({n} faces)")
    print(f"peak RSS {peak:.0f} MiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
