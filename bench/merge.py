"""Streaming merge vs a load-everything merge vs raw I/O, on real-layout synthetic checkpoints.

    python bench/merge.py [--families sd1 sdxl] [--cache DIR] [--rounds 2]

Builds SD1.5- and/or SDXL-shaped checkpoints once (real key names and shapes, random fp16) in a
cache folder, then per round runs, each in a fresh subprocess so peak RSS is its own:
  raw       `cat A B > /dev/null; cp A OUT; sync`: reading both inputs and writing one output (the I/O floor)
  default   `run_merge` with default options (weighted sum, alpha 0.5, hashing both inputs for
            sd_merge_models with an empty hash cache: what a first merge of new files costs)
  nohash    the same with --no-hash_models
  baseline  the A1111 / block-weighted-GUI algorithm: load A and B whole, merge key by key, save
Prints wall times, ratios to raw (median of per-round ratios, each round's runs back to back) and
each one's peak RSS as a share of one input file's size, against the bar: default options, peak RSS
under 25% of one input, time at most 1.3x raw. Runs are alternated so drift hits all of them alike.
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

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchutil import build_checkpoint as build  # noqa: E402
from benchutil import peak_rss_mib  # noqa: E402


def run_raw(a: str, b: str, out: str) -> None:
    subprocess.run(["sh", "-c", 'cat "$1" "$2" > /dev/null; cp "$1" "$3"; sync', "raw", a, b, out], check=True)


def run_ours(a: str, b: str, out: str, hash_models: bool = True) -> None:
    """Default options; with hashing, an empty hash cache (a first merge of new files)."""
    from loratrain.merge.checkpoint import run_merge
    from loratrain.merge.config import MergeConfig

    with tempfile.TemporaryDirectory() as cache:
        os.environ["LORATRAIN_CACHE"] = cache
        run_merge(MergeConfig(model_a=a, model_b=b, output=out, alpha=0.5, overwrite=True, hash_models=hash_models))


def run_nohash(a: str, b: str, out: str) -> None:
    run_ours(a, b, out, hash_models=False)


def run_baseline(a: str, b: str, out: str) -> None:
    """What A1111's merger and the block-weighted GUI do: whole state dicts in RAM."""
    from safetensors.torch import load_file, save_file

    theta_0 = load_file(a)
    theta_1 = load_file(b)
    for key in theta_0:
        if "model" in key and key in theta_1 and not key.endswith("position_ids"):
            theta_0[key] = ((1 - 0.5) * theta_0[key].float() + 0.5 * theta_1[key].float()).half()
    for key in theta_1:
        if "model" in key and key not in theta_0:
            theta_0[key] = theta_1[key]
    del theta_1
    save_file(theta_0, out, metadata={"format": "pt"})
    with open(out, "rb") as fh:
        os.fsync(fh.fileno())


def child(kind: str, a: str, b: str, out: str) -> None:
    if kind != "raw":  # imports are not part of the merge's time (both sides need torch)
        import safetensors.torch  # noqa: F401

        import loratrain.merge.checkpoint  # noqa: F401
    t0 = time.perf_counter()
    {"raw": run_raw, "default": run_ours, "nohash": run_nohash, "baseline": run_baseline}[kind](a, b, out)
    print(json.dumps({"seconds": time.perf_counter() - t0, "peak_rss_mb": peak_rss_mib()}))


def measure(kind: str, a: Path, b: Path, out: Path) -> dict[str, float]:
    os.sync()  # flush the previous run's dirty pages so no run pays for another's writeback
    time.sleep(1.0)
    proc = subprocess.run([sys.executable, __file__, "--child", kind, str(a), str(b), str(out)],
                          capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise SystemExit(f"{kind} failed:\n{proc.stderr[-3000:]}")
    out.unlink(missing_ok=True)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--families", nargs="+", default=["sd1"], choices=["sd1", "sdxl"])
    ap.add_argument("--cache", default=str(Path(tempfile.gettempdir()) / "loratrain-bench-merge"))
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--child", nargs=4, metavar=("KIND", "A", "B", "OUT"))
    args = ap.parse_args()
    if args.child:
        child(*args.child)
        return
    cache = Path(args.cache)
    cache.mkdir(parents=True, exist_ok=True)
    for family in args.families:
        a, b = cache / f"{family}_a.safetensors", cache / f"{family}_b.safetensors"
        for seed, path in enumerate((a, b)):
            if not path.exists():
                print(f"building {path} ...", flush=True)
                build(family, path, seed)
        size_mb = a.stat().st_size / 2**20
        results: dict[str, list[dict[str, float]]] = {"raw": [], "default": [], "nohash": [], "baseline": []}
        for _ in range(args.rounds):
            for kind in results:
                results[kind].append(measure(kind, a, b, cache / f"{family}_out_{kind}.safetensors"))
        t = {k: statistics.median(r["seconds"] for r in v) for k, v in results.items()}
        rss = {k: max(r["peak_rss_mb"] for r in v) for k, v in results.items()}
        print(f"\n{family}: inputs {size_mb:.0f} MiB each, {args.rounds} rounds, cpu threads {os.cpu_count()}")
        for k in results:
            print(f"  {k:9s} {t[k]:7.2f} s   peak RSS {rss[k]:7.0f} MiB  ({100 * rss[k] / size_mb:5.1f}% of one input)")

        def ratio(a: str, b: str, results: dict = results) -> str:
            """Median of per-round ratios (each round's runs are back to back) and their range."""
            rs = sorted(x["seconds"] / y["seconds"] for x, y in zip(results[a], results[b]))
            return f"{statistics.median(rs):.2f}  (rounds {rs[0]:.2f}..{rs[-1]:.2f})"

        share = 100 * rss["default"] / size_mb
        print(f"  default options / raw   time ratio {ratio('default', 'raw')}   bar <= 1.3")
        print(f"  default options peak RSS {share:.1f}% of one input   bar < 25%")
        print(f"  nohash / raw            time ratio {ratio('nohash', 'raw')}")
        print(f"  default / baseline      time ratio {ratio('default', 'baseline')}   RSS ratio {rss['default'] / rss['baseline']:.2f}")


if __name__ == "__main__":
    main()
