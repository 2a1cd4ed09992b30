"""A first checkpoint merge (hashing its inputs) against raw I/O and against a load-everything merge.

    python bench/merge.py [--families sd1 sdxl] [--rounds 5] [--cold] [--size tiny] [--clean]

Builds SD1.5- and/or SDXL-shaped checkpoints once (real key names and shapes, random fp16) in a
cache folder, then per round runs, each in a fresh subprocess so peak RSS and CPU time are its own:
  raw       `cat A B > /dev/null; cp A OUT; sync`: reading both inputs and writing one output (the I/O floor)
  first     `run_merge` with default options (weighted sum, alpha 0.5) and an empty hash cache: a user's
            first merge of new files, which hashes both inputs (SHA-256 for sd_merge_models)
  cached    the same with both hashes already in the hash cache (a repeat merge of the same files)
  nohash    the same with --no-hash_models
  baseline  the A1111 / block-weighted-GUI algorithm: load A and B whole, merge key by key, save
The kinds of a round run back to back, in an order rotated every round so drift hits all alike.
Prints for each its median wall time, CPU time and peak RSS as a share of one input, then the first
merge against raw: round 1's ratio (the very first run) and every round's, against the bars (time at
most 1.3x raw, peak RSS under 25% of one input). With --cold the page cache is dropped before every
run (root only; said when impossible), else all figures are warm-cache: the inputs sit in RAM.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
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

KINDS = ("raw", "first", "cached", "nohash", "baseline")
BAR_TIME, BAR_RSS = 1.3, 25.0


def run_raw(a: str, b: str, out: str) -> None:
    subprocess.run(["sh", "-c", 'cat "$1" "$2" > /dev/null; cp "$1" "$3"; sync', "raw", a, b, out], check=True)


def run_ours(a: str, b: str, out: str, hash_models: bool = True) -> None:
    """Default options; the hash cache is whatever LORATRAIN_CACHE the parent set (empty for `first`)."""
    from loratrain.merge.checkpoint import run_merge
    from loratrain.merge.config import MergeConfig

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


RUNS = {"raw": run_raw, "first": run_ours, "cached": run_ours, "nohash": run_nohash, "baseline": run_baseline}


def cpu_seconds() -> float:
    """User + system time of this process and its waited-for children (raw's cat and cp)."""
    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def child(kind: str, a: str, b: str, out: str) -> None:
    if kind != "raw":  # imports are not part of the merge's time (both sides need torch)
        import safetensors.torch  # noqa: F401

        import loratrain.merge.checkpoint  # noqa: F401
    t0, c0 = time.perf_counter(), cpu_seconds()
    RUNS[kind](a, b, out)
    print(json.dumps({"seconds": time.perf_counter() - t0, "cpu": cpu_seconds() - c0, "peak_rss_mb": peak_rss_mib()}))


def drop_page_cache() -> bool:
    """Empty the page cache so the run reads from disk; False where not allowed (not root, a container)."""
    os.sync()
    try:
        with open("/proc/sys/vm/drop_caches", "w") as fh:
            fh.write("3\n")
        return True
    except OSError:
        return False


def measure(kind: str, a: Path, b: Path, out: Path, hash_cache: Path, cold: bool) -> dict[str, float]:
    os.sync()  # flush the previous run's dirty pages so no run pays for another's writeback
    if cold:
        drop_page_cache()
    time.sleep(1.0)
    with tempfile.TemporaryDirectory() as empty:
        env = dict(os.environ, LORATRAIN_CACHE=str(hash_cache) if kind == "cached" else empty)
        proc = subprocess.run([sys.executable, __file__, "--child", kind, str(a), str(b), str(out)],
                              capture_output=True, text=True, check=False, env=env)
    if proc.returncode != 0:
        raise SystemExit(f"{kind} failed:\n{proc.stderr[-3000:]}")
    out.unlink(missing_ok=True)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def fill_hash_cache(a: Path, b: Path, out: Path, hash_cache: Path) -> None:
    """One untimed merge with a lasting hash cache, so `cached` runs find both hashes (it also warms the page cache)."""
    env = dict(os.environ, LORATRAIN_CACHE=str(hash_cache))
    subprocess.run([sys.executable, __file__, "--child", "first", str(a), str(b), str(out)], env=env, check=True,
                   capture_output=True)
    out.unlink(missing_ok=True)


def report(family: str, size_mb: float, results: dict[str, list[dict[str, float]]], cache_state: str) -> None:
    rounds = len(next(iter(results.values())))
    print(f"\n{family}: inputs {size_mb:.0f} MiB each, {rounds} rounds, {os.cpu_count()} cpu threads, {cache_state}")
    for k, v in results.items():
        t = statistics.median(r["seconds"] for r in v)
        cpu = statistics.median(r["cpu"] for r in v)
        rss = max(r["peak_rss_mb"] for r in v)
        print(f"  {k:9s} {t:7.2f} s  cpu {cpu:6.2f} s   peak RSS {rss:7.0f} MiB ({100 * rss / size_mb:5.1f}% of one input)")

    def ratios(a: str, b: str = "raw") -> list[float]:
        return [x["seconds"] / y["seconds"] for x, y in zip(results[a], results[b])]

    if "first" in results and "raw" in results:
        rs = ratios("first")
        share = 100 * max(r["peak_rss_mb"] for r in results["first"]) / size_mb
        print(f"  first merge / raw, round 1 (the first run)  {rs[0]:.2f}   bar <= {BAR_TIME}  "
              f"({results['first'][0]['seconds']:.2f} s vs {results['raw'][0]['seconds']:.2f} s)")
        print(f"  first merge / raw, every round             {' '.join(f'{r:.2f}' for r in rs)}   "
              f"median {statistics.median(rs):.2f}")
        print(f"  first merge peak RSS {share:.1f}% of one input   bar < {BAR_RSS:.0f}%")
    for kind in ("cached", "nohash"):
        if kind in results and "raw" in results:
            print(f"  {kind} / raw   median time ratio {statistics.median(ratios(kind)):.2f}")
    if "first" in results and "baseline" in results:
        rss_ratio = max(r["peak_rss_mb"] for r in results["first"]) / max(r["peak_rss_mb"] for r in results["baseline"])
        print(f"  first / baseline   median time ratio {statistics.median(ratios('first', 'baseline')):.2f}"
              f"   RSS ratio {rss_ratio:.2f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--families", nargs="+", default=["sd1"], choices=["sd1", "sdxl"])
    ap.add_argument("--size", default="real", choices=["real", "tiny"], help="tiny: the test models' widths (a smoke run)")
    ap.add_argument("--cache", default=str(Path(tempfile.gettempdir()) / "loratrain-bench-merge"))
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--kinds", nargs="+", default=list(KINDS), choices=KINDS)
    ap.add_argument("--cold", action="store_true", help="drop the page cache before every run (needs root)")
    ap.add_argument("--clean", action="store_true", help="delete the built checkpoints afterwards")
    ap.add_argument("--child", nargs=4, metavar=("KIND", "A", "B", "OUT"))
    args = ap.parse_args()
    if args.child:
        child(*args.child)
        return
    cache = Path(args.cache)
    cache.mkdir(parents=True, exist_ok=True)
    cold = args.cold and drop_page_cache()
    cache_state = "page cache dropped before every run (cold)" if cold else "warm page cache (inputs in RAM)"
    if args.cold and not cold:
        print("cannot drop the page cache here (needs root): every figure is warm-cache, on both sides alike")
    try:
        for family in args.families:
            tag = f"{family}_{args.size}"
            a, b = cache / f"{tag}_a.safetensors", cache / f"{tag}_b.safetensors"
            for seed, path in enumerate((a, b)):
                if not path.exists():
                    print(f"building {path} ...", flush=True)
                    build(family, path, seed, tiny=args.size == "tiny")
            if not cold:  # built with direct I/O, so not in RAM yet: make every run's start alike
                subprocess.run(["cat", str(a), str(b)], stdout=subprocess.DEVNULL, check=True)
            hash_cache = cache / f"{tag}_hashes"
            shutil.rmtree(hash_cache, ignore_errors=True)
            if "cached" in args.kinds:
                fill_hash_cache(a, b, cache / f"{tag}_out_fill.safetensors", hash_cache)
            results: dict[str, list[dict[str, float]]] = {k: [] for k in args.kinds}
            for i in range(args.rounds):
                order = args.kinds[i % len(args.kinds):] + args.kinds[:i % len(args.kinds)]
                for kind in order:
                    out = cache / f"{tag}_out_{kind}.safetensors"
                    results[kind].append(measure(kind, a, b, out, hash_cache, cold))
            shutil.rmtree(hash_cache, ignore_errors=True)
            report(family, a.stat().st_size / 2**20, results, cache_state)
    finally:
        if args.clean:
            shutil.rmtree(cache, ignore_errors=True)


if __name__ == "__main__":
    main()
