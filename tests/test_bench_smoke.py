"""Every benchmark still starts, and the ones with a tiny size run end to end, so a bench cannot rot unseen (one did:
it imported a function that had moved). The figures themselves come from running them by hand at full size."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "bench"
TINY = {  # a few seconds each; merge, load_memory and ui_overhead need real-size models or minutes: --help only
    "tagger.py": ["--preset", "small", "--images", "2", "--size", "64x64", "--rounds", "1"],
    "train_throughput.py": ["--size", "tiny", "--resolution", "64", "--steps", "2", "--warmup", "1", "--repeats", "1"],
    "face_train.py": ["--dims", "tiny", "--resolution", "64", "--iters", "2", "--warmup", "1", "--rounds", "1", "--batch", "2"],
    "face_swap.py": ["--frames", "4", "--batch_size", "2"],
    "grid.py": ["--cells", "2", "--steps", "1", "--resolution", "64", "--rounds", "1"],
}


def run(script: str, args: list[str], tmp_path: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(BENCH / script), *args], capture_output=True, text=True, timeout=600,
                          cwd=tmp_path)


@pytest.mark.parametrize("script", sorted(p.name for p in BENCH.glob("*.py") if p.name != "benchutil.py"))
def test_every_bench_starts(script, tmp_path):
    res = run(script, ["--help"], tmp_path)
    assert res.returncode == 0 and "usage:" in res.stdout, res.stderr[-2000:]


@pytest.mark.slow
@pytest.mark.parametrize("script", sorted(TINY))
def test_tiny_benches_run(script, tmp_path):
    res = run(script, TINY[script], tmp_path)
    assert res.returncode == 0, (res.stdout[-1500:], res.stderr[-2000:])
    assert "peak" in (res.stdout + res.stderr).lower() or "ratio" in (res.stdout + res.stderr).lower()
