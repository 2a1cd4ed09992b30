"""FLUX.1 and SD3.5 with several processes (issue 25): two gloo processes on CPU train what one process with twice
the batch trains, FLUX with --blocks_to_swap on (sd-scripts cannot swap blocks with several GPUs). Tiny models and
files come from the FLUX and SD3 training tests' fixtures."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
from safetensors.torch import load_file

from tests.test_flux_train import _args as flux_args
from tests.test_flux_train import flux_files  # noqa: F401 - fixture
from tests.test_sd3_train import _args as sd3_args
from tests.test_sd3_train import sd3_files  # noqa: F401 - fixture


def _train(args: list[str], processes: int) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes)] \
        if processes > 1 else [sys.executable]
    return subprocess.run([*launch, "-m", "loratrain", "train", *args], capture_output=True, text=True, timeout=900, env=env)


def _max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[k] - b[k]).abs().max().item() for k in a)


@pytest.mark.parametrize("family", ["flux", "sd3"])
def test_two_processes_equal_one_with_twice_the_batch(family, request, tmp_path):
    files = request.getfixturevalue(f"{family}_files")
    make = flux_args if family == "flux" else sd3_args
    name = "f" if family == "flux" else "s"
    extra = []
    if family == "flux":  # two single blocks, so one can be swapped (sd-scripts' N=1: 0 double and 2 single blocks)
        import dataclasses

        import torch

        from loratrain.core.models.flux import FluxTransformer
        from tests.test_flux_train import CFG, _save

        torch.manual_seed(1)
        model = FluxTransformer(dataclasses.replace(CFG, depth_single_blocks=2))
        files = {**files, "model": _save({"model.diffusion_model." + k: v for k, v in model.state_dict().items()},
                                         tmp_path / "flux_2single.safetensors")}
        extra = ["--blocks_to_swap", "1"]
    runs = {}
    for label, batch, processes in (("one", "2", 1), ("two", "1", 2), ("b1", "1", 1)):
        args = make(files, tmp_path / label, *extra)
        args[args.index("--train_batch_size") + 1] = batch
        res = _train(args, processes)
        assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
        if processes > 1:
            assert "batch 1 per process x 2 processes" in res.stdout, res.stdout[-2000:]
        runs[label] = load_file(tmp_path / label / f"{name}.safetensors")
    assert _max_diff(runs["one"], runs["b1"]) > 1e-3  # batch 1 alone learns something else: the check below can fail
    assert _max_diff(runs["one"], runs["two"]) < 1e-4  # 2 x 1 == 1 x 2, up to float summation order
    files_written = sorted(p.name for p in (tmp_path / "two").iterdir())
    assert files_written == sorted(["logs", f"{name}-state", f"{name}.safetensors"]), files_written  # only the first process
