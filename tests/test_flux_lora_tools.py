"""`lora bake` / `lora merge` / `lora resize` with FLUX.1 LoRAs (any layout) and FLUX block weights, through the real
CLI on a tiny BFL-layout checkpoint: the baked model computes what the model + the LoRA applied live computes."""
from __future__ import annotations

import json

import pytest
import torch

from loratrain.cli import main
from loratrain.core.errors import ConfigError
from loratrain.core.lora.flux_blocks import FLUX_BLOCKS, flux_block_of, flux_lbw_weights
from loratrain.core.lora.flux_layouts import save_diffusers_layout
from loratrain.core.lora.flux_network import kohya_flux_state_dict
from loratrain.core.models.flux import FluxTransformer
from loratrain.core.safe_io import save_safetensors
from loratrain.core.weights import load_state_dict
from tests.test_flux_core import _inputs, _tiny_model
from tests.test_flux_layouts import _net

PREFIX = "model.diffusion_model."


def _files(tmp_path, split_qkv=False, dtype=torch.float32):
    model = _tiny_model(guidance=True, depth=2, depth_single_blocks=2)
    ckpt = tmp_path / "flux.safetensors"
    save_safetensors({PREFIX + k: v.to(dtype) for k, v in model.state_dict().items()}, ckpt, {"note": "tiny"})
    net = _net(model.config, split_qkv)
    save_safetensors(kohya_flux_state_dict(net), tmp_path / "lora.safetensors", {"ss_network_module": "networks.lora_flux"})
    save_diffusers_layout(kohya_flux_state_dict(net), tmp_path / "lora_diffusers.safetensors")
    return model, net, ckpt


def _load(path, cfg):
    sd, meta = load_state_dict(path)
    model = FluxTransformer(cfg).eval()
    model.load_state_dict({k[len(PREFIX):]: v.float() for k, v in sd.items()}, strict=True)
    return model, sd, meta


def _vector(**blocks):
    return ",".join(str(blocks.get(n, 1.0)) for n in FLUX_BLOCKS)


@pytest.mark.parametrize("layout,split_qkv", [("lora", False), ("lora", True), ("lora_diffusers", True)])
def test_baked_flux_checkpoint_equals_live_lora(tmp_path, layout, split_qkv):
    model, net, ckpt = _files(tmp_path, split_qkv)
    x = _inputs(model.config)
    out = tmp_path / "baked.safetensors"
    blocks = _vector(D01=0, S00=0.5, IN=0.25)
    assert main(["lora", "bake", str(ckpt), "--loras", f"{tmp_path / layout}.safetensors:0.7:{blocks}", "--output", str(out)]) == 0
    baked, sd, meta = _load(out, model.config)
    assert meta["note"] == "tiny" and json.loads(meta["loratrain.baked_loras"])[0]["ratio"] == 0.7
    for name, module in net.lora.items():  # the same block weights, applied live
        module.multiplier = 0.7 * {"D01": 0.0, "S00": 0.5, "IN": 0.25}.get(flux_block_of(name), 1.0)
    net.apply_to(model)
    with torch.no_grad():
        want, got = model(**x), baked(**x)
        net.remove()
        plain = model(**x)
    assert (want - plain).abs().max() > 1e-2
    torch.testing.assert_close(got, want, atol=2e-5, rtol=2e-5)
    untouched = PREFIX + "double_blocks.1.img_attn.qkv.weight"  # block D01 weighted 0: copied as it was
    assert torch.equal(sd[untouched], model.state_dict()[untouched[len(PREFIX):]])


def test_bake_keeps_the_checkpoint_dtype_and_refuses_sd_loras(tmp_path):
    model, net, ckpt = _files(tmp_path, dtype=torch.bfloat16)
    out = tmp_path / "baked.safetensors"
    assert main(["lora", "bake", str(ckpt), "--loras", str(tmp_path / "lora.safetensors"), "--output", str(out)]) == 0
    sd, _ = load_state_dict(out)
    assert {v.dtype for v in sd.values()} == {torch.bfloat16}
    src, _ = load_state_dict(ckpt)
    key = PREFIX + "single_blocks.0.linear1.weight"
    delta = net.lora["lora_unet_single_blocks_0_linear1"].delta_weight()
    torch.testing.assert_close(sd[key].float(), (src[key].float() + delta).bfloat16().float())
    sd_lora = tmp_path / "sd.safetensors"
    save_safetensors({"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": torch.zeros(2, 4),
                      "lora_unet_down_blocks_0_attentions_0_proj_in.lora_up.weight": torch.zeros(4, 2)}, sd_lora)
    assert main(["lora", "bake", str(ckpt), "--loras", str(sd_lora), "--output", str(tmp_path / "x.safetensors")]) != 0
    assert not (tmp_path / "x.safetensors").exists()


def test_flux_block_weights_layout_and_errors():
    assert len(FLUX_BLOCKS) == 61 and FLUX_BLOCKS[:4] == ["CLIP", "T5", "IN", "D00"] and FLUX_BLOCKS[-1] == "OUT"
    assert flux_block_of("lora_unet_double_blocks_18_img_attn_qkv") == "D18"
    assert flux_block_of("lora_unet_single_blocks_37_linear1") == "S37"
    assert flux_block_of("lora_unet_time_in_in_layer") == "IN" and flux_block_of("lora_unet_final_layer_linear") == "OUT"
    assert flux_block_of("lora_te1_text_model_encoder_layers_0_mlp_fc1") == "CLIP"
    assert flux_block_of("lora_te3_encoder_block_0_layer_0_SelfAttention_q") == "T5"
    weights = flux_lbw_weights("DOUBLE")
    assert weights["D05"] == 1 and weights["S05"] == 0 and weights["OUT"] == 0
    with pytest.raises(ConfigError, match="61 values"):
        flux_lbw_weights("1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1")  # an SD 17-value vector names U-Net blocks
    with pytest.raises(ConfigError, match="unknown FLUX block-weight preset"):
        flux_lbw_weights("INS")
    with pytest.raises(ConfigError, match="beyond"):
        flux_block_of("lora_unet_double_blocks_19_img_attn_qkv")


def test_merge_and_resize_flux_loras_in_any_layout(tmp_path):
    from tests.test_flux_layouts import kohya_deltas

    model, net_a, _ = _files(tmp_path)
    net_b = _net(model.config, True, seed=7)
    save_diffusers_layout(kohya_flux_state_dict(net_b), tmp_path / "b_diffusers.safetensors")
    a, b = kohya_deltas(kohya_flux_state_dict(net_a)), kohya_deltas(kohya_flux_state_dict(net_b))
    merged = tmp_path / "merged.safetensors"
    assert main(["lora", "merge", "--loras", f"{tmp_path / 'lora.safetensors'}:0.8:DOUBLE",
                 f"{tmp_path / 'b_diffusers.safetensors'}:0.5", "--output", str(merged), "--save_precision", "float"]) == 0
    sd, meta = load_state_dict(merged)
    assert meta["ss_network_module"] == "networks.lora_flux"
    got = kohya_deltas(sd)
    assert got.keys() == b.keys()
    for name, dw in b.items():
        want = 0.5 * dw + (0.8 * a[name] if "double_blocks" in name else 0)
        torch.testing.assert_close(got[name], want, atol=1e-5, rtol=1e-5, msg=name)

    resized = tmp_path / "resized.safetensors"  # from the diffusers-layout file: ranks 3 (9 on split q/k/v) -> 2
    assert main(["lora", "resize", str(tmp_path / "b_diffusers.safetensors"), "--new_rank", "2", "--output", str(resized),
                 "--save_precision", "float"]) == 0
    small, _ = load_state_dict(resized)
    assert max(v.shape[0] for k, v in small.items() if k.endswith("lora_down.weight")) == 2
    exact = tmp_path / "exact.safetensors"
    assert main(["lora", "resize", str(tmp_path / "b_diffusers.safetensors"), "--new_rank", "16", "--output", str(exact),
                 "--save_precision", "float"]) == 0
    for name, dw in kohya_deltas(load_state_dict(exact)[0]).items():
        torch.testing.assert_close(dw, b[name], atol=1e-5, rtol=1e-5, msg=name)


def test_extract_from_baked_flux_gives_the_lora_back(tmp_path):
    from tests.test_flux_layouts import kohya_deltas

    _, net, ckpt = _files(tmp_path, split_qkv=True)
    baked, lora = tmp_path / "baked.safetensors", tmp_path / "extracted.safetensors"
    assert main(["lora", "bake", str(ckpt), "--loras", str(tmp_path / "lora.safetensors"), "--output", str(baked)]) == 0
    assert main(["lora", "extract", str(ckpt), str(baked), "--output", str(lora), "--dim", "16", "--clamp_quantile", "1",
                 "--save_precision", "float"]) == 0
    sd, meta = load_state_dict(lora)
    assert meta["ss_network_module"] == "networks.lora_flux" and meta["modelspec.architecture"] == "flux-1-dev/lora"
    want = {k: v for k, v in kohya_deltas(kohya_flux_state_dict(net)).items() if "_blocks_" in k}  # blocks, not in_dims
    got = kohya_deltas(sd)
    assert got.keys() == want.keys()
    for name, dw in want.items():
        torch.testing.assert_close(got[name], dw, atol=1e-5, rtol=1e-4, msg=name)
