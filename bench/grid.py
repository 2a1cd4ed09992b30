"""XY grid over LoRA weights vs the same images made one by one, in one process and one run.

    python bench/grid.py [--cells 8] [--steps 10] [--resolution 256]

Three ways to make the same N images (one LoRA at N weights, same seed), on a small SD1-shaped model:
  plain     the pipeline call alone, model and LoRA already loaded (the floor)
  grid      `run_grid` with a lora_weight axis: loads once, writes every cell PNG and the labelled grid
  separate  N one-image runs, each loading the model and the LoRA (what N `loratrain generate` calls do)
Prints seconds per image for each, the grid's overhead per cell over plain (target < 10%), and the
grid's speed-up over separate runs, plus peak RSS of the process. Runs alternate over rounds.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchutil import peak_rss_mib  # noqa: E402


def build(root: Path, resolution: int) -> tuple[Path, Path]:
    import torch

    from loratrain.core.lora.keys import lora_sites
    from loratrain.core.models.families import FAMILIES
    from loratrain.core.models.loading import SDModel, build_component
    from loratrain.core.models.tiny import tiny_configs, write_single_file
    from loratrain.core.safe_io import save_safetensors
    from loratrain.core.tokenizer import clip_tokenizer

    cfgs = tiny_configs("sd1")
    cfgs["unet"] = dict(cfgs["unet"], block_out_channels=[64, 128, 128, 128], layers_per_block=2, norm_num_groups=16,
                        attention_head_dim=8, sample_size=resolution // 8)
    torch.manual_seed(0)
    fam = FAMILIES["sd1"]
    model = SDModel(fam, build_component("unet", cfgs["unet"]), build_component("vae", cfgs["vae"]),
                    [build_component("text_encoder", cfgs["text_encoder"])], [clip_tokenizer(fam.pad_tokens()[0])],
                    None, "bench", cfgs)  # type: ignore[arg-type]
    ckpt = write_single_file(model, root / "model.safetensors")
    shapes = {k: tuple(v.shape) for k, v in __import__("safetensors.torch").torch.load_file(ckpt).items()}
    sd = {}
    for name, site in lora_sites(shapes, fam, {"loratrain.configs": __import__("json").dumps(cfgs)}).items():
        if site.kind == "attn" and len(site.shape) == 2 and not name.startswith(("lora_unet_input", "lora_unet_output", "lora_unet_middle")):
            sd[f"{name}.lora_down.weight"] = torch.randn(8, site.shape[1]) * 0.1
            sd[f"{name}.lora_up.weight"] = torch.randn(site.shape[0], 8) * 0.1
            sd[f"{name}.alpha"] = torch.tensor(8.0)
    lora = root / "lora.safetensors"
    save_safetensors(sd, lora)
    return ckpt, lora


def weights(n: int) -> list[float]:
    return [round(i / max(1, n - 1), 4) for i in range(n)]


def run_plain(ckpt: Path, lora: Path, n: int, steps: int, res: int) -> tuple[float, float]:
    """(generation seconds, one-time setup seconds: model + LoRA load)."""
    import torch

    from loratrain.core.models.loading import load_model
    from loratrain.core.sampling import build_pipeline

    t0 = time.perf_counter()
    model = load_model(ckpt)
    pipe = build_pipeline(model, "euler_a")
    pipe.set_progress_bar_config(disable=True)
    pipe.load_lora_weights(str(lora), adapter_name="l")
    setup = time.perf_counter() - t0
    t0 = time.perf_counter()
    for w in weights(n):
        pipe.set_adapters(["l"], adapter_weights=[w])
        pipe("a red circle", width=res, height=res, num_inference_steps=steps, guidance_scale=7.0,
             generator=torch.Generator().manual_seed(1)).images[0]
    return time.perf_counter() - t0, setup


def run_grid_bench(ckpt: Path, lora: Path, n: int, steps: int, res: int, out: Path) -> float:
    from loratrain.grid.runner import GridConfig, run_grid

    t0 = time.perf_counter()
    run_grid(GridConfig(model=str(ckpt), prompt="a red circle", loras=[f"{lora}:1"], width=res, height=res, steps=steps,
                        seed=1, sampler="euler_a", x_type="lora_weight", x_values=",".join(map(str, weights(n))),
                        y_type="seed", y_values="1", output_dir=str(out)))
    return time.perf_counter() - t0


def run_separate(ckpt: Path, lora: Path, n: int, steps: int, res: int, out: Path) -> float:
    from loratrain.grid.config import GenerateConfig
    from loratrain.grid.generate import run_generate

    t0 = time.perf_counter()
    for i, w in enumerate(weights(n)):
        run_generate(GenerateConfig(model=str(ckpt), prompt="a red circle", network_weights=[f"{lora}:{w}"], width=res,
                                      height=res, steps=steps, seed=1, sampler="euler_a", output=str(out / f"{i}.png")))
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--cells", type=int, default=8)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--resolution", type=int, default=256)
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args()
    import os

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        ckpt, lora = build(root, args.resolution)
        run_plain(ckpt, lora, 1, 1, args.resolution)  # warm-up (first-call costs)
        times: dict[str, list[float]] = {"plain": [], "grid": [], "separate": []}
        loads = []
        for r in range(args.rounds):
            gen, setup = run_plain(ckpt, lora, args.cells, args.steps, args.resolution)
            times["plain"].append(gen)
            loads.append(setup)
            times["grid"].append(run_grid_bench(ckpt, lora, args.cells, args.steps, args.resolution, root / f"g{r}"))
            sep = root / f"s{r}"
            sep.mkdir()
            times["separate"].append(run_separate(ckpt, lora, args.cells, args.steps, args.resolution, sep))
    per = {k: statistics.median(v) / args.cells for k, v in times.items()}
    print(f"{args.cells} cells, {args.steps} steps, {args.resolution}px, {args.rounds} rounds (median)")
    for k, v in per.items():
        print(f"  {k:9s} {v:.3f} s per image")
    load = statistics.median(loads)
    print(f"  grid overhead per cell over plain generation: {100 * (per['grid'] / per['plain'] - 1):+.1f}% including "
          f"the one-time model + LoRA load ({load:.2f} s, which plain does before its clock starts), "
          f"{100 * ((per['grid'] - load / args.cells) / per['plain'] - 1):+.1f}% without it  (target < 10%)")
    print(f"  grid vs separate one-image runs: {per['separate'] / per['grid']:.2f}x faster")
    print(f"  peak RSS {peak_rss_mib():.0f} MiB")


if __name__ == "__main__":
    main()
