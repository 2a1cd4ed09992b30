"""FLUX.1 LoRA training end to end (issue 25): tiny FLUX transformer, CLIP-L, T5 and AE files built here, the real CLI,
sd-scripts' LoRA keys and metadata, bit-exact resume, and clear errors before anything loads."""
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
from safetensors import safe_open
from safetensors.torch import save_file

from loratrain.core.models.flux import FLUX_TINY, FluxTransformer

CFG = dataclasses.replace(FLUX_TINY, in_channels=16, guidance_embed=True)  # 4 latent channels x 2x2 patch; dev


def _save(sd: dict[str, torch.Tensor], path: Path) -> Path:
    save_file({k: v.detach().clone().contiguous() for k, v in sd.items()}, str(path))
    return path


@pytest.fixture(scope="module")
def flux_files(tmp_path_factory) -> dict[str, Path]:
    from diffusers import AutoencoderKL
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    from loratrain.core.models.ldm_keys import convert_keys, vae_module_pairs, vae_reshape
    from loratrain.core.models.text_encoder_keys import canonical_state_dict

    root = tmp_path_factory.mktemp("flux")
    torch.manual_seed(0)
    out = {"model": _save({"model.diffusion_model." + k: v for k, v in FluxTransformer(CFG).state_dict().items()},
                          root / "flux_tiny.safetensors")}
    clip = CLIPTextModel(CLIPTextConfig(vocab_size=49408, hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                                        num_attention_heads=1, max_position_embeddings=77, eos_token_id=2))
    out["clip_l"] = _save(canonical_state_dict(clip), root / "clip_l.safetensors")  # text_model.* as the files have it
    words = ["<pad>", "</s>", "<unk>", "a", "photo", "of", "sks", "dog", "circle", "square"]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    (root / "t5_tok").mkdir()
    tok.save(str(root / "t5_tok" / "tokenizer.json"))
    out["t5_tokenizer"] = root / "t5_tok"
    t5 = T5EncoderModel(T5Config(vocab_size=len(words), d_model=32, d_ff=37, d_kv=8, num_heads=4, num_layers=2,
                                 feed_forward_proj="gated-gelu", relative_attention_num_buckets=8, dropout_rate=0.0))
    out["t5xxl"] = _save(t5.state_dict(), root / "t5xxl.safetensors")
    ae_cfg = dict(block_out_channels=[32, 32, 32], layers_per_block=1, latent_channels=4, norm_num_groups=32,
                  down_block_types=["DownEncoderBlock2D"] * 3, up_block_types=["UpDecoderBlock2D"] * 3,
                  use_quant_conv=False, use_post_quant_conv=False)  # FLUX.1's AE has no quant convs
    ae = AutoencoderKL(**ae_cfg)
    ldm = vae_reshape(convert_keys(ae.state_dict(), vae_module_pairs(ae_cfg), to_ldm=True, what="ae"), to_ldm=True)
    out["ae"] = _save(ldm, root / "ae.safetensors")
    data = root / "img" / "2_sks dog"
    data.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(4):
        Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(data / f"{i}.png")
        (data / f"{i}.txt").write_text("a photo of sks dog" if i % 2 else "sks dog circle")
    out["data"] = root / "img"
    return out


def _args(files: dict[str, Path], out: Path, *extra: str, skip: tuple[str, ...] = ()) -> list[str]:
    args = ["--pretrained_model_name_or_path", str(files["model"]), "--train_data_dir", str(files["data"]),
            "--output_dir", str(out), "--output_name", "f", "--resolution", "64", "--network_module", "networks.lora_flux",
            "--network_dim", "4", "--network_alpha", "2", "--learning_rate", "1e-3", "--max_train_steps", "4",
            "--train_batch_size", "2", "--seed", "5", "--save_precision", "float", "--network_train_unet_only",
            "--timestep_sampling", "shift", "--discrete_flow_shift", "3.1582", "--model_prediction_type", "raw",
            "--guidance_scale", "1.0", "--apply_t5_attn_mask", "--t5xxl_max_token_length", "8", "--gradient_checkpointing"]
    for name in ("clip_l", "t5xxl", "ae", "t5_tokenizer"):
        if name not in skip:
            args += [f"--{name}", str(files[name])]
    return args + list(extra)


def _cli(args: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "loratrain", "train", *args], capture_output=True, text=True, timeout=600)


def _tensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    with safe_open(str(path), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata())


def test_cli_trains_a_flux_lora_with_sd_scripts_keys_and_metadata(flux_files, tmp_path):
    res = _cli(_args(flux_files, tmp_path / "o", "--network_args", "train_blocks=all", "split_qkv=True",
                     "--save_diffusers_layout"))
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert "FLUX.1 dev" in res.stdout + res.stderr
    sd, meta = _tensors(tmp_path / "o" / "f.safetensors")
    assert "lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight" in sd
    assert sd["lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight"].shape == (12, 32)  # split_qkv: 3 x rank 4
    assert sd["lora_unet_single_blocks_0_linear1.lora_up.weight"].shape == (32 * 3 + 128, 16)
    assert all(k.startswith(("lora_unet_double_blocks_", "lora_unet_single_blocks_")) for k in sd)
    assert any(sd[k].abs().max() > 0 for k in sd if k.endswith("lora_up.weight"))  # it trained
    assert meta["ss_base_model_version"] == "flux1" and meta["modelspec.architecture"] == "flux-1-dev/lora"
    assert meta["ss_network_module"] == "networks.lora_flux"
    assert meta["ss_timestep_sampling"] == "shift" and meta["ss_discrete_flow_shift"] == "3.1582"
    assert meta["ss_model_prediction_type"] == "raw" and meta["ss_apply_t5_attn_mask"] == "True"
    assert json.loads(meta["ss_network_args"]) == {"split_qkv": "True"}
    assert meta["ss_steps"] == "4" and "sshs_model_hash" in meta
    losses = json.loads((tmp_path / "o" / "f-state" / "train_state.json").read_text())["losses"]
    assert len(losses) == 4 and all(np.isfinite(losses))
    # --save_diffusers_layout: the diffusers twin converts back to the same ΔW
    from loratrain.core.lora.flux_layouts import flux_lora_to_kohya

    twin, _ = _tensors(tmp_path / "o" / "f.diffusers.safetensors")
    assert twin and all(k.startswith("transformer.") and ".lora_" in k for k in twin)
    back = flux_lora_to_kohya(twin)

    def delta(s: dict, name: str) -> torch.Tensor:
        down, up = s[f"{name}.lora_down.weight"].double(), s[f"{name}.lora_up.weight"].double()
        return float(s.get(f"{name}.alpha", down.shape[0])) / down.shape[0] * up @ down

    for name in ("lora_unet_double_blocks_0_img_attn_qkv", "lora_unet_single_blocks_0_linear1"):
        assert torch.allclose(delta(back, name), delta(sd, name), rtol=1e-4, atol=1e-6), name


def test_stop_and_resume_equals_an_unbroken_run(flux_files, tmp_path):
    from loratrain.core.progress import RecordingReporter
    from loratrain.training.trainer import run_train

    from .flow_helpers import config_from_args, run_stopped_at

    straight = run_train(config_from_args(_args(flux_files, tmp_path / "a")), RecordingReporter())
    run_stopped_at(_args(flux_files, tmp_path / "b"))
    res = _cli(_args(flux_files, tmp_path / "b", "--resume", "latest"))
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert "resumed from" in res.stdout + res.stderr
    a, _ = _tensors(straight.lora_path)
    b, _ = _tensors(tmp_path / "b" / "f.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_missing_t5xxl_is_one_clear_error_before_loading(flux_files, tmp_path):
    res = _cli(_args(flux_files, tmp_path / "o", skip=("t5xxl",)))
    assert res.returncode == 2, res.stdout[-2000:] + res.stderr[-2000:]
    assert "t5xxl" in res.stderr and "T5-XXL" in res.stderr
    assert "caching latents" not in res.stdout + res.stderr and not (tmp_path / "o" / "f.safetensors").exists()


def test_a_non_flux_file_is_refused_clearly(flux_files, tmp_path):
    sd_file = _save({"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(4, 4, 3, 3)}, tmp_path / "sd.safetensors")
    args = _args(flux_files, tmp_path / "o", "--model_family", "flux")
    args[args.index(str(flux_files["model"]))] = str(sd_file)
    res = _cli(args)
    assert res.returncode == 2, res.stdout[-2000:] + res.stderr[-2000:]
    assert "not a FLUX.1 transformer" in res.stderr and "sd.safetensors" in res.stderr


def test_an_sd_vae_as_ae_is_refused_before_loading(flux_files, tmp_path):
    from safetensors.torch import load_file

    sd = load_file(str(flux_files["ae"]))
    with_quant = _save({**sd, "quant_conv.weight": torch.zeros(8, 8, 1, 1)}, tmp_path / "sd_vae.safetensors")
    res = _cli(_args(flux_files, tmp_path / "o", "--ae", str(with_quant), skip=("ae",)))
    assert res.returncode == 2, res.stdout[-2000:] + res.stderr[-2000:]
    assert "error: ae:" in res.stderr and "not FLUX.1's autoencoder" in res.stderr and "Traceback" not in res.stderr
    assert "caching latents" not in res.stdout + res.stderr and not (tmp_path / "o").exists()
    from loratrain.core.errors import ConfigError
    from loratrain.core.models.flux_loading import flux_sources

    wide = _save({**sd, "encoder.conv_out.weight": torch.zeros(16, 32, 3, 3)}, tmp_path / "wide.safetensors")
    with pytest.raises(ConfigError, match="8 latent channels, the transformer takes 4"):
        flux_sources(str(flux_files["model"]), str(flux_files["clip_l"]), str(flux_files["t5xxl"]), str(wide),
                     str(flux_files["t5_tokenizer"]))


def test_a_damaged_or_linked_out_t5_tokenizer_is_named_before_loading(flux_files, tmp_path):
    import os

    from loratrain.core.errors import ConfigError
    from loratrain.core.models.flux_loading import flux_sources
    from loratrain.core.paths import confined

    def sources(tok: Path) -> object:
        return flux_sources(str(flux_files["model"]), str(flux_files["clip_l"]), str(flux_files["t5xxl"]),
                            str(flux_files["ae"]), str(tok))

    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "tokenizer.json").write_text("not json")
    with pytest.raises(ConfigError, match=r"^t5_tokenizer: .*bad is not a readable tokenizer"):
        sources(tmp_path / "bad")
    (tmp_path / "spm").mkdir()
    (tmp_path / "spm" / "spiece.model").write_bytes(b"x")  # no tokenizer.json nor tokenizer_config.json to load it by
    with pytest.raises(ConfigError, match="no tokenizer.json"):
        sources(tmp_path / "spm")
    # the folder is inside the roots, its vocabulary (read by the tokenizers library, not Python) links out
    root = tmp_path / "ws"
    (root / "tok").mkdir(parents=True)
    os.symlink(flux_files["t5_tokenizer"] / "tokenizer.json", root / "tok" / "tokenizer.json")
    for name in ("model", "clip_l", "t5xxl", "ae"):
        os.link(flux_files[name], root / flux_files[name].name)
    with confined([root]), pytest.raises(ConfigError, match=r"^t5_tokenizer: .*outside the workspace"):
        flux_sources(*(str(root / flux_files[n].name) for n in ("model", "clip_l", "t5xxl", "ae")), str(root / "tok"))
