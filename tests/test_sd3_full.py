"""SD3 / SD3.5 full fine-tuning (`--network_module full` with an SD3 model; sd-scripts' sd3_train.py), through the
real CLI on test_sd3_train's tiny SAI-layout files: the save is sd3_train.py's single file (`model.diffusion_model.*`
and the VAE as `first_stage_model.*`) that our loader reads back, a stopped run resumes bit-identically, and with
`--fsdp` two gloo processes shard the MMDiT's joint blocks and train what one process at twice the batch trains."""
from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from tests.test_flux_full import _max_diff, _tensors, _train
from tests.test_sd3_train import _args, sd3_files  # noqa: F401  (a fixture)


def _full(files: dict, out: Path, *extra: str) -> list[str]:
    args = _args(files, out, *extra)
    args[args.index("--network_module") + 1] = "full"
    args[args.index("--learning_rate") + 1] = "1e-2"
    return args


def _part(sd: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}


def test_sd3_full_finetune_saves_sd3_train_s_file_that_loads_back_and_resumes(sd3_files, tmp_path):  # noqa: F811
    from loratrain.core.models.sd3_loading import load_sd3, sd3_sources

    res = _train(_full(sd3_files, tmp_path / "a"))
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert "full fine-tune of the SD3 transformer" in res.stdout and "sd3_train.py" in res.stdout
    base, _ = _tensors(sd3_files["model"])
    sd, meta = _tensors(tmp_path / "a" / "s.safetensors")
    assert sd.keys() == base.keys()  # the MMDiT and the VAE, under SAI's prefixes, nothing else
    mmdit, vae = "model.diffusion_model.", "first_stage_model."
    assert _max_diff(_part(sd, mmdit), _part(base, mmdit)) > 1e-3  # it trained
    assert all(torch.equal(sd[k], base[k]) for k in sd if k.startswith(vae))  # the VAE as it was
    assert meta["modelspec.architecture"] == "stable-diffusion-3-5-medium" and meta["loratrain.full_finetune"] == "1"
    assert meta["modelspec.implementation"] == "https://github.com/Stability-AI/generative-models"
    parts = {k: str(sd3_files[k]) for k in ("clip_l", "clip_g", "t5xxl", "t5_tokenizer")}
    loaded = load_sd3(sd3_sources(str(tmp_path / "a" / "s.safetensors"), **parts), torch.float32)
    assert all(torch.equal(v, sd[mmdit + k]) for k, v in loaded.transformer.state_dict().items())
    # stopped after 2 steps and resumed: the same file as the unbroken run
    half = _full(sd3_files, tmp_path / "b")
    half[half.index("--max_train_steps") + 1] = "2"
    assert _train(half).returncode == 0
    res = _train(_full(sd3_files, tmp_path / "b", "--resume", "latest"))
    assert res.returncode == 0 and "resumed from" in res.stdout, res.stdout[-3000:] + res.stderr[-3000:]
    b, _ = _tensors(tmp_path / "b" / "s.safetensors")
    assert all(torch.equal(sd[k], b[k]) for k in sd)


def test_sd3_fsdp_two_processes_equal_one_with_twice_the_batch(sd3_files, tmp_path):  # noqa: F811
    runs, logs = {}, {}
    for label, batch, processes, fsdp in (("one", "2", 1, False), ("fsdp", "1", 2, True), ("b1", "1", 1, False)):
        args = _full(sd3_files, tmp_path / label, "--optimizer_type", "SGD", "--max_grad_norm", "0",
                     "--sample_prompts", str(sd3_files["prompts"]), "--sample_every_n_steps", "4",
                     *(["--fsdp"] if fsdp else []))
        args[args.index("--train_batch_size") + 1] = batch
        args[args.index("--learning_rate") + 1] = "0.5"
        res = _train(args, processes)
        assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
        runs[label], logs[label] = _tensors(tmp_path / label / "s.safetensors")[0], res.stdout
    assert _max_diff(runs["one"], runs["b1"]) > 1e-3  # batch 1 alone learns something else: the check below can fail
    diff = _max_diff(runs["one"], runs["fsdp"])
    print(f"SD3 fsdp 2 x 1 vs 1 x 2: max diff {diff:.3g}; batch 1 vs 2: {_max_diff(runs['one'], runs['b1']):.3g}")
    assert diff < 1e-5
    shares = re.findall(r"process (\d) (\d+) of (\d+) \(([\d.]+)%\)", logs["fsdp"])
    assert [s[0] for s in shares] == ["0", "1"] and "4 blocks + the root" in logs["fsdp"], logs["fsdp"][-2000:]
    assert all(40 <= float(pct) <= 60 for *_, pct in shares)
    for label in ("one", "fsdp"):  # a sharded run samples on every process; the first one writes the image
        assert len(list((tmp_path / label / "sample").glob("*.png"))) == 1, label


@pytest.mark.parametrize("extra, option", [
    (("--blocks_to_swap", "1", "--gradient_checkpointing"), "blocks_to_swap"),
    (("--network_args", "emb_dims=[2,0,0,0,0,0]"), "emb_dims"),
    (("--save_diffusers_layout",), "save_diffusers_layout"),
])
def test_what_an_sd3_full_finetune_cannot_do_is_refused_before_loading(sd3_files, tmp_path, extra, option):  # noqa: F811
    res = _train(_full(sd3_files, tmp_path / "o", *extra))
    assert res.returncode == 2 and option in res.stderr and "SD3 full fine-tune" in res.stderr, res.stderr[-2000:]
    assert not (tmp_path / "o").exists() or not any((tmp_path / "o").iterdir())
