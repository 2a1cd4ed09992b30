"""A FLUX.1 / SD3 LoRA's text-encoder modules in `generate` and the grid (core/lora/flow_te_hooks.py): the hooks
loaded from a file compute what training's own text-encoder network (PEFT, per kind) computed when it wrote the file,
for CLIP and T5, LoRA / LoHa / LoKr; a weight of 0 and removal give the base encoder back; encoders the model lacks
are named; and through the real CLI a file's text-encoder part changes the generated image."""
from __future__ import annotations

import copy
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from loratrain.core.errors import ConfigError
from loratrain.core.lora.flow_te_hooks import FlowLoraFile, split_text_encoders
from loratrain.training.networks.base import NetworkSpec
from loratrain.training.networks.flux import FLOW_TEXT_ENCODERS
from tests.test_flux_sampling import _generate, _pixels
from tests.test_flux_train import _save, flux_files  # noqa: F401  (a fixture)


def _encoders() -> tuple[torch.nn.Module, torch.nn.Module]:
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    torch.manual_seed(0)
    clip = CLIPTextModel(CLIPTextConfig(vocab_size=99, hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                                        num_attention_heads=2, max_position_embeddings=16)).eval()
    t5 = T5EncoderModel(T5Config(vocab_size=99, d_model=32, d_ff=37, d_kv=8, num_heads=4, num_layers=2,
                                 feed_forward_proj="gated-gelu", relative_attention_num_buckets=8, dropout_rate=0.0)).eval()
    return clip, t5


def _outputs(clip, t5, ids) -> tuple[torch.Tensor, torch.Tensor]:
    with torch.no_grad():
        return clip(ids).last_hidden_state, t5(ids).last_hidden_state


@pytest.mark.parametrize("kind", ["lora", "loha", "lokr"])
def test_text_encoder_hooks_from_a_file_compute_what_training_computed(kind):
    clip, t5 = _encoders()
    fresh = SimpleNamespace(clip_l=copy.deepcopy(clip), t5xxl=copy.deepcopy(t5))
    base = _outputs(clip, t5, ids := torch.randint(0, 99, (2, 7)))
    trained = FLOW_TEXT_ENCODERS[kind]([("text_encoder", "lora_te1", clip), ("text_encoder_3", "lora_te3", t5)],
                                       NetworkSpec(4, 2.0, train_unet=False))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for part in trained.parts():
            for p in trained.trainable_parameters(part):
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    want = _outputs(clip, t5, ids)
    assert (want[0] - base[0]).abs().max() > 1e-3 and (want[1] - base[1]).abs().max() > 1e-3
    sd = trained.kohya_state_dict(torch.float32)
    rest, hooks = split_text_encoders(sd, fresh, "f.safetensors")
    assert not rest and set(hooks) == {"clip_l", "t5xxl"}
    lora = FlowLoraFile(None, hooks).apply_to(fresh)
    got = _outputs(fresh.clip_l, fresh.t5xxl, ids)
    torch.testing.assert_close(got[0], want[0], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(got[1], want[1], rtol=1e-4, atol=1e-5)
    lora.set_multiplier(0.0)
    torch.testing.assert_close(_outputs(fresh.clip_l, fresh.t5xxl, ids)[0], base[0])
    lora.set_multiplier(1.0)
    lora.remove()
    torch.testing.assert_close(_outputs(fresh.clip_l, fresh.t5xxl, ids)[1], base[1])


def test_text_encoder_modules_the_model_cannot_take_are_named():
    clip, t5 = _encoders()
    clip_g_module = {"lora_te2_text_model_encoder_layers_0_mlp_fc1.lora_down.weight": torch.zeros(2, 32),
                     "lora_te2_text_model_encoder_layers_0_mlp_fc1.lora_up.weight": torch.zeros(37, 2)}
    with pytest.raises(ConfigError, match="no CLIP-G"):
        split_text_encoders(clip_g_module, SimpleNamespace(clip_l=clip, t5xxl=t5), "f.safetensors")
    with pytest.raises(ConfigError, match="no CLIP-L"):  # Chroma
        split_text_encoders({k.replace("te2", "te1"): v for k, v in clip_g_module.items()},
                            SimpleNamespace(clip_l=None, t5xxl=t5), "f.safetensors")
    wrong = {"lora_te1_text_model_encoder_layers_9_mlp_fc1.lora_down.weight": torch.zeros(2, 32),
             "lora_te1_text_model_encoder_layers_9_mlp_fc1.lora_up.weight": torch.zeros(37, 2)}
    with pytest.raises(ConfigError, match="layers_9_mlp_fc1 names no Linear of this model's CLIP-L"):
        split_text_encoders(wrong, SimpleNamespace(clip_l=clip, t5xxl=t5), "f.safetensors")
    shape = {"lora_te1_text_model_encoder_layers_0_mlp_fc1.lora_down.weight": torch.zeros(2, 33),
             "lora_te1_text_model_encoder_layers_0_mlp_fc1.lora_up.weight": torch.zeros(37, 2)}
    with pytest.raises(ConfigError, match="do not fit"):
        split_text_encoders(shape, SimpleNamespace(clip_l=clip, t5xxl=t5), "f.safetensors")


def test_generate_applies_a_flux_loras_text_encoder_part(flux_files, tmp_path):  # noqa: F811
    from loratrain.core.lora.flux_network import kohya_flux_state_dict
    from loratrain.core.models.flux_loading import flux_sources, load_flux

    flux = load_flux(flux_sources(str(flux_files["model"]), str(flux_files["clip_l"]), str(flux_files["t5xxl"]),
                                  str(flux_files["ae"]), str(flux_files["t5_tokenizer"])), torch.float32)
    te = FLOW_TEXT_ENCODERS["loha"]([("text_encoder", "lora_te1", flux.clip_l), ("text_encoder_3", "lora_te3", flux.t5xxl)],
                                    NetworkSpec(4, 4.0, train_unet=False))
    with torch.no_grad():
        for part in te.parts():
            for p in te.trainable_parameters(part):
                p.normal_(0, 1.0)
    from loratrain.core.lora.flux_network import create_flux_lora

    unet = kohya_flux_state_dict(create_flux_lora(flux.config, 4, 2.0, kind="loha"))  # starts as a no-op (w2_a = 0)
    sd = {**unet, **te.kohya_state_dict(torch.float32)}
    assert any(k.startswith("lora_te3_") for k in sd) and any(k.endswith(".hada_w1_a") for k in sd)
    only_te = _save(sd, tmp_path / "te.safetensors")
    base = _pixels(_generate(flux_files, tmp_path / "base.png"))
    off = _pixels(_generate(flux_files, tmp_path / "off.png", "--network_weights", f"{only_te}:0"))
    on = _pixels(_generate(flux_files, tmp_path / "on.png", "--network_weights", f"{only_te}:1"))
    assert np.array_equal(base, off)
    assert np.abs(on - base).max() > 0  # only the text encoders changed: the prompt's encoding did


def test_a_bad_lora_on_a_later_grid_value_fails_before_any_cell_is_written(flux_files, tmp_path):  # noqa: F811
    """The grid reads every LoRA of its LoRA axis before the first cell: a file that lies (here a LoHa missing a part)
    on the last axis value is named, and nothing is left in the output folder."""
    from loratrain.core.lora.flux_network import create_flux_lora, kohya_flux_state_dict
    from tests.test_flux_sampling import _parts, _run
    from tests.test_flux_train import CFG

    good = _save(kohya_flux_state_dict(create_flux_lora(CFG, 4, 2.0)), tmp_path / "good.safetensors")
    bad_sd = kohya_flux_state_dict(create_flux_lora(CFG, 4, 2.0, kind="loha"))
    bad_sd.pop("lora_unet_double_blocks_0_img_attn_qkv.hada_w2_b")
    bad = _save(bad_sd, tmp_path / "bad.safetensors")
    out = tmp_path / "grid"
    res = _run("grid", "--model", str(flux_files["model"]), "--prompt", "sks dog", "--width", "64", "--height", "64",
               "--steps", "2", "--seed", "3", "--loras", str(good), "--x_type", "lora", "--x_values", f"{good},{bad}",
               "--y_type", "seed", "--y_values", "3,4", "--output_dir", str(out), "--color_drift", "off",
               *_parts(flux_files))
    assert res.returncode == 2, res.stdout[-2000:] + res.stderr[-2000:]
    assert "bad.safetensors" in res.stderr and "lacks hada_w2_b" in res.stderr and "Traceback" not in res.stderr
    assert not out.exists() or not any(out.rglob("*.png"))
