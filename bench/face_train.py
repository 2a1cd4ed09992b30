"""Face training speed: iterations/s of our full loop (data workers included) and of the model step alone
on a pre-made batch, side by side in one process, for DF and LIAE, with peak memory.

    python bench/face_train.py                                   # CPU: 128 px, tiny dims, batch 4
    python bench/face_train.py --device cuda --resolution 256 --batch 8 --dims default --precision fp32 bf16 --channels_last

The faces are extracted for real (dlib) from the bundled photos, so decoding, alignment re-crop, colour
transfer and warps all run in the data workers as in training.
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch
from benchutil import peak_memory_mib

from loratrain.core.progress import RecordingReporter
from loratrain.facetrain.demo_data import make_photos
from loratrain.facetrain.extract.config import ExtractConfig
from loratrain.facetrain.extract.extract import run_face_extract
from loratrain.facetrain.train.config import FaceTrainConfig
from loratrain.facetrain.train.data import loader
from loratrain.facetrain.train.trainer import FaceTrainer

DIMS = {"tiny": dict(ae_dims=64, e_dims=16, d_dims=16), "default": dict(ae_dims=256, e_dims=64, d_dims=64)}


def run(cfg: FaceTrainConfig, iters: int, warmup: int) -> dict[str, float]:
    tr = FaceTrainer(cfg, RecordingReporter())
    src, dst = tr.datasets()
    si = iter(loader(src, cfg.batch_size, False, cfg.workers, 0))
    di = iter(loader(dst, cfg.batch_size, False, cfg.workers, 1))
    sync = torch.cuda.synchronize if tr.device.type == "cuda" else (lambda: None)
    for _ in range(warmup):
        tr.step(si, di)
    if tr.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()

    def rate(src_iter, dst_iter) -> float:  # noqa: ANN001
        sync()
        t = time.perf_counter()
        for _ in range(iters):
            tr.step(src_iter, dst_iter)
        sync()
        return iters / (time.perf_counter() - t)

    full = rate(si, di)
    s_batch, d_batch = next(si), next(di)  # the same batch again and again: no data work at all
    alone = rate(iter(lambda: s_batch, None), iter(lambda: d_batch, None))
    return {"full": full, "alone": alone, "peak": peak_memory_mib(tr.device), "params": sum(p.numel() for p in tr.model.parameters()) / 1e6}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--resolution", type=int, default=128)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--dims", choices=list(DIMS), default="tiny")
    ap.add_argument("--archis", nargs="+", default=["df", "liae"])
    ap.add_argument("--precision", nargs="+", default=["fp32"])
    ap.add_argument("--channels_last", action="store_true", help="also run with channels_last")
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        for look, seed in (("src", 0), ("dst", 1)):
            make_photos(root / f"{look}_p", 24, seed, look)
            run_face_extract(ExtractConfig(input=str(root / f"{look}_p"), output_dir=str(root / look), image_size=max(128, args.resolution),
                                        max_faces=1), RecordingReporter())
        print(f"device {args.device} | {args.resolution}px | batch {args.batch} | dims {args.dims} | {args.iters} iterations per run")
        for archi in args.archis:
            for precision in args.precision:
                for cl in ([False, True] if args.channels_last else [False]):
                    fulls, alones, peak, params = [], [], 0.0, 0.0
                    for r in range(args.rounds):
                        cfg = FaceTrainConfig(model_dir=str(root / f"m_{archi}_{precision}_{cl}_{r}"), src_faceset=str(root / "src"),
                                              dst_faceset=str(root / "dst"), archi=archi, resolution=args.resolution,
                                              batch_size=args.batch, precision=precision, channels_last=cl, device=args.device,
                                              workers=args.workers, max_iters=10 ** 9, **DIMS[args.dims])
                        res = run(cfg, args.iters, args.warmup)
                        fulls.append(res["full"])
                        alones.append(res["alone"])
                        peak, params = max(peak, res["peak"]), res["params"]
                    full, alone = statistics.median(fulls), statistics.median(alones)
                    print(f"{archi:5s} {precision} {'channels_last' if cl else 'contiguous':13s} {params:7.1f}M params | "
                          f"full loop {full:7.2f} it/s ({1000 / full:7.1f} ms/it) | model step alone {alone:7.2f} it/s | "
                          f"full/alone {full / alone:.3f} | peak {'GPU' if args.device == 'cuda' else 'RSS'} {peak:,.0f} MiB")


if __name__ == "__main__":
    main()
