"""`lora bake / extract / resize / merge` on SD3.5 files (issue 25): a tiny SD3.5 checkpoint in SAI's layout and a
lora_sd3 file built here, through the real CLI; baked weights checked against W + scale * up @ down."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from loratrain.core.lora.sd3_network import create_sd3_lora, save_sd3_lora
from loratrain.core.models.sd3 import SD35_TINY, SD3Transformer

PREFIX = "model.diffusion_model."


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "loratrain", "lora", *args], capture_output=True, text=True, timeout=300)


def _read(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    with safe_open(str(path), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("sd3tools")
    torch.manual_seed(0)
    model = SD3Transformer(SD35_TINY)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.05)
    sd = {PREFIX + k: v.contiguous() for k, v in model.state_dict().items()}
    sd["first_stage_model.encoder.conv_in.weight"] = torch.zeros(8, 3, 3, 3)  # a part that is not the MMDiT: kept as is
    save_file(sd, str(root / "base.safetensors"))
    net = create_sd3_lora(SD35_TINY, 4, 2.0, emb_dims=[2, 0, 2, 0, 0, 2])  # x_embedder: a conv LoRA
    with torch.no_grad():
        for name, p in net.named_parameters():
            if "up" in name:
                p.normal_(0, 0.3)
    return {"base": root / "base.safetensors", "lora": save_sd3_lora(net, root / "l.safetensors"), "net": net}


def test_bake_then_extract_an_sd35_lora(files, tmp_path):
    baked = tmp_path / "baked.safetensors"
    res = _cli("bake", str(files["base"]), "--loras", f"{files['lora']}:0.5", "--output", str(baked),
               "--save_precision", "fp32")
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    base, _ = _read(files["base"])
    out, _ = _read(baked)
    net = files["net"]
    for path in ("joint_blocks.0.x_block.attn2.qkv", "joint_blocks.3.context_block.adaLN_modulation.1", "final_layer.linear",
                 "x_embedder.proj"):
        key = PREFIX + path + ".weight"
        module = net.lora["lora_unet_" + path.replace(".", "_")]
        want = base[key].double() + 0.5 * module.delta_weight().double().reshape(base[key].shape)
        assert (out[key].double() - want).abs().max() < 1e-5, path
    untouched = PREFIX + "joint_blocks.0.x_block.attn.ln_q.weight"
    assert torch.equal(out[untouched], base[untouched])
    assert torch.equal(out["first_stage_model.encoder.conv_in.weight"], base["first_stage_model.encoder.conv_in.weight"])
    # extract between base and baked at full rank gives back 0.5 x the LoRA's ΔW on the joint blocks
    ext = tmp_path / "ext.safetensors"
    res = _cli("extract", str(files["base"]), str(baked), "--dim", "8", "--clamp_quantile", "1", "--output", str(ext),
               "--save_precision", "fp32")
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    sd, meta = _read(ext)
    assert meta["ss_network_module"] == "networks.lora_sd3" and meta["modelspec.architecture"] == "stable-diffusion-3-5-medium/lora"
    name = "lora_unet_joint_blocks_0_x_block_attn2_qkv"
    got = sd[f"{name}.lora_up.weight"].double() @ sd[f"{name}.lora_down.weight"].double()
    assert (got - 0.5 * net.lora[name].delta_weight().double()).abs().max() < 1e-4
    assert all(k.startswith("lora_unet_joint_blocks_") for k in sd)


def test_resize_and_merge_keep_the_sd3_layout(files, tmp_path):
    small = tmp_path / "r2.safetensors"
    res = _cli("resize", str(files["lora"]), "--new_rank", "2", "--output", str(small))
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    sd, _ = _read(small)
    orig, _ = _read(files["lora"])
    assert {k.split(".")[0] for k in sd} == {k.split(".")[0] for k in orig}
    assert sd["lora_unet_joint_blocks_0_x_block_attn_qkv.lora_down.weight"].shape[0] == 2
    merged = tmp_path / "m.safetensors"
    res = _cli("merge", "--loras", f"{files['lora']}:1", f"{small}:0.5", "--output", str(merged))
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    sd, _ = _read(merged)
    assert sd["lora_unet_joint_blocks_0_x_block_attn_qkv.lora_down.weight"].shape[0] == 6  # concat: 4 + 2


def test_sd3_bake_mistakes_are_named(files, tmp_path):
    res = _cli("bake", str(files["base"]), "--loras", f"{files['lora']}:1:ALL", "--output", str(tmp_path / "o.safetensors"))
    assert res.returncode == 2 and "block weights" in res.stderr, res.stderr[-2000:]
    other = create_sd3_lora(SD35_TINY.__class__(**{**SD35_TINY.__dict__, "num_layers": 5}), 4, 1.0)  # one block more
    wrong = save_sd3_lora(other, tmp_path / "wrong.safetensors")
    res = _cli("bake", str(files["base"]), "--loras", str(wrong), "--output", str(tmp_path / "o.safetensors"))
    assert res.returncode == 2 and "lora_unet_joint_blocks_" in res.stderr, res.stderr[-2000:]  # names a module
    assert not (tmp_path / "o.safetensors").exists()
