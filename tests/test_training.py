"""End-to-end training on tiny models: output files other tools load, resume, faults."""
from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from loratrain.core.models.loading import load_model
from loratrain.core.progress import RecordingReporter, StopFlag
from loratrain.training.trainer import TrainingError, run_train

from .conftest import quick_config


def _tensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    with safe_open(str(path), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata())


def test_locon_kohya_file_loads_in_diffusers_with_exact_delta(tiny_files, dataset, tmp_path):
    cfg = quick_config(tiny_files["sd1_file"], dataset, tmp_path / "out", network_module="locon", conv_dim=2, conv_alpha=1.0,
                       max_train_steps=3)
    result = run_train(cfg, RecordingReporter())
    sd, meta = _tensors(result.lora_path)
    assert "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.lora_down.weight" in sd
    assert "lora_unet_down_blocks_0_resnets_0_conv1.lora_down.weight" in sd  # LoCon 3x3
    assert sd["lora_unet_down_blocks_0_resnets_0_conv1.lora_down.weight"].shape[2:] == (3, 3)
    assert sd["lora_unet_down_blocks_0_resnets_0_conv1.lora_up.weight"].shape[2:] == (1, 1)
    assert "lora_te_text_model_encoder_layers_0_self_attn_q_proj.alpha" in sd
    assert float(sd["lora_unet_down_blocks_0_attentions_0_proj_in.alpha"]) == 2.0
    assert meta["ss_network_module"] == "networks.lora" and meta["ss_network_dim"] == "4"
    assert meta["ss_base_model_version"] == "sd_v1" and meta["modelspec.architecture"] == "stable-diffusion-v1/lora"
    assert meta["ss_steps"] == "3"

    # diffusers loads the file unchanged and every key is used ...
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(str(tiny_files["sd1_dir"]), local_files_only=True, safety_checker=None)
    state, alphas = pipe.lora_state_dict(str(result.lora_path))
    assert len(state) == sum(1 for k in sd if not k.endswith(".alpha"))
    torch.manual_seed(0)
    x, t = torch.randn(1, 4, 8, 8), torch.tensor([500])
    ctx = torch.randn(1, 77, 32)
    with torch.no_grad():
        base = pipe.unet(x, t, ctx).sample
        pipe.load_lora_weights(str(result.lora_path))
        with_lora = pipe.unet(x, t, ctx).sample
    # ... and its output equals our trained network's, which differs from the base model's
    model = load_model(tiny_files["sd1_file"])
    from loratrain.training.networks import NetworkSpec, build_network
    from loratrain.training.saving import load_state

    net = build_network("locon", model, NetworkSpec(4, 2.0, 2, 1.0))
    net.load_state_dict(load_state(result.state_dir)[0])
    with torch.no_grad():
        ours = model.unet(x, t, ctx).sample
    assert not torch.allclose(base, ours, atol=1e-6)
    torch.testing.assert_close(with_lora, ours, atol=1e-5, rtol=1e-4)


def test_resume_continues_the_same_run(tiny_files, dataset, tmp_path):
    kw = dict(max_train_steps=6, gradient_accumulation_steps=2, train_batch_size=1, noise_offset=0.05, min_snr_gamma=5.0,
              lr_scheduler="cosine_with_restarts", lr_scheduler_num_cycles=2, shuffle_caption=True)
    straight = run_train(quick_config(tiny_files["sd1_file"], dataset, tmp_path / "a", **kw), RecordingReporter())

    class StopAt(RecordingReporter):
        def __init__(self, stop, at):
            super().__init__()
            self.stop_flag, self.at = stop, at

        def advance(self, n=1, **metrics):
            super().advance(n, **metrics)
            if metrics and self.step >= self.at:
                self.stop_flag.set()

    stop = StopFlag()
    first = run_train(quick_config(tiny_files["sd1_file"], dataset, tmp_path / "b", **kw), StopAt(stop, 2), stop)
    assert first.stopped and first.global_step == 2
    resumed = run_train(quick_config(tiny_files["sd1_file"], dataset, tmp_path / "b", resume="latest", **kw), RecordingReporter())
    assert resumed.global_step == 6
    a, _ = _tensors(straight.lora_path)
    b, _ = _tensors(resumed.lora_path)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert resumed.losses == pytest.approx(straight.losses)


def test_nan_loss_stops_and_keeps_last_good_save(tiny_files, dataset, tmp_path):
    cfg = quick_config(tiny_files["sd1_file"], dataset, tmp_path / "out", optimizer_type="SGD", learning_rate=1e30, max_grad_norm=0.0,
                       save_every_n_steps=1, max_train_steps=20, network_train_unet_only=True)
    with pytest.raises(TrainingError, match="loss became .*last good save is .*t-step00000001"):
        run_train(cfg, RecordingReporter())
    first, _ = _tensors(tmp_path / "out" / "t-step00000001.safetensors")
    assert all(torch.isfinite(v).all() for v in first.values())
    assert not (tmp_path / "out" / "t.safetensors").exists()


def test_corrupt_image_is_named_and_skipped_or_fatal(tiny_files, dataset, tmp_path):
    bad = dataset / "3_circle" / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\nthis is not an image")
    rec = RecordingReporter()
    result = run_train(quick_config(tiny_files["sd1_file"], dataset, tmp_path / "out", max_train_steps=1), rec)
    assert any("broken.png" in line and "corrupt" in line for line in rec.lines)
    assert result.lora_path.exists()
    with pytest.raises(ValueError, match="broken.png"):
        run_train(quick_config(tiny_files["sd1_file"], dataset, tmp_path / "out2", on_bad_image="error"), RecordingReporter())
    assert not (tmp_path / "out2" / "t.safetensors").exists()


def test_sdxl_lora_uses_ldm_names_and_loads_in_diffusers(tiny_files, dataset, tmp_path):
    result = run_train(quick_config(tiny_files["sdxl_file"], dataset, tmp_path / "out", max_train_steps=2), RecordingReporter())
    sd, meta = _tensors(result.lora_path)
    assert any(k.startswith("lora_unet_input_blocks_3_1_transformer_blocks_0_attn1_to_q") for k in sd)  # tiny: 1 layer per block
    assert any(k.startswith("lora_te1_text_model_encoder_layers_0") for k in sd)
    assert any(k.startswith("lora_te2_text_model_encoder_layers_1") for k in sd)
    assert meta["ss_base_model_version"] == "sdxl_base_v1-0"
    from diffusers import StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline.from_pretrained(str(tiny_files["sdxl_dir"]), local_files_only=True)
    pipe.load_lora_weights(str(result.lora_path))
    state, _ = pipe.lora_state_dict(str(result.lora_path))
    assert len(state) == sum(1 for k in sd if not k.endswith(".alpha"))


@pytest.mark.slow
def test_cli_ctrl_c_writes_resumable_state(tiny_files, dataset, tmp_path):
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "loratrain", "train", "--pretrained_model_name_or_path", str(tiny_files["sd1_file"]),
           "--train_data_dir", str(dataset), "--resolution", "64", "--output_dir", str(out), "--output_name", "c",
           "--max_train_steps", "100000", "--train_batch_size", "2"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 120
    seen = ""
    while time.time() < deadline:
        line = proc.stdout.readline()
        seen += line
        if line.startswith("training: 0/"):  # the training phase began: the Ctrl-C handler is in place
            break
    assert "training: 0/" in seen, seen
    proc.send_signal(signal.SIGINT)
    rest, _ = proc.communicate(timeout=120)
    assert proc.returncode == 130, seen + rest
    assert "resume with --resume" in rest
    info = (out / "c-state" / "train_state.json").read_text()
    assert '"global_step"' in info
    res = subprocess.run(cmd[:-4] + ["--max_train_steps", "1", "--resume", "latest", "--train_batch_size", "2"],
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "resumed from" in res.stdout + res.stderr


@pytest.mark.slow
def test_cli_reports_bad_input_clearly(tmp_path, dataset):
    res = subprocess.run([sys.executable, "-m", "loratrain", "train", "--pretrained_model_name_or_path", str(tmp_path / "nope.safetensors"),
                          "--train_data_dir", str(dataset), "--output_dir", str(tmp_path / "o")], capture_output=True, text=True, timeout=300)
    assert res.returncode == 2
    assert "model not found" in res.stderr and "nope.safetensors" in res.stderr
    assert not (tmp_path / "o" / "last.safetensors").exists()


def test_sd2_v_prediction_single_file_trains(tmp_path, dataset):
    """SD2: OpenCLIP text encoder keys in the single file, v-prediction target, sd_v2_v metadata."""
    from loratrain.core.models.tiny import make_tiny_model, write_single_file

    path = write_single_file(make_tiny_model("sd2"), tmp_path / "sd2.safetensors")
    with safe_open(str(path), "pt") as f:
        assert "cond_stage_model.model.transformer.resblocks.0.attn.in_proj_weight" in f.keys()
    loaded = load_model(path, v_parameterization=True)
    assert loaded.family.name == "sd2" and loaded.prediction_type == "v_prediction"
    result = run_train(quick_config(path, dataset, tmp_path / "out", max_train_steps=2, v_parameterization=True), RecordingReporter())
    _, meta = _tensors(result.lora_path)
    assert meta["ss_base_model_version"] == "sd_v2_v" and meta["modelspec.prediction_type"] == "v"


def test_disk_latent_cache_is_reused_and_invalidated(tiny_files, dataset, tmp_path):
    from PIL import Image

    cfg = quick_config(tiny_files["sd1_file"], dataset, tmp_path / "out", max_train_steps=1, cache_latents_to_disk=True,
                       overwrite=True)  # the same run three times
    run_train(cfg, RecordingReporter())
    cache = dataset / "3_circle" / ".loratrain_cache" / "circle_000.png.64x64.safetensors"
    first = _tensors(cache)[0]["view0"]
    stamp = cache.stat().st_mtime_ns
    run_train(cfg, RecordingReporter())
    assert cache.stat().st_mtime_ns == stamp  # reused, not rewritten
    Image.new("RGB", (64, 64), (0, 0, 0)).save(dataset / "3_circle" / "circle_000.png")
    run_train(cfg, RecordingReporter())
    assert not torch.equal(_tensors(cache)[0]["view0"], first)  # the changed image was re-encoded


@pytest.mark.slow
def test_the_demo_terminal_shows_our_output_only(tmp_path):
    """No library noise for a newcomer: no NumPy/diffusers/transformers warnings, with no verbosity variables set."""
    import os
    import re

    env = {k: v for k, v in os.environ.items() if k not in ("TRANSFORMERS_VERBOSITY", "DIFFUSERS_VERBOSITY", "PYTHONWARNINGS")}
    res = subprocess.run([sys.executable, "-m", "loratrain", "demo", "--output_dir", str(tmp_path / "d"), "--steps", "2"],
                         capture_output=True, text=True, env=env, timeout=600)
    assert res.returncode == 0, res.stderr[-2000:]
    noise = [ln for ln in (res.stdout + res.stderr).splitlines()
             if re.search(r"warn|not writable|kept in float32|deprecat|torchvision", ln, re.I)]
    assert noise == [], noise
    assert "LoRA (kohya layout):" in res.stdout
