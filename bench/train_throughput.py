"""Steps/s and peak memory: loratrain's loop vs a plain diffusers+PEFT loop, same model, same run.

The plain loop follows diffusers' examples/text_to_image/train_text_to_image_lora.py: VAE and text
encoder run every step, PEFT LoRA on the UNet, AdamW. Both train the same UNet modules at the same
rank on the same images and batch size. Each variant runs in its own subprocess (so peak RSS is its
own), alternating A/B/A/B, and the ratio of medians is printed.

    python bench/train_throughput.py                 # tiny SD1-shaped model on CPU
    python bench/train_throughput.py --size sd15 --resolution 512 --batch 4 --precision bf16   # on a GPU
    python bench/train_throughput.py --kinds lora,loha,lokr,dora   # each network kind of ours, side by side
    python bench/train_throughput.py --size sdxl --resolution 1024 --batch 1 --precision bf16   # ours only
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchutil import peak_memory_mib

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def build_inputs(root: Path, size: str, resolution: int) -> tuple[Path, Path]:
    from loratrain.core.models.families import FAMILIES
    from loratrain.core.models.tiny import make_tiny_model, write_single_file
    from loratrain.training.demo import make_concept_images

    family = "sdxl" if size == "sdxl" else "sd1"
    model = make_tiny_model(family, seed=0)
    if size in ("sd15", "sdxl"):  # real SD1.5 / SDXL shapes, random (properly initialised) weights
        from loratrain.core.models.loading import build_component

        cfgs = FAMILIES[family].shipped_configs()
        model.unet, model.vae = build_component("unet", cfgs["unet"]), build_component("vae", cfgs["vae"])
        model.text_encoders = [build_component(spec.component, cfgs[spec.component], spec.with_projection)
                               for spec in FAMILIES[family].text_encoders]
        model.configs = cfgs
    path = write_single_file(model, root / "model.safetensors", dtype=__import__("torch").float16 if size != "tiny" else __import__("torch").float32)
    make_concept_images(root / "data" / "1_shape", "circle", 16, resolution, 0)
    return path, root / "data"


def run_ours(model: Path, data: Path, args: argparse.Namespace) -> float:
    from loratrain.core.progress import RecordingReporter, StopFlag
    from loratrain.training.config import TrainConfig
    from loratrain.training.trainer import LoRATrainer

    total = args.warmup + args.steps
    cfg = TrainConfig(pretrained_model_name_or_path=str(model), train_data_dir=str(data), resolution=str(args.resolution),
                      output_dir=tempfile.mkdtemp(), network_dim=args.rank, network_alpha=args.rank, network_train_unet_only=True,
                      network_module=args.kind,
                      train_batch_size=args.batch, max_train_steps=total, mixed_precision=args.precision, seed=0)

    class Timer(RecordingReporter):
        t0 = 0.0

        def advance(self, n=1, **metrics):
            super().advance(n, **metrics)
            if metrics and self.step == args.warmup:
                _sync()
                Timer.t0 = time.perf_counter()

    trainer = LoRATrainer(cfg, Timer(), StopFlag())
    trainer.setup()
    trainer.run()
    _sync()
    return args.steps / (time.perf_counter() - Timer.t0)


def run_plain(model: Path, data: Path, args: argparse.Namespace) -> float:
    import torch
    import torch.nn.functional as F
    from peft import LoraConfig
    from PIL import Image

    from loratrain.core.models.loading import load_model
    from loratrain.training.networks.base import NetworkSpec, find_targets

    m = load_model(model)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(args.precision, torch.float32)
    m.unet.to(device, dtype)
    m.vae.to(device, dtype)
    m.text_encoders[0].to(device, dtype)
    targets = [t.module_path for t in find_targets(m, NetworkSpec(network_dim=args.rank, train_text_encoder=False))]
    m.unet.add_adapter(LoraConfig(r=args.rank, lora_alpha=args.rank, init_lora_weights="gaussian", target_modules=targets))
    params = [p for p in m.unet.parameters() if p.requires_grad]
    for p in params:
        p.data = p.data.float()
    opt = torch.optim.AdamW(params, lr=1e-4)
    files = sorted((data / "1_shape").glob("*.png"))
    captions = [f.with_suffix(".txt").read_text() for f in files]
    tok, te = m.tokenizers[0], m.text_encoders[0]
    sched = m.noise_scheduler
    m.unet.train()
    t0 = 0.0
    for step in range(args.warmup + args.steps):
        if step == args.warmup:
            _sync()
            t0 = time.perf_counter()
        idx = [(step * args.batch + i) % len(files) for i in range(args.batch)]
        pix = torch.stack([torch.from_numpy(__import__("numpy").asarray(Image.open(files[i]).convert("RGB").resize((args.resolution,) * 2)))
                           .permute(2, 0, 1).float() / 127.5 - 1 for i in idx]).to(device, dtype)
        with torch.autocast(device_type=device, dtype=dtype, enabled=dtype != torch.float32):
            latents = m.vae.encode(pix).latent_dist.sample() * m.vae.config.scaling_factor
            ids = tok([captions[i] for i in idx], padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids.to(device)
            hidden = te(ids)[0]
            noise = torch.randn_like(latents)
            t = torch.randint(0, 1000, (len(idx),), device=device)
            pred = m.unet(sched.add_noise(latents, noise, t), t, hidden).sample
        loss = F.mse_loss(pred.float(), noise.float())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad()
    _sync()
    return args.steps / (time.perf_counter() - t0)


def _sync() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", choices=["tiny", "sd15", "sdxl"], default="tiny",
                    help="sdxl: real SDXL shapes, our loop only (the plain loop is SD1's), as with --kinds lora")
    ap.add_argument("--resolution", type=int, default=64)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--precision", default="no", choices=["no", "fp16", "bf16"])
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--kinds", default="", help="compare our network kinds (e.g. lora,loha,lokr,dora) instead of ours vs plain")
    ap.add_argument("--kind", default="lora", help=argparse.SUPPRESS)
    ap.add_argument("--variant", choices=["ours", "plain"], help=argparse.SUPPRESS)
    ap.add_argument("--model", help=argparse.SUPPRESS)
    ap.add_argument("--data", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.variant:  # child process: one measurement
        fn = run_ours if args.variant == "ours" else run_plain
        rate = fn(Path(args.model), Path(args.data), args)
        print(json.dumps({"steps_per_s": rate, "peak_mb": peak_memory_mib()}))
        return
    if args.size == "sdxl" and not args.kinds:
        args.kinds = "lora"
    root = Path(tempfile.mkdtemp(prefix="bench_train_"))
    model, data = build_inputs(root, args.size, args.resolution)
    passthrough = sys.argv[1:]
    if args.kinds:
        kinds = args.kinds.split(",")
        runs: dict[str, list[dict]] = {k: [] for k in kinds}
        for _ in range(args.repeats):
            for kind in kinds:
                out = subprocess.run([sys.executable, __file__, *passthrough, "--variant", "ours", "--kind", kind, "--model", str(model),
                                      "--data", str(data)], capture_output=True, text=True, check=True)
                runs[kind].append(json.loads(out.stdout.strip().splitlines()[-1]))
        print(f"model={args.size} res={args.resolution} batch={args.batch} rank={args.rank} precision={args.precision} steps={args.steps} x{args.repeats}")
        base = statistics.median(r["steps_per_s"] for r in runs[kinds[0]])
        base_mem = max(r["peak_mb"] for r in runs[kinds[0]])
        for kind, rs in runs.items():
            rate, mem = statistics.median(r["steps_per_s"] for r in rs), max(r["peak_mb"] for r in rs)
            print(f"  {kind:5s}: {rate:8.2f} steps/s ({rate / base:.2f}x {kinds[0]})  peak {mem:9.1f} MB ({mem / base_mem:.2f}x)")
        return
    results: dict[str, list[dict]] = {"ours": [], "plain": []}
    for _ in range(args.repeats):
        for variant in ("plain", "ours"):
            out = subprocess.run([sys.executable, __file__, *passthrough, "--variant", variant, "--model", str(model), "--data", str(data)],
                                 capture_output=True, text=True, check=True)
            results[variant].append(json.loads(out.stdout.strip().splitlines()[-1]))
    med = {v: statistics.median(r["steps_per_s"] for r in rs) for v, rs in results.items()}
    peak = {v: max(r["peak_mb"] for r in rs) for v, rs in results.items()}
    print(f"model={args.size} res={args.resolution} batch={args.batch} rank={args.rank} precision={args.precision} steps={args.steps} x{args.repeats}")
    for v in ("plain", "ours"):
        print(f"  {v:5s}: {med[v]:8.2f} steps/s  peak {peak[v]:9.1f} MB (GPU max allocated with CUDA, else process max RSS)")
    print(f"  speed ratio ours/plain: {med['ours'] / med['plain']:.2f}x   memory ratio ours/plain: {peak['ours'] / peak['plain']:.2f}")


if __name__ == "__main__":
    main()
