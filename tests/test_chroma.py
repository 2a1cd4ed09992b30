"""Chroma (FLUX.1's blocks, no CLIP-L, approximator modulation): the model against diffusers' ChromaTransformer2DModel,
sd-scripts' T5 attention rule, sd-scripts' lora_flux targets on Chroma, and `loratrain train` / `generate` end to end
through the real CLI on a tiny Chroma file built here (T5, AE, tokenizer and images: test_flux_train's fixture)."""
from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from loratrain.core.errors import ConfigError
from loratrain.core.lora.flux_network import create_flux_lora, flux_lora_targets, kohya_flux_state_dict, linear_shapes
from loratrain.core.models.chroma import CHROMA, CHROMA_TINY, ChromaTransformer, build_transformer
from loratrain.core.models.flux import FluxTransformer, flux_config_from_shapes
from loratrain.core.models.flux_keys import bfl_to_diffusers, diffusers_to_bfl
from tests.test_flux_train import _save, _tensors, flux_files  # noqa: F401 - module-scoped tiny T5 / AE / tokenizer / images


def _random(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    with torch.no_grad():  # every parameter random (norm scales too), so no swapped row or missing offset can hide
        for p in model.parameters():
            p.normal_(0, 0.2)
    return model.eval()


def _inputs(cfg, batch=2, side=4, n_txt=7, seed=1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.zeros(side, side, 3)
    ids[..., 1], ids[..., 2] = torch.arange(side)[:, None], torch.arange(side)[None]
    return dict(img=torch.randn(batch, side * side, cfg.in_channels, generator=g), img_ids=ids.reshape(-1, 3),
                txt=torch.randn(batch, n_txt, cfg.context_in_dim, generator=g), txt_ids=torch.zeros(n_txt, 3),
                timesteps=torch.rand(batch, generator=g))


def test_same_output_as_diffusers_chroma_transformer():
    from diffusers import ChromaTransformer2DModel

    theirs = _random(ChromaTransformer2DModel(
        patch_size=1, in_channels=4, num_layers=1, num_single_layers=1, attention_head_dim=16, num_attention_heads=2,
        joint_attention_dim=32, axes_dims_rope=(4, 4, 8), approximator_num_channels=16, approximator_hidden_dim=24,
        approximator_layers=2))
    bfl = diffusers_to_bfl(theirs.state_dict())
    cfg = flux_config_from_shapes({k: tuple(v.shape) for k, v in bfl.items()})
    assert cfg == CHROMA_TINY and cfg.variant == "chroma"
    ours = ChromaTransformer(cfg).eval()
    ours.load_state_dict(bfl, strict=True)
    back = bfl_to_diffusers(ours.state_dict())
    assert back.keys() == theirs.state_dict().keys()
    assert all(torch.equal(back[k], v) for k, v in theirs.state_dict().items())
    for m in theirs.modules():  # diffusers' nn.RMSNorm defaults to float eps; Chroma's (and sd-scripts') is 1e-6
        if isinstance(m, torch.nn.RMSNorm):
            m.eps = 1e-6
    x = _inputs(cfg)
    with torch.no_grad():  # diffusers' Chroma always feeds guidance 0 to the approximator; ours defaults to it
        ref = theirs(hidden_states=x["img"], encoder_hidden_states=x["txt"], timestep=x["timesteps"],
                     img_ids=x["img_ids"], txt_ids=x["txt_ids"]).sample
        out = ours(**x)
    assert ref.abs().max() > 0.5
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def test_t5_mask_as_sd_scripts_applies_it_to_chroma():
    """Each prompt attends mask.sum() + 1 T5 tokens (sd-scripts' attn_padding=1); the batch is trimmed to the longest."""
    model = _random(ChromaTransformer(CHROMA_TINY))
    x = _inputs(CHROMA_TINY, batch=2, n_txt=7)
    mask = torch.zeros(2, 7, dtype=torch.long)
    mask[0, :3], mask[1, :5] = 1, 1  # attends 4 and 6 tokens
    with torch.no_grad():
        out = model(**x, txt_mask=mask)
        beyond = x["txt"].clone()
        beyond[0, 4:] += 3.0
        beyond[1, 6:] += 3.0
        assert torch.allclose(model(**{**x, "txt": beyond}, txt_mask=mask), out, atol=1e-6)
        pad = x["txt"].clone()
        pad[0, 3] += 3.0  # the one padding token a prompt attends
        assert (model(**{**x, "txt": pad}, txt_mask=mask)[0] - out[0]).abs().max() > 1e-3
        single = model(**{k: v[:1] if k in ("img", "txt", "timesteps") else v for k, v in x.items()}, txt_mask=mask[:1])
        torch.testing.assert_close(single, out[:1], atol=1e-5, rtol=1e-5)  # trimmed alone or masked in a batch: same
        assert (model(**x) - out).abs().max() > 1e-3  # no mask: every token attends
        g = torch.full((2,), 3.5)
        assert (model(**x, guidance=g, txt_mask=mask) - out).abs().max() > 1e-3  # guidance feeds the approximator


def test_config_detection_and_model_build():
    with torch.device("meta"):
        model = build_transformer(CHROMA)
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert isinstance(model, ChromaTransformer) and flux_config_from_shapes(shapes) == CHROMA
    assert flux_config_from_shapes({"model.diffusion_model." + k: v for k, v in shapes.items()}) == CHROMA
    assert shapes["distilled_guidance_layer.in_proj.weight"] == (5120, 64) and CHROMA.modulation_count == 344
    assert not any(k.startswith(("time_in", "vector_in", "guidance_in")) or "_mod." in k or "modulation" in k
                   for k in shapes)
    assert 8.8e9 < sum(p.numel() for p in model.parameters()) < 8.95e9  # Chroma's 8.9B
    with pytest.raises(ConfigError, match="without distilled_guidance_layer.out_proj.weight"):
        flux_config_from_shapes({k: v for k, v in shapes.items() if not k.startswith("distilled_guidance_layer.out")})
    with pytest.raises(ConfigError, match="ChromaTransformer"):
        FluxTransformer(CHROMA_TINY)


def test_lora_targets_are_sd_scripts_lora_flux_on_chroma():
    """sd-scripts' lora_flux walks DoubleStreamBlock / SingleStreamBlock Linears: on Chroma those have no modulation
    (checked against sd-scripts 48d368fa's network on the same tiny Chroma: same keys, same shapes)."""
    cfg = dataclasses.replace(CHROMA_TINY, depth=2, depth_single_blocks=2)
    model = ChromaTransformer(cfg)
    linears = {n: (m.in_features, m.out_features) for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    blocks = {n: s for n, s in linears.items() if n.startswith(("double_blocks.", "single_blocks."))}
    assert set(flux_lora_targets(cfg, 4)) == set(blocks) and len(blocks) == 2 * 8 + 2 * 2
    assert {p: s for p, s in linear_shapes(cfg).items()} == {**blocks, "img_in": linears["img_in"], "txt_in": linears["txt_in"]}
    with_in = flux_lora_targets(cfg, 4, in_dims=[4, 2, 2, 2, 3])
    assert {p: r for p, r in with_in.items() if not p.startswith(("double", "single"))} == {"img_in": 4, "txt_in": 3}
    sd = kohya_flux_state_dict(create_flux_lora(cfg, 4, 2.0, train_blocks="single"))
    assert sorted({k.split(".")[0] for k in sd}) == ["lora_unet_single_blocks_0_linear1", "lora_unet_single_blocks_0_linear2",
                                                     "lora_unet_single_blocks_1_linear1", "lora_unet_single_blocks_1_linear2"]
    assert sd["lora_unet_single_blocks_0_linear1.lora_up.weight"].shape == (3 * 32 + 128, 4)


# ---- the CLI on a tiny Chroma file ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def chroma_files(flux_files, tmp_path_factory) -> dict[str, Path]:  # noqa: F811
    cfg = dataclasses.replace(CHROMA_TINY, in_channels=16)  # the tiny AE's 4 latent channels x 2x2
    model = _random(ChromaTransformer(cfg), seed=3)
    path = tmp_path_factory.mktemp("chroma") / "chroma_tiny.safetensors"
    return {**flux_files, "model": _save({"model.diffusion_model." + k: v for k, v in model.state_dict().items()}, path)}


def _args(files: dict[str, Path], out: Path, *extra: str, mask: bool = True) -> list[str]:
    args = ["--pretrained_model_name_or_path", str(files["model"]), "--train_data_dir", str(files["data"]),
            "--output_dir", str(out), "--output_name", "c", "--resolution", "64", "--network_module", "networks.lora_flux",
            "--network_dim", "4", "--network_alpha", "2", "--learning_rate", "1e-2", "--max_train_steps", "4",
            "--train_batch_size", "2", "--seed", "5", "--save_precision", "float", "--network_train_unet_only",
            "--timestep_sampling", "sigmoid", "--model_prediction_type", "raw", "--guidance_scale", "0.0",
            "--t5xxl_max_token_length", "8", "--gradient_checkpointing", "--t5xxl", str(files["t5xxl"]),
            "--ae", str(files["ae"]), "--t5_tokenizer", str(files["t5_tokenizer"])]
    return args + ["--apply_t5_attn_mask"] * mask + list(extra)


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "loratrain", *args], capture_output=True, text=True, timeout=600)


def test_cli_trains_a_chroma_lora_samples_with_cfg_and_generate_applies_it(chroma_files, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a photo of sks dog --w 64 --h 64 --s 2 --d 11 --l 4 --n square\nsks dog circle --s 2\n")
    res = _run("train", *_args(chroma_files, tmp_path / "o", "--clip_l", str(chroma_files["clip_l"]), "--sample_prompts",
                               str(prompts), "--sample_every_n_steps", "4"))
    log = res.stdout + res.stderr
    assert res.returncode == 0, log[-4000:]
    assert "model: Chroma" in log and "clip_l.safetensors is unused: Chroma has no CLIP-L" in log
    sd, meta = _tensors(tmp_path / "o" / "c.safetensors")
    names = {k.split(".")[0] for k in sd}
    assert len(names) == 8 + 2 and "lora_unet_double_blocks_0_txt_attn_qkv" in names
    assert not any("_mod_" in n or "modulation" in n for n in names)
    assert any(sd[k].abs().max() > 0 for k in sd if k.endswith("lora_up.weight"))  # it trained
    assert meta["ss_base_model_version"] == "chroma" and meta["modelspec.architecture"] == "chroma/lora"
    assert meta["modelspec.implementation"] == "https://huggingface.co/lodestones/Chroma"
    assert meta["ss_model_type"] == "chroma" and meta["ss_apply_t5_attn_mask"] == "True"
    assert meta["ss_guidance_scale"] == "0.0" and meta["ss_t5xxl_max_token_length"] == "8"
    losses = json.loads((tmp_path / "o" / "c-state" / "train_state.json").read_text())["losses"]
    assert len(losses) == 4 and all(np.isfinite(losses))
    samples = sorted((tmp_path / "o" / "sample").glob("*.png"))
    assert [p.name for p in samples] == ["c_000004_00_11.png", "c_000004_01_6.png"]
    info = [Image.open(p).info["parameters"] for p in samples]
    assert "Model type: Chroma" in info[0] and "CFG scale: 4" in info[0] and "Negative prompt: square" in info[0]
    assert "Distilled CFG Scale" not in info[0] and "CFG scale: 1" in info[1]

    def generate(out: Path, *extra: str) -> np.ndarray:
        r = _run("generate", "--model", str(chroma_files["model"]), "--prompt", "a photo of sks dog", "--width", "64",
                 "--height", "64", "--steps", "3", "--seed", "7", "--cfg_scale", "3", "--output", str(out),
                 "--t5xxl", str(chroma_files["t5xxl"]), "--ae", str(chroma_files["ae"]), "--t5_tokenizer",
                 str(chroma_files["t5_tokenizer"]), "--t5xxl_max_token_length", "8", *extra)
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
        return np.asarray(Image.open(out).convert("RGB")).astype(np.int16)

    base = generate(tmp_path / "base.png")
    assert "Model type: Chroma" in Image.open(tmp_path / "base.png").info["parameters"]
    assert np.array_equal(base, generate(tmp_path / "zero.png", "--network_weights", f"{tmp_path / 'o' / 'c.safetensors'}:0"))
    assert np.abs(base - generate(tmp_path / "lora.png", "--network_weights", f"{tmp_path / 'o' / 'c.safetensors'}:1")).max() > 0
    assert np.abs(base - generate(tmp_path / "nocfg.png", "--cfg_scale", "1")).max() > 0  # CFG with "" negative runs


def test_chroma_stop_and_resume_equals_an_unbroken_run(chroma_files, tmp_path):
    from loratrain.core.progress import RecordingReporter
    from loratrain.training.trainer import run_train

    from .flow_helpers import config_from_args, run_stopped_at

    straight = run_train(config_from_args(_args(chroma_files, tmp_path / "a")), RecordingReporter())
    run_stopped_at(_args(chroma_files, tmp_path / "b"))
    res = _run("train", *_args(chroma_files, tmp_path / "b", "--resume", "latest"))
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    a, _ = _tensors(straight.lora_path)
    b, _ = _tensors(tmp_path / "b" / "c.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    from loratrain.core.lora.flux_network import flux_lora_from_kohya  # reload: the file is this model's network

    net = flux_lora_from_kohya(dataclasses.replace(CHROMA_TINY, in_channels=16), b)
    assert len(net.lora) == 10


def test_chroma_config_problems_are_named_before_loading(chroma_files, flux_files, tmp_path):  # noqa: F811
    res = _run("train", *_args(chroma_files, tmp_path / "o", mask=False))
    assert res.returncode == 2 and "apply_t5_attn_mask" in res.stderr and "Chroma needs" in res.stderr, res.stderr[-2000:]
    res = _run("train", *_args(chroma_files, tmp_path / "o", "--model_type", "flux"))
    assert res.returncode == 2 and "model_type" in res.stderr and "Chroma transformer" in res.stderr, res.stderr[-2000:]
    flux_as_chroma = _args(flux_files, tmp_path / "o", "--model_type", "chroma", "--clip_l", str(flux_files["clip_l"]))
    res = _run("train", *flux_as_chroma)
    assert res.returncode == 2 and "model_type: chroma" in res.stderr and "FLUX.1 dev" in res.stderr, res.stderr[-2000:]
    assert "caching latents" not in res.stdout + res.stderr and not (tmp_path / "o").exists()
