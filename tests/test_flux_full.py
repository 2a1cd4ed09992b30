"""FLUX.1 full fine-tuning (issue 25) through the real CLI: `--network_module full` trains the transformer's own weights
and saves BFL-layout model files (sd-scripts' flux_train.py layout) that load back as FLUX.1; a resumed run is
bit-identical; `--fsdp` with 2 gloo processes shards the transformer (each holds about half) and trains what one
unsharded process with twice the batch trains. Tiny model files come from the FLUX training tests' fixture."""
from __future__ import annotations

import dataclasses
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open

from loratrain.core.models.flux import FluxTransformer
from tests.test_flux_train import (
    CFG,
    _args,
    _save,
    flux_files,  # noqa: F401 - fixture
)


def _full(files: dict, out: Path, *extra: str) -> list[str]:
    args = _args(files, out, *extra)
    args[args.index("--network_module") + 1] = "full"
    args[args.index("--learning_rate") + 1] = "1e-2"  # whole weights at a LoRA's rate would hardly move in 4 steps
    return args


def _train(args: list[str], processes: int = 1) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes)] \
        if processes > 1 else [sys.executable]
    return subprocess.run([*launch, "-m", "loratrain", "train", *args], capture_output=True, text=True, timeout=900, env=env)


def _tensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    with safe_open(str(path), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})


def _base(files: dict) -> dict[str, torch.Tensor]:
    sd, _ = _tensors(files["model"])
    return {k[len("model.diffusion_model."):]: v for k, v in sd.items()}


def _max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[k].double() - b[k].double()).abs().max().item() for k in a)


@pytest.fixture(scope="module")
def deep_files(flux_files, tmp_path_factory) -> dict:  # noqa: F811
    """Two double and two single blocks: more units to shard than the 1 + 1 of the fixture's model."""
    torch.manual_seed(3)
    model = FluxTransformer(dataclasses.replace(CFG, depth=2, depth_single_blocks=2))
    path = tmp_path_factory.mktemp("deep") / "flux_deep.safetensors"
    return {**flux_files, "model": _save({"model.diffusion_model." + k: v for k, v in model.state_dict().items()}, path)}


def test_full_finetune_saves_a_bfl_model_that_loads_back_changed(flux_files, tmp_path):  # noqa: F811
    from loratrain.core.models.flux_loading import flux_sources, load_flux

    out = tmp_path / "o"
    res = _train(_full(flux_files, out, "--save_every_n_steps", "2"))
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert "full fine-tune of the FLUX.1 transformer" in res.stdout and "checkpoint at" in res.stdout
    base = _base(flux_files)
    sd, meta = _tensors(out / "f.safetensors")
    assert sd.keys() == base.keys()  # the bare BFL keys, as sd-scripts' flux_train.py saves them
    assert all(sd[k].dtype == torch.float32 and sd[k].shape == base[k].shape for k in sd)
    assert _max_diff(sd, base) > 1e-3  # it trained
    assert meta["modelspec.architecture"] == "flux-1-dev" and meta["loratrain.full_finetune"] == "1"
    assert meta["modelspec.implementation"] == "https://github.com/black-forest-labs/flux"
    step2, _ = _tensors(out / "f-step00000002.safetensors")  # a save point on the way
    assert 0 < _max_diff(step2, base) and _max_diff(step2, sd) > 0
    files = {k: str(v) for k, v in flux_files.items() if k in ("clip_l", "t5xxl", "ae", "t5_tokenizer")}
    loaded = load_flux(flux_sources(str(out / "f.safetensors"), **files), torch.float32)
    assert loaded.variant == "dev"
    assert all(torch.equal(v, sd[k]) for k, v in loaded.transformer.state_dict().items())


def test_full_finetune_resumes_bit_identically(flux_files, tmp_path):  # noqa: F811
    straight = _train(_full(flux_files, tmp_path / "a"))
    assert straight.returncode == 0, straight.stdout[-3000:] + straight.stderr[-3000:]
    half = _full(flux_files, tmp_path / "b")
    half[half.index("--max_train_steps") + 1] = "2"
    assert _train(half).returncode == 0
    res = _train(_full(flux_files, tmp_path / "b", "--resume", "latest"))
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert "resumed from" in res.stdout and "at step 2" in res.stdout
    a, _ = _tensors(tmp_path / "a" / "f.safetensors")
    b, _ = _tensors(tmp_path / "b" / "f.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("extra, option, words", [
    (["--network_module", "full", "--blocks_to_swap", "1"], "blocks_to_swap", "changes them every step"),
    (["--network_module", "full", "--fp8_base"], "fp8_base", "full precision"),
    (["--network_module", "full", "--split_qkv"], "split_qkv", "LoRA argument"),
    (["--fsdp"], "fsdp", "needs network_module full"),
])
def test_what_a_full_finetune_cannot_do_is_refused_before_loading(flux_files, tmp_path, extra, option, words):  # noqa: F811
    (tmp_path / "p.txt").write_text("a photo of sks dog\n")
    args = _args(flux_files, tmp_path / "o", *[str(tmp_path / "p.txt") if e == "PROMPTS" else e for e in extra])
    res = _train(args)
    assert res.returncode == 2, res.stdout[-2000:] + res.stderr[-2000:]
    assert option in res.stderr and words in res.stderr, res.stderr[-2000:]
    assert not (tmp_path / "o").exists() or not any((tmp_path / "o").iterdir())


def test_fsdp_two_processes_equal_one_with_twice_the_batch(deep_files, tmp_path):
    runs, logs = {}, {}
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a photo of sks dog --w 64 --h 64 --s 2 --d 3\n")
    for label, batch, processes, fsdp in (("one", "2", 1, False), ("fsdp", "1", 2, True), ("b1", "1", 1, False)):
        # plain SGD without clipping: a step scales with the gradient, so an average in place of the sum would show.
        # Samples and validation run in both (every process takes part in a sharded forward) and change no weight.
        args = _full(deep_files, tmp_path / label, "--optimizer_type", "SGD", "--max_grad_norm", "0",
                     "--sample_prompts", str(prompts), "--sample_every_n_steps", "2", "--validation_split", "0.25",
                     "--validate_every_n_steps", "2", *(["--fsdp"] if fsdp else []))
        args[args.index("--train_batch_size") + 1] = batch
        args[args.index("--learning_rate") + 1] = "0.5"
        res = _train(args, processes)
        assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
        runs[label], logs[label] = _tensors(tmp_path / label / "f.safetensors")[0], res.stdout
    print(next(line for line in logs["fsdp"].splitlines() if line.startswith("fsdp:")))
    assert _max_diff(runs["one"], runs["b1"]) > 1e-3  # batch 1 alone learns something else: the check below can fail
    diff = _max_diff(runs["one"], runs["fsdp"])
    print(f"fsdp 2 x 1 vs 1 x 2: max diff {diff:.3g}; batch 1 vs 2: {_max_diff(runs['one'], runs['b1']):.3g}")
    assert diff < 1e-5  # 2 x 1 sharded == 1 x 2 whole, up to float summation order
    assert "batch 1 per process x 2 processes" in logs["fsdp"]
    shares = re.findall(r"process (\d) (\d+) of (\d+) \(([\d.]+)%\)", logs["fsdp"])
    assert [s[0] for s in shares] == ["0", "1"], logs["fsdp"][-2000:]
    total = int(shares[0][2])
    assert total == sum(v.numel() for v in runs["one"].values())
    assert all(45 <= float(pct) <= 55 for *_, pct in shares) and sum(int(n) for _, n, _, _ in shares) >= total
    assert sorted(p.name for p in (tmp_path / "fsdp").iterdir()) == ["f-state", "f.safetensors", "logs", "sample"]
    for label in ("one", "fsdp"):  # the first process wrote each sample once; the validation loss was logged
        assert len(list((tmp_path / label / "sample").glob("*.png"))) == 2, label
        assert "validation loss" in logs[label], logs[label][-2000:]
    one = re.findall(r"validation loss ([\d.]+) at step (\d+)", logs["one"])
    sharded = re.findall(r"validation loss ([\d.]+) at step (\d+)", logs["fsdp"])
    assert len(one) == len(sharded) >= 2 and all(abs(float(a[0]) - float(b[0])) < 1e-4 for a, b in zip(one, sharded))
    a, b = (np.asarray(Image.open(sorted((tmp_path / k / "sample").glob("*.png"))[-1])).astype(int) for k in ("one", "fsdp"))
    assert np.abs(a - b).max() <= 1  # the sharded model samples what the whole one does


def test_fsdp_run_resumes_bit_identically_and_from_an_unsharded_state(deep_files, tmp_path):
    def run(out: Path, steps: str, processes: int, *extra: str) -> subprocess.CompletedProcess:
        args = _full(deep_files, out, *extra)
        args[args.index("--train_batch_size") + 1] = str(2 // processes)  # a global batch of 2 either way
        args[args.index("--max_train_steps") + 1] = steps
        res = _train(args, processes)
        assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
        return res

    run(tmp_path / "a", "4", 2, "--fsdp")
    run(tmp_path / "b", "2", 2, "--fsdp")
    assert "resumed from" in run(tmp_path / "b", "4", 2, "--fsdp", "--resume", "latest").stdout
    a, _ = _tensors(tmp_path / "a" / "f.safetensors")
    b, _ = _tensors(tmp_path / "b" / "f.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    run(tmp_path / "c", "2", 1)  # the state format is the same unsharded: a 1-process state resumes sharded
    run(tmp_path / "c", "4", 2, "--fsdp", "--resume", "latest")
    c, _ = _tensors(tmp_path / "c" / "f.safetensors")
    assert _max_diff(a, c) < 1e-5
