"""Face training speed: iterations/s of our full loop (data workers included) and of the model step alone
on a pre-made batch, side by side in one process, for DF and LIAE, with peak memory.

    python bench/face_train.py                                   # CPU: 128 px, tiny dims, batch 4
    python bench/face_train.py --device cuda --resolution 256 --batch 8 --dims default --precision fp32 bf16 --channels_last

Then, per archi, the per-face diagnosis (the moving averages booked every step) and the hard-sample sampler
(--hard_sample_power) as a share of the step time: timed directly inside a run that has both, and as a whole loop
with both against one without, interleaved round by round in the same process (the bar: at most 3%). The
sampler is also timed on a 20,000-face table, where its one cumulative sum per step costs most.

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

SCALE_FACES = 20_000
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


def diagnosis_cost(cfg: FaceTrainConfig, iters: int, warmup: int, rounds: int) -> dict[str, float]:
    """Per-step cost of the per-face bookkeeping and of the hard-sample sampler, against the step time."""
    import numpy as np

    from loratrain.facetrain.train.diagnosis import FaceStatsWatcher, FaceTable, HardFaceSampler
    from loratrain.facetrain.train.trainer import FaceTrainResult

    rec = RecordingReporter()
    plain = FaceTrainer(cfg.model_copy(update={"model_dir": cfg.model_dir + "_plain", "face_stats": False}), rec)
    diag = FaceTrainer(cfg.model_copy(update={"model_dir": cfg.model_dir + "_diag", "hard_sample_power": 1.0}), rec)
    for tr in (plain, diag):
        tr.src, tr.dst = tr.datasets()
    watcher = FaceStatsWatcher(diag, rec)
    watcher.start(diag, FaceTrainResult(), None)  # builds the tables the hard sampler of diag.loader reads
    batches = {id(tr): (iter(tr.loader(tr.src, 0)), iter(tr.loader(tr.dst, 1))) for tr in (plain, diag)}
    sync = torch.cuda.synchronize if plain.device.type == "cuda" else (lambda: None)
    booked = [0.0]

    def steps(tr: FaceTrainer, n: int) -> float:
        sync()
        t = time.perf_counter()
        for _ in range(n):
            logs = tr.step(*batches[id(tr)])
            if tr is diag:
                t0 = time.perf_counter()
                watcher.after_step(tr, logs)
                booked[0] += time.perf_counter() - t0
        sync()
        return time.perf_counter() - t

    for tr in (plain, diag):
        steps(tr, warmup)
    booked[0] = 0.0
    spent = {"plain": 0.0, "diag": 0.0}
    for r in range(rounds):  # interleaved, the order swapped each round
        for key, tr in ((("plain", plain), ("diag", diag)) if r % 2 == 0 else (("diag", diag), ("plain", plain))):
            spent[key] += steps(tr, iters)
    n = iters * rounds

    def sampler_ms(table: FaceTable, repeat: int) -> float:
        """One update of the table per step (as training makes) and a batch drawn on each side."""
        draws = iter(HardFaceSampler(table, 1.0, 0))
        t = time.perf_counter()
        for _ in range(repeat):
            table.version += 1  # what an update does to the sampler: its sums are rebuilt
            for _ in range(2 * cfg.batch_size):
                next(draws)
        return (time.perf_counter() - t) / repeat * 1000

    sampler = sampler_ms(watcher.tables["src"], 200)
    big = FaceTable([f"{i}.jpg" for i in range(SCALE_FACES)])
    rng = np.random.default_rng(1)
    big.update(np.arange(SCALE_FACES), rng.random(SCALE_FACES), rng.random(SCALE_FACES), 0.8, 1)
    t = time.perf_counter()
    for it in range(200):
        idx = rng.integers(SCALE_FACES, size=cfg.batch_size)
        big.update(idx, rng.random(cfg.batch_size), rng.random(cfg.batch_size), 0.8, it)
    big_book = (time.perf_counter() - t) / 200 * 1000
    big_sampler = sampler_ms(big, 50)
    return {"step_ms": spent["diag"] / n * 1000, "book_ms": booked[0] / n * 1000, "sampler_ms": sampler,
            "plain_its": n / spent["plain"], "diag_its": n / spent["diag"], "big_ms": big_book + big_sampler,
            "faces": len(diag.src)}


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
    ap.add_argument("--no-diagnosis", dest="diagnosis", action="store_false",
                    help="skip the per-face diagnosis / hard-sample cost lines")
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
        if args.diagnosis:
            for archi in args.archis:
                cfg = FaceTrainConfig(model_dir=str(root / f"d_{archi}"), src_faceset=str(root / "src"), dst_faceset=str(root / "dst"),
                                      archi=archi, resolution=args.resolution, batch_size=args.batch, precision=args.precision[0],
                                      device=args.device, workers=args.workers, max_iters=10 ** 9, **DIMS[args.dims])
                d = diagnosis_cost(cfg, args.iters, args.warmup, max(2, args.rounds))
                share = (d["book_ms"] + d["sampler_ms"]) / d["step_ms"] * 100
                print(f"per-face diagnosis {archi}: bookkeeping {d['book_ms']:.3f} ms + hard-sample sampler {d['sampler_ms']:.3f} ms "
                      f"per step = {share:.2f}% of {d['step_ms']:.1f} ms/it ({d['faces']} faces; bar 3%) | "
                      f"{SCALE_FACES:,}-face table: {d['big_ms']:.3f} ms per step = {d['big_ms'] / d['step_ms'] * 100:.2f}%")
                print(f"per-face diagnosis {archi}: loop with diagnosis + hard samples {d['diag_its']:.2f} it/s, without "
                      f"{d['plain_its']:.2f} it/s (interleaved, same process): {(d['plain_its'] / d['diag_its'] - 1) * 100:+.1f}% "
                      "step time (noise included)")


if __name__ == "__main__":
    main()
