"""The GPU figures in one table, from one command (`bench/gpu_suite.sh`), in under 8 minutes on one H100 or H200.

    bench/gpu_suite.sh                          # every row
    bench/gpu_suite.sh --sd-scripts ~/sd-scripts --budget 420 --rows sd15 sdxl

Rows: SD1.5 LoRA at 512 px bf16, batch 1/4/8 (it/s, peak GPU memory, MFU); the same through kohya's sd-scripts
when its tree is given (same model file, images, rank and steps); SDXL LoRA at 1024 px (peak memory); FLUX.1
LoRA at FLUX.1-dev's shapes (bench/flux_train.py's rows); face training it/s (DF and LIAE, 256 px, bf16); swap frames/s on 1080x1080 frames; tagger
images/s with onnxruntime's CUDA provider. Each row runs an existing bench (`bench/<name>.py`) in its own
process with GPU settings and parses what it prints, so the suite and the benches cannot drift apart; the models
are random-weight builds with real shapes (nothing is downloaded). A row that fails (a missing package, no
CUDA provider, a timeout) says why in its own cell and the table still prints. Rows run in order until
`--budget` seconds are spent; the rest are marked skipped.

MFU = achieved FLOP/s / the card's dense bf16 peak (H100 SXM and H200: 989 TFLOP/s), where the FLOPs of a step are
the UNet's forward and backward at that batch and size, counted once by torch's FlopCounterMode on the meta device
(frozen base weights as in LoRA training; the VAE, text encoder and LoRA weights are left out, so it is a floor).
Without a CUDA GPU the suite says so and exits with status 2, having run nothing.
"""
from __future__ import annotations

import argparse
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

BENCH = Path(__file__).resolve().parent
#: dense bf16 peak by card name, most specific first (matched against torch.cuda.get_device_name)
PEAK_BF16 = (("H100 PCIe", 756e12), ("H100 NVL", 835e12), ("H100", 989e12), ("H200", 989e12))
SD15_BATCHES = (1, 4, 8)


def peak_bf16(device_name: str) -> float | None:
    for key, flops in PEAK_BF16:
        if key.lower() in device_name.lower():
            return flops
    return None


# ---------------------------------------------------------------- parsing what the benches print


def parse_train(text: str) -> dict[str, tuple[float, float]]:
    """train_throughput.py: {variant or network kind: (steps/s, peak MB)} from its `  NAME : X steps/s ... peak Y MB` lines."""
    out = {}
    for m in re.finditer(r"^\s*(\w+)\s*:\s*([\d.]+) steps/s.*?peak\s+([\d.]+) MB", text, re.M):
        out[m.group(1)] = (float(m.group(2)), float(m.group(3)))
    return out


def parse_face_train(text: str) -> list[dict]:
    """face_train.py: one dict per archi / precision / layout line."""
    rows = []
    for m in re.finditer(r"^([\w-]+)\s+(\w+)\s+(channels_last|contiguous)\s+([\d.]+)M params \| full loop\s+([\d.]+) it/s.*?"
                         r"model step alone\s+([\d.]+) it/s.*?peak (GPU|RSS) ([\d,]+) MiB", text, re.M):
        rows.append({"archi": m.group(1), "precision": m.group(2), "layout": m.group(3), "params_m": float(m.group(4)),
                     "full": float(m.group(5)), "alone": float(m.group(6)), "peak_mib": float(m.group(8).replace(",", ""))})
    return rows


def parse_face_swap(text: str) -> dict:
    """face_swap.py: the predict-alone ceiling (faces/s), frames/s of each swap variant, peak RSS."""
    ceiling = re.search(r"predict alone \(ceiling\)\s+([\d.]+) faces/s", text)
    rows = {m.group(1).strip(): float(m.group(2)) for m in re.finditer(r"^(swap, .+?)\s+([\d.]+) frames/s", text, re.M)}
    peak = re.search(r"peak RSS ([\d.]+) MiB", text)
    return {"ceiling": float(ceiling.group(1)) if ceiling else None, "fps": rows, "peak_mib": float(peak.group(1)) if peak else None}


def parse_tagger(text: str) -> dict:
    """tagger.py: provider, median images/s of the whole pipeline and of the model alone over its rounds."""
    provider = re.search(r"provider (\S+)", text)
    rounds = [(float(a), float(b)) for a, b in re.findall(r"round \d+: model ([\d.]+) img/s \| pipeline ([\d.]+)", text)]
    return {"provider": provider.group(1) if provider else None,
            "pipeline": statistics.median(p for _, p in rounds) if rounds else None,
            "model": statistics.median(m for m, _ in rounds) if rounds else None}


def parse_sd_scripts(text: str) -> dict:
    """sd-scripts' train_network.py: the last rate of its tqdm bar (it/s or s/it) and the peak our wrapper prints."""
    rates = re.findall(r"([\d.]+)(it/s|s/it)", text)
    rate = None
    if rates:
        value, unit = rates[-1]
        rate = float(value) if unit == "it/s" else 1 / float(value)
    peak = re.search(r"GPU_SUITE_PEAK_MIB ([\d.]+)", text)
    return {"steps_per_s": rate, "peak_mib": float(peak.group(1)) if peak else None}


PARSERS: dict[str, Callable[[str], object]] = {"train_throughput.py": parse_train, "face_train.py": parse_face_train,
                                               "face_swap.py": parse_face_swap, "tagger.py": parse_tagger}


def failure(text: str, rc: int | None, timeout: float) -> str:
    """Why a bench gave no figures, in a few words: a missing package, a timeout, or its last error line."""
    if rc is None:
        return f"timed out after {timeout:.0f} s"
    missing = re.findall(r"No module named '([\w.]+)'", text)
    if missing:
        return f"missing package: {missing[-1].split('.')[0]}"
    if "has no CUDA provider" in text:
        return "missing package: onnxruntime-gpu (this onnxruntime has no CUDA provider)"
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    errors = [ln for ln in lines if re.match(r"^[\w.]*(Error|Exception)\b", ln) or ln.startswith("error")]
    return ((errors or lines or [f"exit status {rc}"])[-1])[:110]


# ---------------------------------------------------------------- FLOPs for MFU


def unet_step_flops(unet_config: dict, latent: int, batch: int) -> float:
    """FLOPs of one LoRA training step of this UNet: forward and backward (activation gradients; the base weights
    are frozen), counted by FlopCounterMode on the meta device (no memory, no GPU)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from loratrain.core.models.loading import build_component

    with torch.device("meta"):
        unet = build_component("unet", unet_config)
    unet.requires_grad_(False)
    c = unet.config
    x = torch.empty(batch, c.in_channels, latent, latent, device="meta", requires_grad=True)
    hidden = torch.empty(batch, 77, c.cross_attention_dim, device="meta")
    kw = {}
    if c.addition_embed_type == "text_time":  # SDXL: pooled text embedding and the six size/crop ids
        pooled = c.projection_class_embeddings_input_dim - 6 * c.addition_time_embed_dim
        kw["added_cond_kwargs"] = {"text_embeds": torch.empty(batch, pooled, device="meta"), "time_ids": torch.empty(batch, 6, device="meta")}
    with FlopCounterMode(display=False) as counter:
        out = unet(x, torch.zeros(batch, dtype=torch.long, device="meta"), hidden, **kw).sample
        out.float().pow(2).mean().backward()
    return float(counter.get_total_flops())


def family_flops(family: str, resolution: int, batch: int) -> float | None:
    try:
        from loratrain.core.models.families import FAMILIES

        return unet_step_flops(FAMILIES[family].shipped_configs()["unet"], resolution // 8, batch)
    except Exception:  # noqa: BLE001 - MFU is a bonus column: a failure leaves it empty, never the row
        return None


# ---------------------------------------------------------------- running rows


@dataclass
class Row:
    name: str
    result: str = ""
    memory: str = ""
    mfu: str = ""
    note: str = ""


@dataclass
class Suite:
    budget: float
    tmp: Path
    peak: float | None
    sd_scripts: Path | None = None
    tiny: bool = False                     # tests: CPU-sized settings, no CUDA needed
    t0: float = field(default_factory=time.perf_counter)
    rows: list[Row] = field(default_factory=list)

    def left(self) -> float:
        return self.budget - (time.perf_counter() - self.t0)

    def run(self, cmd: list[str], timeout: float, cwd: Path | None = None) -> tuple[int | None, str, float]:
        """(exit status or None on timeout, stdout+stderr, the timeout used); children write their temp files here."""
        timeout = max(1.0, min(timeout, self.left()))
        env = dict(os.environ, TMPDIR=str(self.tmp), HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")
        # its own process group: a timeout ends the bench's own children too (train_throughput measures in a child)
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, errors="replace",
                                cwd=cwd or self.tmp, env=env, start_new_session=True)
        try:
            out, _ = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            out, _ = proc.communicate()
            return None, out or "", timeout
        return proc.returncode, out or "", timeout

    def bench(self, script: str, args: list[str], timeout: float) -> tuple[int | None, str, float]:
        return self.run([sys.executable, str(BENCH / script), *args], timeout)

    def mfu(self, steps_per_s: float, flops: float | None) -> str:
        if flops is None or self.peak is None:
            return "n/a" if self.tiny or flops is None else "n/a (unknown card)"
        return f"{100 * steps_per_s * flops / self.peak:.1f}%"


def lora_row(s: Suite, title: str, size: str, family: str, res: int, prec: str, batch: int, steps: int, warmup: int,
             limit: float) -> Row:
    """One LoRA training row from train_throughput.py: it/s, peak memory and MFU (tiny: 2 steps after 1 warmup)."""
    row = Row(f"{title} LoRA {res}px {prec.replace('no', 'fp32')} batch {batch}")
    args = ["--size", "tiny" if s.tiny else size, "--resolution", str(res), "--precision", prec, "--batch", str(batch),
            "--steps", str(2 if s.tiny else steps), "--warmup", str(1 if s.tiny else warmup), "--repeats", "1",
            "--kinds", "lora"]
    rc, text, limit = s.bench("train_throughput.py", args, limit)
    got = parse_train(text).get("lora")
    if rc != 0 or got is None:
        row.result = failure(text, rc, limit)
    else:
        rate, peak = got
        row.result, row.memory = f"{rate:.2f} it/s", f"{peak:,.0f} MiB"
        row.mfu = s.mfu(rate, None if s.tiny else family_flops(family, res, batch))
    return row


def sd15(s: Suite) -> None:
    res, prec = (64, "no") if s.tiny else (512, "bf16")
    for batch in (1, 2) if s.tiny else SD15_BATCHES:
        s.rows.append(lora_row(s, "SD1.5", "sd15", "sd1", res, prec, batch, steps=15, warmup=3, limit=150))


SD_SCRIPTS_WRAPPER = """import atexit, runpy, sys
def peak():
    import torch
    if torch.cuda.is_available():
        print("GPU_SUITE_PEAK_MIB", torch.cuda.max_memory_allocated() / 2 ** 20, flush=True)
atexit.register(peak)
sys.path.insert(0, sys.argv[1]); sys.argv = sys.argv[2:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def sd_scripts(s: Suite) -> None:
    """kohya's train_network.py on the same random-weight SD1.5 file and images, same rank, batch and steps."""
    if s.sd_scripts is None:
        return
    tree = s.sd_scripts
    if not (tree / "train_network.py").is_file():
        s.rows.append(Row("sd-scripts SD1.5 LoRA", f"{tree}/train_network.py not found"))
        return
    sys.path.insert(0, str(BENCH))
    try:
        from train_throughput import build_inputs

        model, data = build_inputs(s.tmp / "sd_scripts_inputs", "tiny" if s.tiny else "sd15", 64 if s.tiny else 512)
    except Exception as e:  # noqa: BLE001 - reported in the row
        s.rows.append(Row("sd-scripts SD1.5 LoRA", f"could not build the inputs: {e}"[:110]))
        return
    res, prec = (64, "no") if s.tiny else (512, "bf16")
    for batch in (1, 2) if s.tiny else SD15_BATCHES:
        row = Row(f"sd-scripts SD1.5 LoRA {res}px {prec.replace('no', 'fp32')} batch {batch}", note="tqdm's rate")
        out = s.tmp / f"sd_scripts_out_{batch}"
        cmd = [sys.executable, "-c", SD_SCRIPTS_WRAPPER, str(tree), str(tree / "train_network.py"),
               "--pretrained_model_name_or_path", str(model), "--train_data_dir", str(data), "--output_dir", str(out),
               "--output_name", "bench", "--resolution", f"{res},{res}", "--network_module", "networks.lora",
               "--network_dim", "8", "--network_alpha", "8", "--network_train_unet_only", "--train_batch_size", str(batch),
               "--max_train_steps", "3" if s.tiny else "18", "--mixed_precision", prec, "--sdpa", "--optimizer_type", "AdamW",
               "--learning_rate", "1e-4", "--caption_extension", ".txt", "--seed", "0", "--save_model_as", "safetensors",
               "--max_data_loader_n_workers", "2"]
        rc, text, limit = s.run(cmd, 150, cwd=tree)
        got = parse_sd_scripts(text)
        if rc != 0 or got["steps_per_s"] is None:
            row.result = failure(text, rc, limit)
        else:
            row.result = f"{got['steps_per_s']:.2f} it/s"
            row.memory = f"{got['peak_mib']:,.0f} MiB" if got["peak_mib"] is not None else "?"
            row.mfu = s.mfu(got["steps_per_s"], None if s.tiny else family_flops("sd1", res, batch))
        s.rows.append(row)


def sdxl(s: Suite) -> None:
    res, prec = (64, "no") if s.tiny else (1024, "bf16")
    row = lora_row(s, "SDXL", "sdxl", "sdxl", res, prec, 1, steps=4, warmup=2, limit=240)
    if row.memory:
        row.note = "peak memory is the figure; it/s from a few steps"
    s.rows.append(row)


FLUX_LINE = re.compile(r"^(.+?)\s+step ([\d.]+) s\s+peak (\d+) MiB(?:\s+time x([\d.]+))?")


def parse_flux(text: str) -> list[dict]:
    """bench/flux_train.py's result lines: name, seconds per step, peak MiB, step time against all-on-GPU (or None)."""
    rows = []
    for line in text.splitlines():
        m = FLUX_LINE.match(line.strip())
        if m:
            rows.append({"name": m.group(1).strip(), "step_s": float(m.group(2)), "peak_mib": int(m.group(3)),
                         "time_ratio": float(m.group(4)) if m.group(4) else None})
    return rows


PARSERS["flux_train.py"] = parse_flux


def flux(s: Suite) -> None:
    """bench/flux_train.py: FLUX.1-dev shapes, 1024 px, rank 16: all on GPU, bf16 + swap, fp8 + swap, diffusers+PEFT."""
    args = ["--tiny", "--steps", "1", "--warmup", "1"] if s.tiny else ["--steps", "4", "--warmup", "2"]
    rc, text, limit = s.bench("flux_train.py", args, 300)
    rows = parse_flux(text)
    if not rows:
        s.rows.append(Row("FLUX.1 LoRA 1024px rank 16", failure(text, rc, limit)))
        return
    for r in rows:
        note = f"step time x{r['time_ratio']:.2f} of all-on-GPU" if r["time_ratio"] else ""
        s.rows.append(Row(f"FLUX.1 LoRA {r['name']}", f"{1 / r['step_s']:.2f} it/s", f"{r['peak_mib']:,} MiB", note=note))


def face_train(s: Suite) -> None:
    args = (["--dims", "tiny", "--resolution", "64", "--iters", "2", "--warmup", "1", "--rounds", "1", "--batch", "2"] if s.tiny else
            ["--device", "cuda", "--resolution", "256", "--batch", "8", "--dims", "default", "--precision", "bf16",
             "--iters", "30", "--warmup", "5", "--rounds", "1", "--workers", "6"])
    rc, text, limit = s.bench("face_train.py", args, 200)
    got = parse_face_train(text)
    if rc != 0 or not got:
        s.rows.append(Row("face training", failure(text, rc, limit)))
        return
    for r in got:
        s.rows.append(Row(f"face training {r['archi']} {r['precision']} 256px batch 8" if not s.tiny else f"face training {r['archi']}",
                          f"{r['full']:.2f} it/s", f"{r['peak_mib']:,.0f} MiB", note=f"model step alone {r['alone']:.2f} it/s"))


def face_swap(s: Suite) -> None:
    size = 128 if s.tiny else 1080
    args = (["--frames", "4", "--batch_size", "2"] if s.tiny else
            ["--device", "cuda", "--size", "1080", "--frames", "24", "--resolution", "256", "--batch_size", "8"])
    rc, text, limit = s.bench("face_swap.py", args, 200)
    got = parse_face_swap(text)
    if rc != 0 or not got["fps"]:
        s.rows.append(Row(f"face swap {size}x{size}", failure(text, rc, limit)))
        return
    for label, fps in got["fps"].items():
        note = f"predict alone {got['ceiling']:.1f} faces/s" if got["ceiling"] else ""
        s.rows.append(Row(f"face {label} {size}x{size}", f"{fps:.2f} frames/s",
                          f"{got['peak_mib']:,.0f} MiB RSS" if got["peak_mib"] else "", note=note))


def tagger(s: Suite) -> None:
    args = (["--preset", "small", "--images", "2", "--size", "64x64", "--rounds", "1"] if s.tiny else
            ["--device", "cuda", "--images", "96", "--batch", "32", "--rounds", "2"])
    rc, text, limit = s.bench("tagger.py", args, 150)
    got = parse_tagger(text)
    row = Row("tagger ViT-B 448px (onnxruntime)" if not s.tiny else "tagger small")
    if rc != 0 or got["pipeline"] is None:
        row.result = failure(text, rc, limit)
    else:
        row.result, row.note = f"{got['pipeline']:.1f} images/s", f"provider {got['provider']}; model alone {got['model']:.1f}"
    s.rows.append(row)


ROWS: dict[str, Callable[[Suite], None]] = {"sd15": sd15, "sd-scripts": sd_scripts, "sdxl": sdxl, "flux": flux,
                                            "face-train": face_train, "face-swap": face_swap, "tagger": tagger}


def table(rows: list[Row]) -> str:
    head = ("row", "result", "peak memory", "MFU", "note")
    cells = [head] + [(r.name, r.result, r.memory, r.mfu, r.note) for r in rows]
    widths = [max(len(c[i]) for c in cells) for i in range(len(head))]
    lines = [" | ".join(c[i].ljust(widths[i]) for i in range(len(head))).rstrip() for c in cells]
    lines.insert(1, "-+-".join("-" * w for w in widths))
    return "\n".join(lines)


def cuda_name() -> str | None:
    try:
        import torch
    except ImportError:
        return None
    return torch.cuda.get_device_name(0) if torch.cuda.is_available() else None


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sd-scripts", type=Path, help="a kohya sd-scripts tree: adds its SD1.5 rows")
    ap.add_argument("--budget", type=float, default=450, help="seconds for all rows (default 450: the suite ends under 8 minutes)")
    ap.add_argument("--rows", nargs="+", choices=list(ROWS), default=list(ROWS), help="only these rows")
    ap.add_argument("--tiny", action="store_true", help=argparse.SUPPRESS)  # tests: CPU-sized rows, no GPU needed
    args = ap.parse_args(argv)
    name = cuda_name()
    if name is None and not args.tiny:
        print("gpu_suite: no CUDA GPU is visible (torch.cuda.is_available() is False), so nothing was run: this suite "
              "only measures GPU figures (run it on an H100 or H200). On CPU, run a bench directly: python bench/<name>.py")
        return 2
    tmp = Path(tempfile.mkdtemp(prefix="gpu_suite_"))
    suite = Suite(args.budget, tmp, peak_bf16(name or ""), args.sd_scripts, args.tiny)
    print(f"gpu suite | {name or 'CPU (tiny test sizes)'} | bf16 peak "
          f"{f'{suite.peak / 1e12:.0f} TFLOP/s' if suite.peak else 'unknown'} | budget {args.budget:.0f} s", flush=True)
    try:
        for key in args.rows:
            if suite.left() < 20:
                suite.rows.append(Row(key, "skipped: time budget spent"))
                continue
            t = time.perf_counter()
            ROWS[key](suite)
            print(f"  {key}: {time.perf_counter() - t:.0f} s", flush=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print()
    print(table(suite.rows))
    print(f"\ntotal {time.perf_counter() - suite.t0:.0f} s. MFU: UNet forward+backward FLOPs per step (FlopCounterMode) x it/s / "
          "the card's dense bf16 peak. Memory: torch's peak allocation on the GPU unless it says RSS.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
