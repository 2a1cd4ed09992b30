"""XSeg speed: training iterations/s of `face xseg train` against the bare model step, and `face xseg apply`
faces/s against the plain forward pass, side by side in one process, with peak memory.

    python bench/xseg.py                                 # CPU: DFL's size (256 px, 32 channels, depth 6)
    python bench/xseg.py --device cuda --faces 512 --batch 32
    python bench/xseg.py --resolution 64 --base 8 --depth 4 --faces 16 --iters 4   # a quick look

Training: our loop (augmentation in the prefetch thread, Adam, Dice + BCE) against the same model's forward,
backward and Adam step on one pre-made batch. Apply: the whole job (decode each face, crop, predict, warp the
mask back, encode it, rewrite the face's metadata atomically, journal) against the segmenter's forward pass
alone on pre-cropped faces in memory, at the same batch size. The bar for apply is 0.8 of the forward pass.

The faces are extracted for real (dlib) from the bundled photos, copied with noise to `--faces` faces, half of
them labelled with their landmark hull, in a temporary folder removed afterwards.
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np
import torch
from benchutil import peak_memory_mib

from loratrain.core.progress import NullReporter, RecordingReporter
from loratrain.facetrain.demo_data import make_photos
from loratrain.facetrain.extract.config import ExtractConfig
from loratrain.facetrain.extract.extract import run_face_extract
from loratrain.facetrain.faceset import list_faces, load_face, save_face
from loratrain.facetrain.landmarks import hull_mask
from loratrain.facetrain.xseg.apply import run_xseg_apply
from loratrain.facetrain.xseg.config import XSegApplyConfig, XSegTrainConfig
from loratrain.facetrain.xseg.data import crop_face
from loratrain.facetrain.xseg.model import XSegNet, XSegSpec, save_xseg, to_input
from loratrain.facetrain.xseg.polys import INCLUDE, Poly, set_face_polys
from loratrain.facetrain.xseg.train import run_xseg_train


def make_faceset(folder: Path, n: int, side: int) -> None:
    photos = folder.parent / "photos"
    make_photos(photos, 4, seed=3)
    run_face_extract(ExtractConfig(input=str(photos), output_dir=str(folder), image_size=side, max_faces=1), RecordingReporter())
    seeds = list_faces(folder)
    rng = np.random.default_rng(0)
    for k in range(n):
        img, meta = load_face(seeds[k % len(seeds)])
        noisy = np.clip(img.astype(np.float32) + rng.normal(0, 4, img.shape), 0, 255).astype(np.uint8)
        path = save_face(folder / f"face_{k:05d}.jpg", noisy, meta)
        if k % 2 == 0:
            hull = (hull_mask(img.shape[:2], meta.landmarks_array()) > 0.5).astype(np.uint8)
            contour = max(cv2.findContours(hull, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)[0], key=len)
            set_face_polys(path, [Poly(INCLUDE, contour[:, 0].astype(float).tolist())])
    for p in seeds:
        p.unlink()


def bare_step_rate(spec: XSegSpec, batch: int, iters: int, device: torch.device) -> float:
    model = XSegNet(spec).to(device).train()
    opt = torch.optim.Adam(model.parameters(), 1e-4)
    x = torch.rand(batch, 3, spec.resolution, spec.resolution, device=device)
    y = (torch.rand(batch, 1, spec.resolution, spec.resolution, device=device) > 0.5).float()

    def step() -> None:
        loss = torch.nn.functional.binary_cross_entropy_with_logits(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()

    step()
    sync(device)
    t = time.perf_counter()
    for _ in range(iters):
        step()
    sync(device)
    return iters / (time.perf_counter() - t)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def train_rate(faceset: Path, model: Path, spec: XSegSpec, batch: int, iters: int, device: str) -> float:
    """Iterations/s of the real loop, timed from the first to the last step (model build and loading excluded)."""
    cfg = XSegTrainConfig(faceset=str(faceset), model=str(model), iterations=iters + 1, batch_size=batch,
                          resolution=spec.resolution, base_channels=spec.base, depth=spec.depth, save_every=10**6,
                          preview_every=10**6, device=device, workers=1)
    times: list[float] = []

    class Clock(NullReporter):
        def advance(self, n: int = 1, **metrics: float) -> None:
            times.append(time.perf_counter())

    run_xseg_train(cfg, Clock())
    model.unlink(missing_ok=True)
    return (len(times) - 1) / (times[-1] - times[0])


def forward_rate(faceset: Path, model_path: Path, batch: int, device: torch.device) -> float:
    from loratrain.facetrain.xseg.model import load_xseg

    model = load_xseg(model_path)[0].to(device)
    spec = model.spec
    crops = []
    for p in list_faces(faceset):
        img, meta = load_face(p)
        crops.append(crop_face(img, meta, spec.resolution, spec.face_type).astype(np.float32) / 255)
    x = to_input(np.stack(crops), spec.resolution)
    with torch.inference_mode():
        model(x[:batch].to(device))
        sync(device)
        t = time.perf_counter()
        for i in range(0, len(x), batch):
            torch.sigmoid(model(x[i:i + batch].to(device)))[:, 0].cpu().numpy()
        sync(device)
    return len(x) / (time.perf_counter() - t)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--resolution", type=int, default=256)
    ap.add_argument("--base", type=int, default=32)
    ap.add_argument("--depth", type=int, default=6)
    ap.add_argument("--faces", type=int, default=64, help="faces in the set (half labelled)")
    ap.add_argument("--side", type=int, default=256, help="stored face size in px")
    ap.add_argument("--batch", type=int, default=8, help="training batch and apply batch")
    ap.add_argument("--iters", type=int, default=10, help="training iterations timed")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    device = torch.device(args.device)
    spec = XSegSpec(args.resolution, args.base, args.depth, "")
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        faceset = root / "faces"
        make_faceset(faceset, args.faces, args.side)
        model_path = root / "xseg.safetensors"
        save_xseg(XSegNet(spec), model_path, {"iteration": 0})
        rows: dict[str, list[float]] = {"train": [], "bare step": [], "apply": [], "forward": []}
        for _ in range(args.rounds):  # interleaved: both sides of each ratio see the same machine load
            rows["train"].append(train_rate(faceset, root / "t.safetensors", spec, args.batch, args.iters, args.device))
            rows["bare step"].append(bare_step_rate(spec, args.batch, args.iters, device))
            t = time.perf_counter()
            run_xseg_apply(XSegApplyConfig(faceset=str(faceset), model=str(model_path), batch_size=args.batch,
                                           device=args.device))
            rows["apply"].append(args.faces / (time.perf_counter() - t))
            rows["forward"].append(forward_rate(faceset, model_path, args.batch, device))
        med = {k: statistics.median(v) for k, v in rows.items()}
        print(f"xseg {args.resolution}px base {args.base} depth {args.depth}, {args.faces} faces of {args.side}px, "
              f"batch {args.batch}, {args.device}, {args.rounds} round(s), medians:")
        print(f"  training      {med['train']:8.2f} it/s   bare step {med['bare step']:8.2f} it/s   "
              f"ratio {med['train'] / med['bare step']:.2f}")
        print(f"  apply         {med['apply']:8.2f} faces/s  forward  {med['forward']:8.2f} faces/s  "
              f"ratio {med['apply'] / med['forward']:.2f} (bar 0.80)")
        print(f"  peak memory   {peak_memory_mib(device):.0f} MiB")


if __name__ == "__main__":
    main()
