"""FLUX.1-dev LoRA training step on a GPU: all on the GPU, bf16 + --blocks_to_swap, fp8 + --blocks_to_swap, all on the
GPU with --cpu_offload_checkpointing, and a plain diffusers FluxTransformer2DModel + PEFT loop doing the same step.

Why random weights: the shapes are what cost time and memory, and a 24 GB download is not a benchmark's business.
Every row has FLUX.1-dev's real shapes (19 double + 38 single blocks, hidden 3072), built on the meta device and
materialised one block at a time straight in bf16 (or fp8) on its target, never the whole model in fp32. The step:
one 1024x1024 image (latents 16x128x128 -> 4096 tokens), batch 1, cached latents and text outputs (random T5 512x4096,
CLIP pooled 768), rank 16 on every Linear the network targets (double and single blocks), gradient checkpointing,
AdamW on the adapters, bf16 autocast. Printed per row: step time (median after warm-up), peak
`torch.cuda.max_memory_allocated`, and both as ratios to the all-on-GPU row of this same run.

Without a GPU it says what it needs and exits 0; `--tiny` runs every row's code path on a tiny config on the CPU
(the smoke test), where times and peaks (RSS) mean nothing.
"""
from __future__ import annotations

import argparse
import gc
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from loratrain.core.lora.flux_network import create_flux_lora  # noqa: E402
from loratrain.core.models.block_swap import enable_block_swap, swap_counts  # noqa: E402
from loratrain.core.models.flux import FLUX_DEV, FluxConfig, FluxTransformer  # noqa: E402
from loratrain.core.models.fp8_linear import parameter_bytes, store_in_fp8  # noqa: E402
from loratrain.training import flow_matching as fm  # noqa: E402

TINY = FluxConfig(in_channels=64, vec_in_dim=32, context_in_dim=32, hidden_size=32, num_heads=2, depth=2,
                  depth_single_blocks=4, axes_dim=(4, 4, 8), guidance_embed=True)


def _init(module: torch.nn.Module, device: torch.device, dtype: torch.dtype, gen_device: torch.device) -> None:
    """Give every meta parameter real random values in `dtype` on `device`, one tensor at a time."""
    for mod in module.modules():
        for name, p in list(mod._parameters.items()):
            if p is None or p.device.type != "meta":
                continue
            if name == "scale" or (name == "weight" and p.ndim == 1):  # norms
                t = torch.ones(p.shape, dtype=dtype, device=gen_device)
            elif p.ndim == 1:
                t = torch.zeros(p.shape, dtype=dtype, device=gen_device)
            else:
                t = torch.randn(p.shape, dtype=dtype, device=gen_device).mul_(0.5 / p.shape[-1] ** 0.5)
            mod._parameters[name] = torch.nn.Parameter(t.to(device), requires_grad=False)
    for mod in module.modules():
        for name, b in list(mod._buffers.items()):
            if b is not None:
                mod._buffers[name] = b.to(device)


def build_ours(cfg: FluxConfig, device: torch.device, fp8: bool, host_blocks: bool) -> FluxTransformer:
    from accelerate import init_empty_weights

    with init_empty_weights():
        model = FluxTransformer(cfg)
    model.requires_grad_(False)
    blocks = {id(b) for b in (*model.double_blocks, *model.single_blocks)}
    units = [m for n, m in model.named_children() if n not in ("double_blocks", "single_blocks")]
    for unit in units + list(model.double_blocks) + list(model.single_blocks):
        is_block = id(unit) in blocks
        _init(unit, device, torch.bfloat16, device)  # made on the device (fast), moved out below when it swaps
        if fp8 and is_block:
            store_in_fp8(unit, torch.bfloat16, parts=("",))
        if host_blocks and is_block:
            unit.to("cpu")
    return model


def build_diffusers(cfg: FluxConfig, device: torch.device):
    from accelerate import init_empty_weights
    from diffusers import FluxTransformer2DModel

    with init_empty_weights():
        model = FluxTransformer2DModel(patch_size=1, in_channels=cfg.in_channels, num_layers=cfg.depth,
                                       num_single_layers=cfg.depth_single_blocks, attention_head_dim=cfg.head_dim,
                                       num_attention_heads=cfg.num_heads, joint_attention_dim=cfg.context_in_dim,
                                       pooled_projection_dim=cfg.vec_in_dim, guidance_embeds=cfg.guidance_embed,
                                       axes_dims_rope=tuple(cfg.axes_dim))
    model.requires_grad_(False)
    _init(model, device, torch.bfloat16, device)
    return model


def inputs(cfg: FluxConfig, latent: int, t5_len: int, device: torch.device) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    ch = cfg.in_channels // 4
    return {"latents": torch.randn(1, ch, latent, latent, generator=g), "noise": torch.randn(1, ch, latent, latent, generator=g),
            "t5": torch.randn(1, t5_len, cfg.context_in_dim, generator=g), "pooled": torch.randn(1, cfg.vec_in_dim, generator=g),
            "sigma": torch.rand(1, generator=g)}


def run_row(name: str, cfg: FluxConfig, args: argparse.Namespace, device: torch.device) -> dict | None:
    """Build one row's model, train `steps` steps, return its median step time and peak; None when it fails."""
    cuda = device.type == "cuda"
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    note = ""
    x = {k: v.to(device) for k, v in inputs(cfg, args.latent, args.t5_len, device).items()}
    h = args.latent // 2
    noisy = (1 - x["sigma"]) * x["latents"] + x["sigma"] * x["noise"]
    target = x["noise"] - x["latents"]
    img_ids, txt_ids = fm.image_ids(h, h, 1).to(device), fm.text_ids(1, args.t5_len).to(device)
    guidance = torch.full((1,), 3.5, device=device)
    if name == "diffusers + PEFT":
        from peft import LoraConfig

        model = build_diffusers(cfg, device)
        targets = r"(transformer_blocks|single_transformer_blocks)\.\d+\.(attn\.(to_q|to_k|to_v|to_out\.0|add_q_proj|" \
                  r"add_k_proj|add_v_proj|to_add_out)|ff\.net\.(0\.proj|2)|ff_context\.net\.(0\.proj|2)|norm1\.linear|" \
                  r"norm1_context\.linear|norm\.linear|proj_mlp|proj_out)"
        model.add_adapter(LoraConfig(r=args.rank, lora_alpha=args.rank, init_lora_weights="gaussian", target_modules=targets))
        model.enable_gradient_checkpointing()
        params = [p for p in model.parameters() if p.requires_grad]
        for p in params:
            p.data = p.data.float()

        def forward():  # noqa: F811 - one forward per kind of row
            return model(hidden_states=fm.pack_latents(noisy), encoder_hidden_states=x["t5"], pooled_projections=x["pooled"],
                         timestep=x["sigma"], img_ids=img_ids[0] if img_ids.ndim == 3 else img_ids,
                         txt_ids=txt_ids[0] if txt_ids.ndim == 3 else txt_ids, guidance=guidance, return_dict=False)[0]
    else:
        fp8, swap = name.startswith("fp8"), args.swap_fp8 if name.startswith("fp8") else args.swap_bf16 if "swap" in name else 0
        model = build_ours(cfg, device, fp8, host_blocks=bool(swap))
        if swap:
            sw = enable_block_swap(model, swap, device)
            note = f"blocks_to_swap {swap}, {sw.bytes_on_host / 2**30:.2f} GiB on the host; "
        note += f"weights {parameter_bytes(model) / 2**30:.2f} GiB"
        torch.manual_seed(0)
        net = create_flux_lora(cfg, args.rank, float(args.rank)).to(device, torch.float32)
        net.apply_to(model)
        model.enable_gradient_checkpointing(cpu_offload="offload" in name)
        if "offload" in name:
            note += "; block activations kept in host memory (cpu_offload_checkpointing)"
        params = list(net.parameters())

        def forward():  # noqa: F811 - one forward per kind of row
            return model(fm.pack_latents(noisy), img_ids, x["t5"], txt_ids, x["sigma"], x["pooled"], guidance)
    model.train()
    opt = torch.optim.AdamW(params, lr=1e-4)
    times = []
    for i in range(args.warmup + args.steps):
        t0 = time.perf_counter()
        with torch.autocast(device.type, torch.bfloat16):
            out = forward()
        loss = torch.nn.functional.mse_loss(fm.unpack_latents(out, h, h).float(), target)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if cuda:
            torch.cuda.synchronize()
        if i >= args.warmup:
            times.append(time.perf_counter() - t0)
    from benchutil import peak_memory_mib

    row = {"name": name, "step_s": statistics.median(times), "peak_mib": peak_memory_mib(device), "note": note,
           "loss": float(loss.detach())}
    return row


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tiny", action="store_true", help="a tiny config on the CPU: every row's code path, no real figures")
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--swap_bf16", type=int, default=-1, help="blocks_to_swap of the bf16 row (default: fit --bf16_gib)")
    ap.add_argument("--swap_fp8", type=int, default=-1, help="blocks_to_swap of the fp8 row (default: fit --fp8_gib)")
    ap.add_argument("--bf16_gib", type=float, default=8.0)
    ap.add_argument("--fp8_gib", type=float, default=6.0)
    ap.add_argument("--reserve_gib", type=float, default=3.0, help="room left for activations, adapters and optimizer")
    ap.add_argument("--rows", default="gpu,bf16 swap,fp8 swap,diffusers,offload",
                    help="which rows: gpu, bf16 swap, fp8 swap, diffusers, offload (all weights on the GPU, activations "
                         "between blocks in host memory: --cpu_offload_checkpointing)")
    args = ap.parse_args()
    cuda = torch.cuda.is_available()
    if not cuda and not args.tiny:
        print("flux_train: needs a CUDA GPU (FLUX.1-dev shapes: ~24 GB of bf16 weights for the all-on-GPU row, ~30 GB "
              "host RAM for the swap rows); nothing run. --tiny runs every row's code path on the CPU.")
        return 0
    cfg = TINY if args.tiny else FLUX_DEV
    device = torch.device("cuda" if cuda and not args.tiny else "cpu")
    args.latent, args.t5_len = (16, 8) if args.tiny else (128, 512)
    per_double = 2 * sum(a * b for a, b in _linear_sizes(cfg, "double"))
    per_single = 2 * sum(a * b for a, b in _linear_sizes(cfg, "single"))
    total = per_double * cfg.depth + per_single * cfg.depth_single_blocks
    for attr, gib, scale in (("swap_bf16", args.bf16_gib, 1.0), ("swap_fp8", args.fp8_gib, 0.5)):
        if getattr(args, attr) < 0:  # the fewest blocks whose weights leave (budget - reserve) on the device
            budget = (gib - args.reserve_gib) * 2**30 if not args.tiny else total * scale / 2
            n = next((n for n in range(2 * cfg.depth + 2) if _fits(cfg, n, per_double, per_single, total, scale, budget)),
                     None)
            setattr(args, attr, n if n is not None else max(n for n in range(2 * cfg.depth + 2) if _valid(cfg, n)))
    names = {"gpu": "all on GPU (bf16)", "bf16 swap": "bf16 + block swap", "fp8 swap": "fp8 + block swap",
             "diffusers": "diffusers + PEFT", "offload": "bf16 + cpu offload ckpt"}
    print(f"FLUX.1 {'tiny' if args.tiny else 'dev'} LoRA step, {args.latent * 8}px ({(args.latent // 2) ** 2} tokens), "
          f"T5 {args.t5_len}, rank {args.rank}, batch 1, gradient checkpointing, device {device}"
          + (f" ({torch.cuda.get_device_name()})" if device.type == "cuda" else ""))
    rows = []
    for key in [k.strip() for k in args.rows.split(",") if k.strip()]:
        try:
            rows.append(run_row(names[key], cfg, args, device))
        except Exception as e:  # noqa: BLE001 - one failed row (e.g. out of memory) must not hide the others
            print(f"{names[key]}: failed: {type(e).__name__}: {str(e)[:300]}")
            rows.append(None)
    base = next((r for r in rows if r and r["name"].startswith("all on GPU")), None)
    for r in rows:
        if r is None:
            continue
        ratio = (f"  time x{r['step_s'] / base['step_s']:.2f}, peak x{r['peak_mib'] / base['peak_mib']:.2f} of all-on-GPU"
                 if base else "")
        print(f"{r['name']:<22} step {r['step_s']:.3f} s  peak {r['peak_mib']:.0f} MiB{ratio}  ({r['note']}; loss {r['loss']:.4f})")
    return 0 if all(rows) else 1


def _linear_sizes(cfg: FluxConfig, kind: str) -> list[tuple[int, int]]:
    h, m = cfg.hidden_size, cfg.mlp_hidden
    if kind == "double":
        return [(h, 6 * h), (h, 3 * h), (h, h), (h, m), (m, h)] * 2
    return [(h, 3 * h + m), (h + m, h), (h, 3 * h)]


def _valid(cfg: FluxConfig, n: int) -> bool:
    try:
        swap_counts(cfg.depth, cfg.depth_single_blocks, n)
        return True
    except Exception:  # noqa: BLE001
        return False


def _fits(cfg, n, per_double, per_single, total, scale, budget) -> bool:
    if not _valid(cfg, n):
        return False
    d, s = swap_counts(cfg.depth, cfg.depth_single_blocks, n)
    return (total - d * per_double - s * per_single) * scale <= budget


if __name__ == "__main__":
    sys.exit(main())
