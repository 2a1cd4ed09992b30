"""Face swap throughput: the whole pipeline against the model's predict alone on the same faces (the ceiling).

    python bench/face_swap.py [--frames 48] [--resolution 128] [--size 256] [--device auto]

Builds a generated clip (still camera, the bundled photo re-coloured, a tone as audio) and an untrained
DF-UD model of DeepFaceLab's default size (speed does not depend on the weights), then, side by side in one
run: (1) predict alone on the aligned faces of every frame, batched as the swap batches them; (2) the whole
`face swap` (decode, detect, align, predict, merge, label, encode) with detection; (3) the same with the faces
taken from a dst faceset extracted beforehand (DFL's way). Prints frames/s, the ratio to the ceiling (target
>= 0.7) and the peak RSS.

    python bench/face_swap.py --swapper [--frames 48] [--swapper_base 128] [--swapper_blocks 6]

The same for `face swap --swapper` instead: a randomly initialised identity-injection generator at inswapper's
crop (128 px, batch fixed to 1 as inswapper's file has it; --dynamic_batch for a free one; base 128 gives 512
channels in its six style blocks at 32 x 32, half inswapper's width, so a quarter of its cost there) and the stand-in
recogniser (swapper/arch.py), two source photos; the ceiling is onnxruntime alone on the aligned 128 px crops of
every frame, run the way the swap runs them (one by one for a fixed batch of 1, else in --batch_size chunks).
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
    ap.add_argument("--swapper", action="store_true", help="bench `face swap --swapper` instead of a DFL-style model")
    ap.add_argument("--swapper_base", type=int, default=128, help="generator channels of the first level")
    ap.add_argument("--swapper_blocks", type=int, default=6, help="generator style blocks")
    ap.add_argument("--dynamic_batch", action="store_true", help="a swapper with a free batch dimension (else fixed 1)")
    args = ap.parse_args()
    if args.swapper:
        return swapper_main(args)

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


def swapper_main(args: argparse.Namespace) -> int:
    from loratrain.core.progress import NullReporter
    from loratrain.facetrain.demo_data import make_clip, make_photos
    from loratrain.facetrain.extract.config import ExtractConfig
    from loratrain.facetrain.extract.extract import run_face_extract
    from loratrain.facetrain.faceset import list_faces, read_meta
    from loratrain.facetrain.swap.config import SwapConfig
    from loratrain.facetrain.swap.media import open_source
    from loratrain.facetrain.swap.run import run_face_swap
    from loratrain.facetrain.swap.swapper_predict import _batched
    from loratrain.facetrain.swapper.align import align_crop, five_points
    from loratrain.facetrain.swapper.arch import GeneratorSpec, build_generator_onnx, build_recognizer_onnx
    from loratrain.facetrain.swapper.contract import read_contract
    from loratrain.facetrain.swapper.onnx_file import ort_session, read_onnx

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        clip = make_clip(root / "clip.mp4", frames=args.frames, fps=25, size=args.size)
        spec = GeneratorSpec(128, args.swapper_base, args.swapper_blocks, batch="N" if args.dynamic_batch else 1)
        swapper = build_generator_onnx(root / "swapper.onnx", spec, seed=0)
        recognizer = build_recognizer_onnx(root / "recognizer.onnx", seed=0)
        make_photos(root / "person", 2, 0, "src")
        run_face_extract(ExtractConfig(input=str(clip), output_dir=str(root / "dst"), image_size=256, max_faces=1, upsample=0),
                         NullReporter())
        faces = {read_meta(p).source_filename.split("#")[1]: read_meta(p).source_landmarks for p in list_faces(root / "dst")}
        frames = {i: rgb for i, rgb in open_source(clip).frames(0, 0)}
        model, runtime = read_onnx(swapper, "swapper")
        contract = read_contract(model)
        crops = np.stack([align_crop(frames[int(k)].astype(np.float32) / 255, five_points(np.asarray(lm)), contract.template,
                                     contract.size)[0] for k, lm in sorted(faces.items())])
        session = ort_session(swapper, "swapper", runtime)
        source = contract.latent(np.random.default_rng(0).normal(size=contract.embed))

        def alone(chunk: np.ndarray) -> None:
            target = contract.to_input(chunk)

            def run(t: np.ndarray, s: np.ndarray) -> np.ndarray:
                return session.run([contract.output], {contract.target: t, contract.source: s})[0]

            _batched(run, target, contract.batch, np.repeat(source, len(chunk), 0))

        def measure() -> float:
            t = time.perf_counter()
            for i in range(0, len(crops), args.batch_size):
                alone(crops[i:i + args.batch_size])
            return len(crops) / (time.perf_counter() - t)

        alone(crops[:args.batch_size])  # warm-up
        ceilings = [measure()]  # measured again after the swaps: the best of the two (a shared machine's load varies)

        class Clock(NullReporter):
            """When each frame was written: the rate after the first batch leaves out the one-off loading (from the
            first batch's last frame to the last frame: whole batches predicted and written, none of them counted twice)."""

            def __init__(self) -> None:
                self.times: list[float] = []

            def advance(self, n: int = 1, **metrics: float) -> None:
                self.times.append(time.perf_counter())

        rows = []
        for label, kw in (("swap, swapper, detecting faces", {}), ("swap, swapper, faces from a dst faceset",
                                                                   {"dst_faceset": str(root / "dst")})):
            cfg = SwapConfig(input=str(clip), swapper=str(swapper), source=[str(root / "person")], recognizer=str(recognizer),
                             output=str(root / f"out_{len(rows)}.mp4"), batch_size=args.batch_size, device=args.device,
                             segment_frames=max(args.frames, 48), **kw)
            clock = Clock()
            t = time.perf_counter()
            res = run_face_swap(cfg, clock)
            b = min(args.batch_size, len(clock.times) - 1)
            steady = (len(clock.times) - b) / (clock.times[-1] - clock.times[b - 1]) if b > 0 else 0.0
            rows.append((label, res.frames / (time.perf_counter() - t), res.faces, steady))
        ceilings.append(measure())
        ceiling = max(ceilings)
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"clip {args.frames} frames {args.size}x{args.size}, swapper {spec.resolution} px (base {spec.base}, {spec.blocks} "
          f"blocks, batch {spec.batch}), stand-in recogniser, swap batch {args.batch_size}, {len(crops)} faces")
    print(f"{'predict alone (ceiling)':40s} {ceiling:7.2f} faces/s  (the swapper in onnxruntime on its aligned crops)")
    for label, fps, n, steady in rows:
        print(f"{label:40s} {fps:7.2f} frames/s  ratio to ceiling {fps / ceiling:.2f}  ({n} faces; after the first batch "
              f"{steady:.2f} frames/s, ratio {steady / ceiling:.2f})")
    print(f"peak RSS {peak:.0f} MiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
