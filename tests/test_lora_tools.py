"""LoRA bake / merge / extract against their formulas, on tiny real-layout checkpoints."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from loratrain.core.lora.files import read_lora
from loratrain.core.lora.keys import lora_sites
from loratrain.core.models.families import FAMILIES
from loratrain.core.models.tiny import make_tiny_model, write_single_file
from loratrain.core.safe_io import save_safetensors
from loratrain.core.tensor_io import LazySafetensors
from loratrain.merge.lora_bake import BakeConfig, run_lora_bake
from loratrain.merge.lora_extract import LoraExtractConfig, run_lora_extract
from loratrain.merge.lora_merge import LoraMergeConfig, run_lora_merge
from loratrain.training.networks.base import NetworkSpec, find_targets

SD1_ATTN = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
SD1_CONV = "lora_unet_down_blocks_0_resnets_0_conv1"  # 3x3 LoCon
SD1_TE = "lora_te_text_model_encoder_layers_0_self_attn_v_proj"


def _sites(path, family):
    with LazySafetensors(path) as f:
        return lora_sites({k: v.shape for k, v in f.tensors.items()}, FAMILIES[family], f.metadata)


def _random_lora(path, sites, names, rank=2, alpha=1.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for name in names:
        shape = sites[name].shape
        if len(shape) == 4:
            sd[f"{name}.lora_down.weight"] = torch.randn(rank, *shape[1:], generator=g) * 0.1
            sd[f"{name}.lora_up.weight"] = torch.randn(shape[0], rank, 1, 1, generator=g) * 0.1
        else:
            sd[f"{name}.lora_down.weight"] = torch.randn(rank, shape[1], generator=g) * 0.1
            sd[f"{name}.lora_up.weight"] = torch.randn(shape[0], rank, generator=g) * 0.1
        sd[f"{name}.alpha"] = torch.tensor(alpha)
    save_safetensors(sd, path)
    return sd


@pytest.fixture(scope="module")
def sd1_base(tmp_path_factory):
    return write_single_file(make_tiny_model("sd1", seed=0), tmp_path_factory.mktemp("base") / "base.safetensors")


def test_every_module_our_trainer_writes_has_a_site(tiny_files):
    for family in ("sd1", "sdxl"):
        model = make_tiny_model(family)
        names = {t.kohya_name for t in find_targets(model, NetworkSpec(conv_dim=4))}
        assert names <= set(_sites(tiny_files[f"{family}_file"], family)), family


def test_bake_equals_the_formula_and_locon_composition(sd1_base, tmp_path):
    sites = _sites(sd1_base, "sd1")
    lora = _random_lora(tmp_path / "l.safetensors", sites, [SD1_ATTN, SD1_CONV, SD1_TE], rank=2, alpha=1.0)
    out = tmp_path / "baked.safetensors"
    run_lora_bake(BakeConfig(model=str(sd1_base), loras=[f"{tmp_path / 'l.safetensors'}:0.7"], output=str(out)))
    base, baked = load_file(sd1_base), load_file(out)
    touched = {sites[n].key for n in (SD1_ATTN, SD1_CONV, SD1_TE)}
    for key in base:
        if key not in touched:
            assert torch.equal(base[key], baked[key]), key
    for name in (SD1_ATTN, SD1_TE):
        key = sites[name].key
        ref = base[key] + 0.7 * (lora[f"{name}.lora_up.weight"] @ lora[f"{name}.lora_down.weight"]) * (1.0 / 2)
        assert torch.allclose(baked[key], ref, atol=1e-6)
    # 3x3 LoCon: conv(x, baked) must equal conv(x, W) + 0.7 * scale * up(down(x))
    key = sites[SD1_CONV].key
    x = torch.randn(1, base[key].shape[1], 8, 8)
    lora_path = F.conv2d(F.conv2d(x, lora[f"{SD1_CONV}.lora_down.weight"], padding=1), lora[f"{SD1_CONV}.lora_up.weight"])
    assert torch.allclose(F.conv2d(x, baked[key], padding=1), F.conv2d(x, base[key], padding=1) + 0.35 * lora_path, atol=1e-5)


def test_bake_block_weights_and_openclip_rows(tiny_files, tmp_path):
    path = tiny_files["sdxl_file"]
    sites = _sites(path, "sdxl")
    q = "lora_te2_text_model_encoder_layers_1_self_attn_k_proj"
    unet_in = next(n for n, s in sites.items() if s.block == "IN03" and s.kind == "attn" and n.startswith("lora_unet_input"))
    lora = _random_lora(tmp_path / "x.safetensors", sites, [q, unet_in])
    out = tmp_path / "xb.safetensors"
    # 20-value SDXL block weights: BASE 1, IN03 0 -> the text encoder gets the LoRA, the IN03 module not
    blocks = ",".join(["1"] + ["0"] * 19)
    run_lora_bake(BakeConfig(model=str(path), loras=[f"{tmp_path / 'x.safetensors'}:1:{blocks}"], output=str(out)))
    base, baked = load_file(path), load_file(out)
    assert torch.equal(baked[sites[unet_in].key], base[sites[unet_in].key])
    key, (r0, r1) = sites[q].key, sites[q].rows
    delta = lora[f"{q}.lora_up.weight"] @ lora[f"{q}.lora_down.weight"] * 0.5
    assert torch.allclose(baked[key][r0:r1], base[key][r0:r1] + delta, atol=1e-6)
    assert torch.equal(baked[key][:r0], base[key][:r0]) and torch.equal(baked[key][r1:], base[key][r1:])


def test_extract_recovers_a_planted_low_rank_difference(sd1_base, tmp_path):
    sites = _sites(sd1_base, "sd1")
    base = load_file(sd1_base)
    tuned = dict(base)
    g = torch.Generator().manual_seed(1)
    planted = {}
    for name in (SD1_ATTN, SD1_CONV):
        shape = sites[name].shape
        u, v = torch.randn(shape[0], 2, generator=g), torch.randn(2, int(torch.tensor(shape[1:]).prod()), generator=g)
        planted[name] = (u @ v * 0.05).reshape(shape)
        tuned[sites[name].key] = base[sites[name].key] + planted[name]
    tuned_path = tmp_path / "tuned.safetensors"
    save_safetensors(tuned, tuned_path, {"loratrain.configs": LazySafetensors(sd1_base).metadata["loratrain.configs"]})
    out = tmp_path / "ex.safetensors"
    run_lora_extract(LoraExtractConfig(model_org=str(sd1_base), model_tuned=str(tuned_path), output=str(out), dim=4, conv_dim=4,
                               clamp_quantile=1.0, save_precision="fp32"))
    modules, meta = read_lora(out)
    assert meta["ss_network_module"] == "networks.lora"
    assert not any(n.startswith("lora_te") for n in modules)  # text encoder unchanged -> U-Net only
    for name, delta in planted.items():
        got = modules[name].delta(tuple(delta.shape))
        assert torch.allclose(got, delta, atol=1e-4), name
    other = modules["lora_unet_up_blocks_1_attentions_0_proj_out"]
    assert other.delta(sites["lora_unet_up_blocks_1_attentions_0_proj_out"].shape).abs().max() < 1e-5
    # baking the extracted LoRA back reproduces the tuned weights
    baked = tmp_path / "rebaked.safetensors"
    run_lora_bake(BakeConfig(model=str(sd1_base), loras=[str(out)], output=str(baked)))
    rebaked = load_file(baked)
    for name in planted:
        assert torch.allclose(rebaked[sites[name].key], tuned[sites[name].key], atol=1e-4)


@pytest.mark.parametrize("mode", ["concat", "svd"])
def test_merge_loras_is_the_weighted_sum_of_deltas(sd1_base, tmp_path, mode):
    sites = _sites(sd1_base, "sd1")
    _random_lora(tmp_path / "a.safetensors", sites, [SD1_ATTN, SD1_CONV], rank=2, alpha=1.0, seed=1)
    _random_lora(tmp_path / "b.safetensors", sites, [SD1_ATTN, SD1_TE], rank=3, alpha=3.0, seed=2)
    out = tmp_path / f"{mode}.safetensors"
    run_lora_merge(LoraMergeConfig(loras=[f"{tmp_path / 'a.safetensors'}:0.6", f"{tmp_path / 'b.safetensors'}:-0.4"],
                                output=str(out), mode=mode, new_rank=5, clamp_quantile=1.0, save_precision="fp32"))
    a, _ = read_lora(tmp_path / "a.safetensors")
    b, _ = read_lora(tmp_path / "b.safetensors")
    merged, _ = read_lora(out)
    shape = sites[SD1_ATTN].shape
    ref = 0.6 * a[SD1_ATTN].delta(shape) - 0.4 * b[SD1_ATTN].delta(shape)
    assert torch.allclose(merged[SD1_ATTN].delta(shape), ref, atol=1e-5)
    assert torch.allclose(merged[SD1_TE].delta(sites[SD1_TE].shape), -0.4 * b[SD1_TE].delta(sites[SD1_TE].shape), atol=1e-5)


def test_lora_for_another_family_is_refused(tiny_files, sd1_base, tmp_path):
    sites = _sites(tiny_files["sdxl_file"], "sdxl")
    names = [n for n in sites if n.startswith("lora_unet_input_blocks_3")][:2] + ["lora_te2_text_model_encoder_layers_0_mlp_fc1"]
    _random_lora(tmp_path / "xl.safetensors", sites, names)
    out = tmp_path / "no.safetensors"
    with pytest.raises(ValueError, match="another model family"):
        run_lora_bake(BakeConfig(model=str(sd1_base), loras=[str(tmp_path / "xl.safetensors")], output=str(out)))
    assert not out.exists()
