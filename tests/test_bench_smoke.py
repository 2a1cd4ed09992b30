"""Every benchmark still starts, and the ones with a tiny size run end to end, so a bench cannot rot unseen (one did:
it imported a function that had moved). The figures themselves come from running them by hand at full size."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "bench"
TINY = {  # a few seconds each; load_memory and ui_overhead need real-size models or minutes: --help only
    "merge.py": ["--size", "tiny", "--rounds", "1", "--kinds", "raw", "first", "cached", "--cache", "cache", "--clean"],
    "tagger.py": ["--preset", "small", "--images", "2", "--size", "64x64", "--rounds", "1"],
    "train_throughput.py": ["--size", "tiny", "--resolution", "64", "--steps", "2", "--warmup", "1", "--repeats", "1"],
    "face_train.py": ["--dims", "tiny", "--resolution", "64", "--iters", "2", "--warmup", "1", "--rounds", "1", "--batch", "2"],
    "face_swap.py": ["--frames", "4", "--batch_size", "2"],
    "grid.py": ["--cells", "2", "--steps", "1", "--resolution", "64", "--rounds", "1"],
    "dataset_check.py": ["--tiny"],
    "flux_train.py": ["--tiny", "--steps", "1", "--warmup", "1"],
    "xseg.py": ["--resolution", "64", "--base", "8", "--depth", "4", "--faces", "8", "--side", "96", "--iters", "2",
                "--rounds", "1"],
}


def gpu_suite():
    """bench/gpu_suite.py as a module (the benches are scripts, not a package)."""
    sys.path.insert(0, str(BENCH))
    try:
        import gpu_suite as module
    finally:
        sys.path.remove(str(BENCH))
    return module


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
    if script == "face_swap.py":  # its second section: `face swap --swapper` against the swapper alone
        sw = run(script, ["--swapper", "--frames", "4", "--batch_size", "2", "--swapper_base", "8", "--swapper_blocks", "1"],
                 tmp_path)
        assert sw.returncode == 0 and sw.stdout.count("ratio to ceiling") == 2, (sw.stdout[-1500:], sw.stderr[-2000:])
    assert "peak" in (res.stdout + res.stderr).lower() or "ratio" in (res.stdout + res.stderr).lower()
    parse = gpu_suite().PARSERS.get(script)  # the GPU suite reads this bench's figures from what it prints
    if parse is not None:
        got = parse(res.stdout)
        figures = {"train_throughput.py": lambda g: [*g["ours"], *g["plain"]],
                   "face_train.py": lambda g: [r[k] for r in g for k in ("full", "alone", "peak_mib")] + [len(g) == 2],
                   "face_swap.py": lambda g: [g["ceiling"], g["peak_mib"], *g["fps"].values()] + [len(g["fps"]) == 2],
                   "tagger.py": lambda g: [g["pipeline"], g["model"], g["provider"] == "CPUExecutionProvider"],
                   "flux_train.py": lambda g: [r[k] for r in g for k in ("step_s", "peak_mib")] + [len(g) >= 3]}[script](got)
        assert all(v and v > 0 for v in figures), (script, got, res.stdout[-1500:])


def test_gpu_suite_refuses_on_cpu(tmp_path):
    """Without a CUDA GPU the one-command suite says so and runs nothing (status 2, no bench started)."""
    torch = pytest.importorskip("torch")
    if torch.cuda.is_available():
        pytest.skip("a CUDA GPU is visible: the suite would run for real")
    res = subprocess.run(["bash", str(BENCH / "gpu_suite.sh")], capture_output=True, text=True, timeout=120, cwd=tmp_path,
                         env={**os.environ, "PYTHON": sys.executable, "TMPDIR": str(tmp_path)})
    assert res.returncode == 2, (res.stdout, res.stderr[-2000:])
    assert "no CUDA GPU" in res.stdout and "nothing was run" in res.stdout and "Traceback" not in res.stderr
    assert not list(tmp_path.iterdir())  # no work folder, no model built


def test_gpu_suite_parts(tmp_path):
    """What the GPU run cannot be checked for here: the card's peak, FLOPs for MFU, sd-scripts' output, a failed row."""
    suite = gpu_suite()
    assert suite.peak_bf16("NVIDIA H100 80GB HBM3") == suite.peak_bf16("NVIDIA H200") == 989e12
    assert suite.peak_bf16("NVIDIA H100 PCIe") == 756e12 and suite.peak_bf16("NVIDIA GeForce RTX 4090") is None
    from loratrain.core.models.tiny import tiny_configs

    one, two = (suite.unet_step_flops(tiny_configs("sd1")["unet"], 8, b) for b in (1, 2))
    assert one > 0 and abs(two / one - 2) < 0.01  # shapes only (meta device), linear in the batch
    bar = "steps:  50%|#####     | 1/2 [00:01<00:01,  1.50s/it]\rsteps: 100%|##########| 2/2 [00:02<00:00,  2.25it/s, avr_loss=0.1]"
    assert suite.parse_sd_scripts(bar + "\nGPU_SUITE_PEAK_MIB 4096.5\n") == {"steps_per_s": 2.25, "peak_mib": 4096.5}
    assert suite.parse_sd_scripts("steps: 1/2 [00:01<00:01,  2.00s/it]")["steps_per_s"] == 0.5
    assert suite.failure("Traceback...\nModuleNotFoundError: No module named 'voluptuous'\n", 1, 60) == "missing package: voluptuous"
    assert suite.failure("RuntimeError: --device cuda: this onnxruntime has no CUDA provider (available: CPU)", 1, 60).startswith(
        "missing package: onnxruntime-gpu")
    assert suite.failure("", None, 60) == "timed out after 60 s"
    # a row whose bench fails says why in its cell, and the table still prints
    s = suite.Suite(budget=60, tmp=tmp_path, peak=None, sd_scripts=tmp_path / "no_such_tree", tiny=True)
    suite.sd_scripts(s)
    text = suite.table(s.rows)
    assert "no_such_tree/train_network.py not found" in text
    rc, out, _ = s.run([sys.executable, "-c", "import surely_not_installed_pkg"], 30)
    assert rc == 1 and suite.failure(out, rc, 30) == "missing package: surely_not_installed_pkg"


@pytest.mark.slow
def test_gpu_suite_rows_at_tiny_size(tmp_path):
    """Every row's plumbing (bench command, parse, table) at CPU size, with a stand-in sd-scripts tree."""
    fake = tmp_path / "sd-scripts"
    fake.mkdir()
    (fake / "train_network.py").write_text(
        "import sys\nassert '--network_module' in sys.argv\n"
        "sys.stderr.write('steps: 100%|##########| 3/3 [00:01<00:00,  3.00it/s, avr_loss=0.1]\\n')\n")
    res = subprocess.run([sys.executable, str(BENCH / "gpu_suite.py"), "--tiny", "--budget", "900", "--sd-scripts", str(fake)],
                         capture_output=True, text=True, timeout=1200, cwd=tmp_path)
    assert res.returncode == 0, (res.stdout[-3000:], res.stderr[-2000:])
    rows = {line.split("|")[0].strip(): [c.strip() for c in line.split("|")[1:]] for line in res.stdout.splitlines() if " | " in line}
    for name in ("SD1.5 LoRA 64px fp32 batch 1", "SD1.5 LoRA 64px fp32 batch 2", "SDXL LoRA 64px fp32 batch 1",
                 "face training df", "face training liae"):
        assert rows[name][0].endswith("it/s") and rows[name][1].endswith("MiB"), (name, rows[name])
    assert rows["sd-scripts SD1.5 LoRA 64px fp32 batch 2"][0] == "3.00 it/s"
    flux = {k: v for k, v in rows.items() if k.startswith("FLUX.1 LoRA ")}
    assert len(flux) >= 3 and all(v[0].endswith("it/s") and v[1].endswith("MiB") for v in flux.values()), flux
    assert rows["face swap, detecting faces 128x128"][0].endswith("frames/s")
    assert rows["face swap, faces from a dst faceset 128x128"][0].endswith("frames/s")
    assert rows["tagger small"][0].endswith("images/s")
