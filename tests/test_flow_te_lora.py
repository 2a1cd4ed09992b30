"""Text-encoder LoRAs of FLUX.1 and SD3 runs (sd-scripts' lora_flux / lora_sd3 `lora_te1/2/3_*`), through the real CLI on
the tiny models the FLUX and SD3 training tests build: the keys and their shapes, that every part trains, metadata,
a stopped and resumed run equal to an unbroken one, and a saved file loading all its parts back."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import torch
from safetensors import safe_open

from tests.test_flux_train import _args as flux_args
from tests.test_flux_train import flux_files  # noqa: F401  (fixture)
from tests.test_sd3_train import _args as sd3_args
from tests.test_sd3_train import sd3_files  # noqa: F401  (fixture)


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "loratrain", "train", *args], capture_output=True, text=True, timeout=600)


def _te(args: list[str]) -> list[str]:
    """The fixtures' arguments with the text encoders training (no --network_train_unet_only)."""
    return [a for a in args if a != "--network_train_unet_only"]


def _tensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    with safe_open(str(path), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata())


def _modules(sd: dict[str, torch.Tensor], prefix: str) -> set[str]:
    return {k.rsplit(".", 2)[0] for k in sd if k.startswith(prefix) and k.endswith(".lora_down.weight")}


#: the tiny CLIP (2 layers) and T5 (2 blocks, gated-gelu) the fixtures build: sd-scripts' targets per layer / block
CLIP_LINEARS = ("self_attn_k_proj", "self_attn_v_proj", "self_attn_q_proj", "self_attn_out_proj", "mlp_fc1", "mlp_fc2")
T5_LINEARS = ("layer_0_SelfAttention_q", "layer_0_SelfAttention_k", "layer_0_SelfAttention_v", "layer_0_SelfAttention_o",
              "layer_1_DenseReluDense_wi_0", "layer_1_DenseReluDense_wi_1", "layer_1_DenseReluDense_wo")


def _clip_names(prefix: str) -> set[str]:
    return {f"{prefix}_text_model_encoder_layers_{i}_{n}" for i in range(2) for n in CLIP_LINEARS}


def test_flux_trains_clip_l_and_t5_loras_with_sd_scripts_keys(flux_files, tmp_path):  # noqa: F811
    res = _cli(*_te(flux_args(flux_files, tmp_path / "o", "--network_args", "train_t5xxl=True", "--text_encoder_lr",
                              "2e-3", "1e-3")))
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert "lora_te1_* modules" in res.stdout + res.stderr
    sd, meta = _tensors(tmp_path / "o" / "f.safetensors")
    assert _modules(sd, "lora_te1_") == _clip_names("lora_te1")
    assert _modules(sd, "lora_te3_") == {f"lora_te3_encoder_block_{i}_{n}" for i in range(2) for n in T5_LINEARS}
    assert _modules(sd, "lora_unet_")  # the transformer's modules stay in the same file
    assert sd["lora_te1_text_model_encoder_layers_0_mlp_fc1.lora_down.weight"].shape == (4, 32)
    assert sd["lora_te3_encoder_block_0_layer_1_DenseReluDense_wi_0.lora_up.weight"].shape == (37, 4)
    for name in _modules(sd, "lora_te"):  # every text-encoder module learned (its up starts at zero)
        assert sd[f"{name}.lora_up.weight"].abs().max() > 0, name
        assert float(sd[f"{name}.alpha"]) == 2.0
    assert meta["ss_network_train_unet_only"] == "False"
    assert meta["ss_text_encoder_lr"] == "[2e-3, 1e-3]" or meta["ss_text_encoder_lr"].startswith("[0.002")
    assert '"train_t5xxl": "True"' in meta["ss_network_args"]


def test_flux_without_train_t5xxl_trains_clip_l_only_and_reloads(flux_files, tmp_path):  # noqa: F811
    res = _cli(*_te(flux_args(flux_files, tmp_path / "o")))
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    sd, _ = _tensors(tmp_path / "o" / "f.safetensors")
    assert _modules(sd, "lora_te1_") == _clip_names("lora_te1") and not _modules(sd, "lora_te3_")
    n = len(_modules(sd, "lora_"))
    res = _cli(*_te(flux_args(flux_files, tmp_path / "r", "--network_weights", str(tmp_path / "o" / "f.safetensors"),
                              "--max_train_steps", "1")))
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert f"{n} of {n} modules" in res.stdout + res.stderr
    # a transformer-only run is told why the file's text-encoder modules do not fit, before training
    res = _cli(*flux_args(flux_files, tmp_path / "u", "--network_weights", str(tmp_path / "o" / "f.safetensors")))
    assert res.returncode == 2 and "lora_te1" in res.stderr and "network_train_unet_only" in res.stderr, res.stderr[-2000:]


def test_train_t5xxl_with_unet_only_is_refused_before_loading(flux_files, tmp_path):  # noqa: F811
    res = _cli(*flux_args(flux_files, tmp_path / "o", "--network_args", "train_t5xxl=True"))
    assert res.returncode == 2 and "train_t5xxl" in res.stderr, res.stderr[-2000:]


def test_sd3_trains_clip_l_and_clip_g_loras_stop_resume_and_reload(sd3_files, tmp_path):  # noqa: F811
    from loratrain.core.progress import RecordingReporter
    from loratrain.training.trainer import run_train

    from .flow_helpers import config_from_args, run_stopped_at

    straight = run_train(config_from_args(_te(sd3_args(sd3_files, tmp_path / "a"))), RecordingReporter())
    sd, meta = _tensors(straight.lora_path)
    assert _modules(sd, "lora_te1_") and _modules(sd, "lora_te2_") and not _modules(sd, "lora_te3_")
    assert "lora_te1_text_model_encoder_layers_0_self_attn_q_proj" in _modules(sd, "lora_te1_")
    assert "lora_te2_text_model_encoder_layers_0_self_attn_q_proj" in _modules(sd, "lora_te2_")
    for name in _modules(sd, "lora_te"):
        assert sd[f"{name}.lora_up.weight"].abs().max() > 0, name
    assert meta["ss_network_train_unet_only"] == "False"

    run_stopped_at(_te(sd3_args(sd3_files, tmp_path / "b")))
    res = _cli(*_te(sd3_args(sd3_files, tmp_path / "b", "--resume", "latest")))
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    resumed, _ = _tensors(straight.lora_path.parent.parent / "b" / straight.lora_path.name)
    assert sd.keys() == resumed.keys() and all(torch.equal(sd[k], resumed[k]) for k in sd)

    n = len(_modules(sd, "lora_"))
    res = _cli(*_te(sd3_args(sd3_files, tmp_path / "r", "--network_weights", str(straight.lora_path),
                             "--max_train_steps", "1")))
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert f"{n} of {n} modules" in res.stdout + res.stderr
