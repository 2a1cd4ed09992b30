"""SD3.5 LoRA training end to end (issue 25): a tiny SD3.5 MMDiT (diffusers' test sizes), CLIP-L, CLIP-G, T5 and VAE
built here in SAI's file layouts, the real CLI, sd-scripts' lora_sd3 keys and SD3 metadata, samples, bit-exact resume,
reload, and clear errors before anything loads."""
from __future__ import annotations

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

from loratrain.core.models.sd3 import SD35_TINY, SD3Transformer

CFG = SD35_TINY  # patch 1, 4 latent channels, 4 joint blocks, MMDiT-X attn2 on block 0: "5-medium"


def _save(sd: dict[str, torch.Tensor], path: Path) -> Path:
    save_file({k: v.detach().clone().contiguous() for k, v in sd.items()}, str(path))
    return path


def _clip(hidden: int, proj: int) -> dict[str, torch.Tensor]:
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    from loratrain.core.models.text_encoder_keys import canonical_state_dict

    model = CLIPTextModelWithProjection(CLIPTextConfig(
        vocab_size=49408, hidden_size=hidden, intermediate_size=37, num_hidden_layers=2, num_attention_heads=1,
        max_position_embeddings=77, projection_dim=proj, eos_token_id=49407))
    return canonical_state_dict(model)


@pytest.fixture(scope="module")
def sd3_files(tmp_path_factory) -> dict[str, Path]:
    from diffusers import AutoencoderKL
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import T5Config, T5EncoderModel

    from loratrain.core.models.ldm_keys import convert_keys, vae_module_pairs, vae_reshape

    root = tmp_path_factory.mktemp("sd3")
    torch.manual_seed(0)
    mmdit = SD3Transformer(CFG)
    with torch.no_grad():
        for p in mmdit.parameters():  # diffusers' init leaves some zero; random everywhere so every LoRA gets a gradient
            p.normal_(0, 0.05)
    ae_cfg = dict(block_out_channels=[32, 32, 32], layers_per_block=1, latent_channels=4, norm_num_groups=32,
                  down_block_types=["DownEncoderBlock2D"] * 3, up_block_types=["UpDecoderBlock2D"] * 3,
                  use_quant_conv=False, use_post_quant_conv=False)  # SD3's VAE has no quant convs
    ae = AutoencoderKL(**ae_cfg)
    ldm = vae_reshape(convert_keys(ae.state_dict(), vae_module_pairs(ae_cfg), to_ldm=True, what="vae"), to_ldm=True)
    # SAI's layout: the MMDiT and the VAE in one file, the encoders beside it
    out = {"model": _save({**{"model.diffusion_model." + k: v for k, v in mmdit.state_dict().items()},
                           **{"first_stage_model." + k: v for k, v in ldm.items()}}, root / "sd3.5_tiny.safetensors")}
    out["clip_l"] = _save(_clip(16, 32), root / "clip_l.safetensors")
    out["clip_g"] = _save(_clip(16, 32), root / "clip_g.safetensors")  # pooled 32 + 32 = the model's 64
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
    data = root / "img" / "2_sks dog"
    data.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(4):
        Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(data / f"{i}.png")
        (data / f"{i}.txt").write_text("a photo of sks dog" if i % 2 else "sks dog circle")
    out["data"] = root / "img"
    (root / "prompts.txt").write_text("sks dog --w 64 --h 64 --s 2 --d 7 --l 4 --n circle\n")
    out["prompts"] = root / "prompts.txt"
    return out


def _args(files: dict[str, Path], out: Path, *extra: str, skip: tuple[str, ...] = ()) -> list[str]:
    args = ["--pretrained_model_name_or_path", str(files["model"]), "--train_data_dir", str(files["data"]),
            "--output_dir", str(out), "--output_name", "s", "--resolution", "64", "--network_module", "networks.lora_sd3",
            "--network_dim", "4", "--network_alpha", "2", "--learning_rate", "1e-3", "--max_train_steps", "4",
            "--train_batch_size", "2", "--seed", "5", "--save_precision", "float", "--network_train_unet_only",
            "--weighting_scheme", "logit_normal", "--logit_mean", "0.1", "--training_shift", "2.0",
            "--apply_t5_attn_mask", "--apply_lg_attn_mask", "--t5xxl_max_token_length", "8", "--gradient_checkpointing"]
    for name in ("clip_l", "clip_g", "t5xxl", "t5_tokenizer"):
        if name not in skip:
            args += [f"--{name}", str(files[name])]
    return args + list(extra)


def _cli(args: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "loratrain", "train", *args], capture_output=True, text=True, timeout=600)


def _tensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    with safe_open(str(path), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata())


def test_cli_trains_an_sd35_lora_with_sd_scripts_keys_metadata_and_samples(sd3_files, tmp_path):
    from loratrain.core.lora.sd3_network import create_sd3_lora, kohya_sd3_state_dict

    res = _cli(_args(sd3_files, tmp_path / "o", "--network_args", "split_qkv=True", "emb_dims=[2,0,0,2,0,2]",
                     "--sample_prompts", str(sd3_files["prompts"]), "--sample_every_n_steps", "4"))
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert "SD3 5-medium" in res.stdout + res.stderr
    sd, meta = _tensors(tmp_path / "o" / "s.safetensors")
    # key for key and shape for shape what sd-scripts' lora_sd3 writes for these network_args (core tests compare
    # create_sd3_lora with sd-scripts' own network)
    want = kohya_sd3_state_dict(create_sd3_lora(CFG, 4, 2.0, split_qkv=True, emb_dims=[2, 0, 0, 2, 0, 2]))
    assert {k: tuple(v.shape) for k, v in sd.items()} == {k: tuple(v.shape) for k, v in want.items()}
    assert "lora_unet_joint_blocks_0_x_block_attn2_qkv.lora_down.weight" in sd  # MMDiT-X block
    assert "lora_unet_context_embedder.lora_up.weight" in sd
    assert any(sd[k].abs().max() > 0 for k in sd if k.endswith("lora_up.weight"))  # it trained
    assert meta["ss_base_model_version"] == "5-medium"
    assert meta["modelspec.architecture"] == "stable-diffusion-3-5-medium/lora"
    assert meta["ss_network_module"] == "networks.lora_sd3"
    assert meta["ss_weighting_scheme"] == "logit_normal" and meta["ss_logit_mean"] == "0.1"
    assert meta["ss_apply_lg_attn_mask"] == "True" and meta["ss_apply_t5_attn_mask"] == "True"
    assert json.loads(meta["ss_network_args"]) == {"split_qkv": "True", "emb_dims": "[2, 0, 0, 2, 0, 2]"}
    losses = json.loads((tmp_path / "o" / "s-state" / "train_state.json").read_text())["losses"]
    assert len(losses) == 4 and all(np.isfinite(losses))
    samples = sorted((tmp_path / "o" / "sample").glob("*.png"))
    assert samples, res.stdout[-2000:]
    with Image.open(samples[-1]) as im:
        assert im.size == (64, 64) and "Model type: SD3 5-medium" in im.info["parameters"]
        assert "CFG scale: 4" in im.info["parameters"]
    # reload: the file starts a new run (--network_weights) with every module filled
    res = _cli(_args(sd3_files, tmp_path / "r", "--network_args", "split_qkv=True", "emb_dims=[2,0,0,2,0,2]",
                     "--network_weights", str(tmp_path / "o" / "s.safetensors"), "--max_train_steps", "1"))
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    n = len({k.split(".")[0] for k in sd})
    assert f"{n} of {n} modules" in res.stdout + res.stderr


def test_sd35_stop_and_resume_equals_an_unbroken_run(sd3_files, tmp_path):
    from loratrain.core.progress import RecordingReporter
    from loratrain.training.trainer import run_train

    from .flow_helpers import config_from_args, run_stopped_at

    straight = run_train(config_from_args(_args(sd3_files, tmp_path / "a")), RecordingReporter())
    run_stopped_at(_args(sd3_files, tmp_path / "b"))
    res = _cli(_args(sd3_files, tmp_path / "b", "--resume", "latest"))
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert "resumed from" in res.stdout + res.stderr
    a, _ = _tensors(straight.lora_path)
    b, _ = _tensors(tmp_path / "b" / "s.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("skip, extra, field, words", [
    (("clip_g",), (), "clip_g", "CLIP-G"),
    ((), ("--guidance_scale", "2"), "guidance_scale", "SD3 has no guidance input"),
    ((), ("--train_blocks", "single"), "train_blocks", "train_block_indices"),
    ((), ("--model_type", "chroma"), "model_type", "SD3 model is told from its keys"),
    ((), ("--train_block_indices", "0-9"), "train_block_indices", "outside"),
    ((), ("--network_module", "lycoris.kohya", "--network_args", "algo=ia3"), "network_module", "lora_sd3"),
    ((), ("--network_module", "lokr", "--network_args", "emb_dims=[0,0,2,0,0,0]"), "emb_dims", "patchifying conv"),
])
def test_sd3_mistakes_are_named_before_loading(sd3_files, tmp_path, skip, extra, field, words):
    res = _cli(_args(sd3_files, tmp_path / "o", *extra, skip=skip))
    assert res.returncode == 2, res.stdout[-2000:] + res.stderr[-2000:]
    assert field in res.stderr and words in res.stderr, res.stderr[-2000:]
    assert "caching latents" not in res.stdout + res.stderr and not (tmp_path / "o" / "s.safetensors").exists()


def test_an_sd_vae_or_a_flux_option_is_refused_for_sd3(sd3_files, tmp_path):
    from diffusers import AutoencoderKL

    from loratrain.core.models.ldm_keys import convert_keys, vae_module_pairs, vae_reshape

    cfg = dict(block_out_channels=[32, 32], layers_per_block=1, latent_channels=4, norm_num_groups=32,
               down_block_types=["DownEncoderBlock2D"] * 2, up_block_types=["UpDecoderBlock2D"] * 2)
    sd_vae = AutoencoderKL(**cfg)  # an SD VAE: quant convs
    ldm = vae_reshape(convert_keys(sd_vae.state_dict(), vae_module_pairs(cfg), to_ldm=True, what="vae"), to_ldm=True)
    path = _save(ldm, tmp_path / "sd_vae.safetensors")
    res = _cli(_args(sd3_files, tmp_path / "o", "--vae", str(path)))
    assert res.returncode == 2 and "vae" in res.stderr and "not SD3's VAE" in res.stderr, res.stderr[-2000:]
    res = _cli(_args(sd3_files, tmp_path / "o", "--ae", str(path)))
    assert res.returncode == 2 and "ae" in res.stderr and "--vae" in res.stderr, res.stderr[-2000:]


def test_generate_and_grid_with_an_sd3_model_and_lora(sd3_files, tmp_path):
    from loratrain.core.lora.sd3_network import create_sd3_lora, save_sd3_lora

    torch.manual_seed(3)
    net = create_sd3_lora(CFG, 4, 4.0)
    with torch.no_grad():
        for name, p in net.named_parameters():
            if "up" in name:
                p.normal_(0, 0.5)  # a LoRA that changes the image
    lora = save_sd3_lora(net, tmp_path / "l.safetensors")
    parts = ["--clip_l", str(sd3_files["clip_l"]), "--clip_g", str(sd3_files["clip_g"]), "--t5xxl", str(sd3_files["t5xxl"]),
             "--t5_tokenizer", str(sd3_files["t5_tokenizer"])]
    common = ["--model", str(sd3_files["model"]), "--prompt", "sks dog", "--width", "64", "--height", "64", "--steps", "2",
              "--seed", "3", *parts]

    def run(cmd: str, *args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "loratrain", cmd, *common, *args], capture_output=True, text=True,
                              timeout=600)

    images = {}
    for w in ("0", "1"):
        res = run("generate", "--network_weights", f"{lora}:{w}", "--output", str(tmp_path / f"g{w}.png"))
        assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
        with Image.open(tmp_path / f"g{w}.png") as im:
            assert im.size == (64, 64) and "Model type: SD3 5-medium" in im.info["parameters"]
            images[w] = np.asarray(im.convert("RGB")).astype(int)
    assert np.abs(images["1"] - images["0"]).max() > 0  # the LoRA is applied
    res = run("grid", "--loras", str(lora), "--x_type", "lora_weight", "--x_values", "0,1", "--y_type", "shift",
              "--y_values", "1,3", "--output_dir", str(tmp_path / "grid"))
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    assert len(list((tmp_path / "grid" / "cells").glob("*.png"))) >= 4
    res = run("grid", "--x_type", "guidance", "--x_values", "1,3", "--y_type", "seed", "--y_values", "1,2",
              "--output_dir", str(tmp_path / "bad"))
    assert res.returncode == 2 and "guidance" in res.stderr, res.stderr[-2000:]
    res = run("generate", "--ae", str(sd3_files["clip_l"]), "--output", str(tmp_path / "bad.png"))
    assert res.returncode == 2 and "ae" in res.stderr and not (tmp_path / "bad.png").exists(), res.stderr[-2000:]


@pytest.mark.parametrize("clip, words", [
    ((64, 32), "hidden sizes 16 + 64 = 80 are wider than this transformer's context (32)"),
    ((16, 48), "pooled sizes 32 + 48 = 80, this transformer's pooled_projection_dim is 64"),
])
def test_a_clip_g_that_does_not_fit_the_transformer_is_named_before_latents(sd3_files, tmp_path, clip, words):
    """A wrong CLIP-G (wider hidden states, another projection) was found only inside encoding or the first step."""
    wrong = _save(_clip(*clip), tmp_path / "wrong_g.safetensors")
    res = _cli(_args(sd3_files, tmp_path / "o", "--clip_g", str(wrong), skip=("clip_g",)))
    assert res.returncode == 2, res.stdout[-2000:] + res.stderr[-2000:]
    assert "error: clip_g:" in res.stderr and words in res.stderr, res.stderr[-2000:]
    assert "caching" not in res.stdout + res.stderr and not (tmp_path / "o").exists()


def test_the_same_clip_twice_through_dot_dot_is_refused(sd3_files, tmp_path):
    same = sd3_files["clip_l"].parent / "t5_tok" / ".." / sd3_files["clip_l"].name
    res = _cli(_args(sd3_files, tmp_path / "o", "--clip_g", str(same), skip=("clip_g",)))
    assert res.returncode == 2 and "clip_g" in res.stderr and "one CLIP only" in res.stderr, res.stderr[-2000:]


def test_a_flux_lora_as_network_weights_is_named_before_loading(sd3_files, tmp_path):
    from loratrain.core.lora.flux_network import create_flux_lora, kohya_flux_state_dict
    from loratrain.core.models.flux import FLUX_TINY

    flux_lora = _save(kohya_flux_state_dict(create_flux_lora(FLUX_TINY, 4, 1.0)), tmp_path / "flux_lora.safetensors")
    res = _cli(_args(sd3_files, tmp_path / "o", "--network_weights", str(flux_lora)))
    assert res.returncode == 2 and "network_weights" in res.stderr and "double_blocks" in res.stderr, res.stderr[-2000:]
    assert "caching" not in res.stdout + res.stderr and not (tmp_path / "o" / "s.safetensors").exists()


def test_sd3_blocks_to_swap_and_fp8_train_what_the_plain_run_trains(sd3_files, tmp_path):
    """On the CPU swapping saves nothing, but a swapped block that ran without its weights would change the result:
    the file must equal an unswapped run's bit for bit; fp8 base weights train too (and differ: they are rounded)."""
    runs = {}
    for label, extra in (("plain", ()), ("swap", ("--blocks_to_swap", "3")), ("fp8", ("--fp8_base", "--blocks_to_swap", "1"))):
        res = _cli(_args(sd3_files, tmp_path / label, "--max_train_steps", "2", *extra))
        assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
        runs[label], _ = _tensors(tmp_path / label / "s.safetensors")
        if label == "swap":
            assert "the last 3 joint blocks" in res.stdout + res.stderr
    assert all(torch.equal(runs["plain"][k], runs["swap"][k]) for k in runs["plain"])
    assert runs["fp8"].keys() == runs["plain"].keys()
    assert all(torch.isfinite(v).all() for v in runs["fp8"].values())
    res = _cli(_args(sd3_files, tmp_path / "bad", "--blocks_to_swap", "9"))
    assert res.returncode == 2 and "blocks_to_swap" in res.stderr and "this model has 4" in res.stderr, res.stderr[-2000:]


def test_sd3_save_diffusers_layout_twin_reloads(sd3_files, tmp_path):
    res = _cli(_args(sd3_files, tmp_path / "o", "--max_train_steps", "1", "--save_diffusers_layout"))
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    twin, meta = _tensors(tmp_path / "o" / "s.diffusers.safetensors")
    assert twin and all(k.startswith("transformer.transformer_blocks.") for k in twin) and meta["format"] == "pt"
    res = _cli(_args(sd3_files, tmp_path / "r", "--max_train_steps", "1", "--network_weights",
                     str(tmp_path / "o" / "s.diffusers.safetensors")))
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    n = len({k.split(".")[0] for k in _tensors(tmp_path / "o" / "s.safetensors")[0]})
    assert f"{n} of {n} modules" in res.stdout + res.stderr


def test_text_encoder_outputs_cached_on_disk_train_the_same_and_are_reused(sd3_files, tmp_path):
    import shutil

    data = tmp_path / "img"
    shutil.copytree(sd3_files["data"], data)
    files = {**sd3_files, "data": data}
    runs = {}
    for label, extra in (("memory", ()), ("disk", ("--cache_text_encoder_outputs_to_disk",)),
                         ("again", ("--cache_text_encoder_outputs_to_disk",))):
        res = _cli(_args(files, tmp_path / label, "--max_train_steps", "2", *extra))
        assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
        runs[label], _ = _tensors(tmp_path / label / "s.safetensors")
        if label == "disk":
            cached = sorted(data.rglob("*.flow_te.safetensors"))
            assert len(cached) == 2, cached  # one file per distinct caption, beside an image
            stamps = {p: p.stat().st_mtime_ns for p in cached}
    assert all(p.stat().st_mtime_ns == t for p, t in stamps.items())  # the second run read them, wrote nothing
    for label in ("disk", "again"):
        assert all(torch.equal(runs["memory"][k], runs[label][k]) for k in runs["memory"])
