"""Tagging throughput: our pipeline vs the model alone on pre-made tensors vs a naive one-at-a-time loop.

All three run on the same images, in the same process, interleaved over several rounds (these machines
are noisy); each round gives pipeline/model and naive/model ratios and the medians are reported, with
the peak resident memory seen during each mode. The model is a stand-in with the cost of a real WD
tagger (`--preset vit-b`: ViT-B/16 at 448 px, like wd-vit-tagger-v3), or a real one with `--model DIR`.

    python bench/tagger.py                      # CPU, ViT-B stand-in, 32 JPEGs of 1024x1536
    python bench/tagger.py --device cuda --images 256 --batch 32
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
from benchutil import PeakRss

from loratrain.core.captions import caption_path
from loratrain.core.progress import RecordingReporter
from loratrain.core.safe_io import atomic_write_bytes
from loratrain.dataset_tools.captions import caption_bytes
from loratrain.dataset_tools.synthetic import scene_image
from loratrain.dataset_tools.tagger.config import TagConfig
from loratrain.dataset_tools.tagger.model import TaggerModel, resolve_model_dir
from loratrain.dataset_tools.tagger.postprocess import TagPostprocessor
from loratrain.dataset_tools.tagger.preprocess import load_prepared
from loratrain.dataset_tools.tagger.runner import default_batch_size, default_workers, run_tag
from loratrain.dataset_tools.tagger.tiny import build_tagger

PRESETS = {"vit-b": ("vit", 768, 12), "small": ("conv", 64, 8)}


def make_images(root: Path, n: int, size: tuple[int, int]) -> list[Path]:
    root.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        p = root / f"img{i:04d}.jpg"
        scene_image(i, size).save(p, quality=95)
        paths.append(p)
    return paths


def model_alone(model: TaggerModel, tensors: np.ndarray, batch: int) -> float:
    t = time.perf_counter()
    for i in range(0, len(tensors), batch):
        model(tensors[i:i + batch])
    return len(tensors) / (time.perf_counter() - t)


def pipeline(model: TaggerModel, cfg: TagConfig) -> float:
    t = time.perf_counter()
    res = run_tag(cfg, RecordingReporter(), model=model)
    assert res.tagged and not res.failed
    return res.tagged / (time.perf_counter() - t)


def naive(model: TaggerModel, paths: list[Path], cfg: TagConfig) -> float:
    """What most tagger scripts do: open, preprocess, run, write; one image at a time."""
    post = TagPostprocessor(cfg, model.labels)
    t = time.perf_counter()
    for p in paths:
        probs = model(load_prepared(p, model.size)[None])[0]
        atomic_write_bytes(caption_path(p, ".txt"), caption_bytes(post(probs).tags))
    return len(paths) / (time.perf_counter() - t)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="a real tagger folder (model.onnx + selected_tags.csv) instead of a stand-in")
    ap.add_argument("--preset", choices=list(PRESETS), default="vit-b")
    ap.add_argument("--images", type=int, default=32)
    ap.add_argument("--size", default="1024x1536", help="WxH of the JPEGs")
    ap.add_argument("--batch", type=int, default=0, help="0: the tagger's default for the provider")
    ap.add_argument("--workers", type=int, default=0, help="0: the tagger's default for the provider")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda", "auto"])
    args = ap.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        tmp_path = Path(tmp)
        if args.model:
            model_dir = resolve_model_dir(args.model)
        else:
            kind, width, depth = PRESETS[args.preset]
            names = ["general", "sensitive", "questionable", "explicit"] + [f"tag_{i}" for i in range(9000)]
            # a bias that leaves a few dozen tags per image above 0.35, as a real tagger does
            bias = np.full(len(names), -4.0)
            bias[:4] = 0
            bias[np.random.default_rng(0).choice(np.arange(4, len(names)), 40, replace=False)] = 4.0
            model_dir = build_tagger(tmp_path / "model", names, [9] * 4 + [0] * 9000, bias=bias, kind=kind,
                                     width=width, depth=depth)
        w, h = (int(v) for v in args.size.split("x"))
        paths = make_images(tmp_path / "data", args.images, (w, h))
        model = TaggerModel.open(model_dir, args.device)
        args.batch = args.batch or default_batch_size(model)
        args.workers = args.workers or default_workers(model)
        tensors = np.stack([load_prepared(p, model.size) for p in paths])
        cfg = TagConfig(dataset_dir=str(tmp_path / "data"), model=str(model_dir), existing="overwrite",
                        batch_size=args.batch, workers=args.workers, quiet=True)
        post = TagPostprocessor(cfg, model.labels)
        per_image = [len(post(p).tags) for p in model(tensors[: args.batch])]  # also the warm-up
        print(f"model: {model_dir.name if args.model else args.preset} | provider {model.provider} | "
              f"{args.images} JPEGs {args.size} | batch {args.batch} | workers {args.workers} | "
              f"~{statistics.mean(per_image):.0f} tags/image")
        rates: dict[str, list[float]] = {"model": [], "pipeline": [], "naive": []}
        peaks: dict[str, int] = {k: 0 for k in rates}
        for r in range(args.rounds):
            order = ["model", "pipeline", "naive"] if r % 2 == 0 else ["naive", "pipeline", "model"]
            for mode in order:
                with PeakRss() as rss:
                    if mode == "model":
                        rates[mode].append(model_alone(model, tensors, args.batch))
                    elif mode == "pipeline":
                        rates[mode].append(pipeline(model, cfg))
                    else:
                        rates[mode].append(naive(model, paths, cfg))
                peaks[mode] = max(peaks[mode], rss.peak)
            print(f"round {r + 1}: model {rates['model'][-1]:.2f} img/s | pipeline {rates['pipeline'][-1]:.2f} "
                  f"({rates['pipeline'][-1] / rates['model'][-1]:.3f}) | naive {rates['naive'][-1]:.2f} "
                  f"({rates['naive'][-1] / rates['model'][-1]:.3f})")
        ratio_p = [p / m for p, m in zip(rates["pipeline"], rates["model"])]
        ratio_n = [n / m for n, m in zip(rates["naive"], rates["model"])]
        mib = 1 << 20
        print(f"pipeline / model alone: {statistics.median(ratio_p):.3f} (rounds {min(ratio_p):.3f}-{max(ratio_p):.3f}); "
              f"target >= 0.9")
        print(f"naive    / model alone: {statistics.median(ratio_n):.3f} (rounds {min(ratio_n):.3f}-{max(ratio_n):.3f})")
        print(f"pipeline / naive:       {statistics.median(p / n for p, n in zip(rates['pipeline'], rates['naive'])):.3f}")
        print("peak RSS MiB: " + ", ".join(f"{k} {v / mib:.0f}" for k, v in peaks.items())
              + f" (pre-made tensors for the model-alone run: {tensors.nbytes / mib:.0f} MiB)")


if __name__ == "__main__":
    main()
