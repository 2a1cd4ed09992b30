"""Block-weighted `lora merge`: PATH:RATIO:BLOCKS as `lora bake` takes it, each module's delta scaled by its block's weight."""
from __future__ import annotations

import json

import pytest
import torch

from loratrain.core.errors import ConfigError
from loratrain.core.lora.files import read_lora
from loratrain.core.safe_io import save_safetensors
from loratrain.core.weights import read_safetensors_metadata
from loratrain.merge.lora_merge import LoraMergeConfig, run_lora_merge

# kohya names of a standard SD1 U-Net (diffusers paths) and its blocks, and a text encoder module (BASE)
IN01 = "lora_unet_down_blocks_0_attentions_0_proj_in"
MID = "lora_unet_mid_block_attentions_0_proj_in"
OUT11 = "lora_unet_up_blocks_3_attentions_2_proj_out"
TE = "lora_te_text_model_encoder_layers_0_mlp_fc1"
NAMES = (IN01, MID, OUT11, TE)
SHAPE = (8, 6)


def _lora(path, names=NAMES, rank=2, alpha=1.0, seed=0, meta=None):
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for name in names:
        sd[f"{name}.lora_down.weight"] = torch.randn(rank, SHAPE[1], generator=g)
        sd[f"{name}.lora_up.weight"] = torch.randn(SHAPE[0], rank, generator=g)
        sd[f"{name}.alpha"] = torch.tensor(alpha)
    save_safetensors(sd, path, meta)
    return read_lora(path)[0]


def _vector(**blocks: float) -> str:
    """A 26-value LoRA block-weight vector (BASE, IN00-IN11, M00, OUT00-OUT11), 1 unless given."""
    names = ["BASE"] + [f"IN{i:02d}" for i in range(12)] + ["M00"] + [f"OUT{i:02d}" for i in range(12)]
    return ",".join(str(blocks.get(n, 1.0)) for n in names)


@pytest.mark.parametrize("mode", ["concat", "svd"])
def test_block_weights_scale_each_blocks_delta(tmp_path, mode):
    a = _lora(tmp_path / "a.safetensors", seed=1)
    b = _lora(tmp_path / "b.safetensors", rank=3, alpha=3.0, seed=2)
    out = tmp_path / f"{mode}.safetensors"
    blocks = _vector(IN01=0, M00=0.5)
    res = run_lora_merge(LoraMergeConfig(loras=[f"{tmp_path / 'a.safetensors'}:0.8:{blocks}", f"{tmp_path / 'b.safetensors'}:0.6"],
                                         output=str(out), mode=mode, new_rank=5, clamp_quantile=1.0, save_precision="fp32"))
    merged, meta = read_lora(out)
    expected = {IN01: 0.6 * b[IN01].delta(SHAPE),  # a's IN01 delta is gone
                MID: 0.8 * 0.5 * a[MID].delta(SHAPE) + 0.6 * b[MID].delta(SHAPE),  # a's M00 delta halved
                OUT11: 0.8 * a[OUT11].delta(SHAPE) + 0.6 * b[OUT11].delta(SHAPE),
                TE: 0.8 * a[TE].delta(SHAPE) + 0.6 * b[TE].delta(SHAPE)}
    for name, ref in expected.items():
        assert torch.allclose(merged[name].delta(SHAPE), ref, atol=1e-5), name
    if mode == "concat":
        assert merged[IN01].rank == 3  # only b's factors: a's were left out, not written as zeros
    assert res.modules == 4
    recipe = json.loads(meta["loratrain.merged_loras"])
    assert recipe[0]["blocks"] == blocks and recipe[1]["blocks"] is None


def test_a_block_weighted_zero_in_every_input_is_left_out(tmp_path):
    _lora(tmp_path / "a.safetensors")
    out = tmp_path / "m.safetensors"
    run_lora_merge(LoraMergeConfig(loras=[f"{tmp_path / 'a.safetensors'}:1:{_vector(IN01=0, OUT11=0)}"], output=str(out)))
    assert set(read_lora(out)[0]) == {MID, TE}
    assert read_safetensors_metadata(out)["loratrain.merge_mode"] == "concat"


def test_block_weights_follow_the_model_layout_with_model(tiny_files, tmp_path):
    """With --model, blocks come from that checkpoint's own U-Net (here the tiny one), as `lora bake` reads them."""
    from loratrain.core.lora.keys import lora_sites
    from loratrain.core.models.families import FAMILIES
    from loratrain.core.tensor_io import LazySafetensors

    with LazySafetensors(tiny_files["sd1_file"]) as f:
        sites = lora_sites({k: v.shape for k, v in f.tensors.items()}, FAMILIES["sd1"], f.metadata)
    names = [n for n, s in sites.items() if n.startswith("lora_unet_down_blocks") and s.kind == "attn" and len(s.shape) == 2]
    zeroed, kept = names[0], next(n for n in names if sites[n].block != sites[names[0]].block)
    g = torch.Generator().manual_seed(0)
    sd = {}
    for name in (zeroed, kept):
        sd[f"{name}.lora_down.weight"] = torch.randn(2, sites[name].shape[1], generator=g)
        sd[f"{name}.lora_up.weight"] = torch.randn(sites[name].shape[0], 2, generator=g)
    save_safetensors(sd, tmp_path / "t.safetensors", {"ss_base_model_version": "sd_v1"})
    out = tmp_path / "m.safetensors"
    run_lora_merge(LoraMergeConfig(loras=[f"{tmp_path / 't.safetensors'}:1:{_vector(**{sites[zeroed].block: 0})}"],
                                   model=str(tiny_files["sd1_file"]), output=str(out)))
    assert set(read_lora(out)[0]) == {kept}


@pytest.mark.parametrize("blocks,message", [("1,2,x", "not a preset name or a list of numbers"),
                                            ("NO_SUCH_PRESET", "unknown LoRA block-weight preset"),
                                            ("1,1,1", "need 12, 17, 20 or 26 values"),
                                            (_vector(M00=float("nan")), "finite number"),
                                            (_vector(IN01="1e309"), "finite number")])
def test_bad_block_weight_text_is_refused_before_any_work(tmp_path, blocks, message):
    _lora(tmp_path / "a.safetensors")
    out = tmp_path / "m.safetensors"
    with pytest.raises(ConfigError, match=message) as e:
        run_lora_merge(LoraMergeConfig(loras=[f"{tmp_path / 'a.safetensors'}:1:{blocks}"], output=str(out)))
    assert e.value.problems and e.value.problems[0][0] == "loras"
    assert not out.exists()


def test_block_weights_the_family_lacks_or_cannot_tell_are_refused_clearly(tmp_path):
    xl = tmp_path / "xl.safetensors"
    _lora(xl, names=("lora_unet_input_blocks_4_1_proj_in", "lora_te1_text_model_encoder_layers_0_mlp_fc1"))
    out = tmp_path / "m.safetensors"
    with pytest.raises(ConfigError, match="xl.safetensors: LoRA block weights: block IN09 does not exist in sdxl"):
        run_lora_merge(LoraMergeConfig(loras=[f"{xl}:1:{_vector(IN10=0.5)}"], output=str(out)))
    unet_only = tmp_path / "u.safetensors"
    _lora(unet_only, names=(IN01,))
    with pytest.raises(ConfigError, match="give --model"):
        run_lora_merge(LoraMergeConfig(loras=[f"{unet_only}:1:{_vector()}"], output=str(out)))
    with pytest.raises(ConfigError, match="nothing to merge"):
        run_lora_merge(LoraMergeConfig(loras=[f"{tmp_path / 'xl.safetensors'}:1:{','.join(['0'] * 20)}"], output=str(out)))
    assert not out.exists()


@pytest.mark.parametrize("ratio", ["nan", "inf", "-inf"])
def test_a_weight_that_is_no_finite_number_is_refused_not_merged_into_nan(tmp_path, ratio):
    """`a.safetensors:nan` merged nan into every module (35840 non-finite values in a tiny merge) and said "wrote"."""
    _lora(tmp_path / "a.safetensors")
    out = tmp_path / "m.safetensors"
    with pytest.raises(ConfigError, match=f"the weight {ratio} is not a finite number"):
        run_lora_merge(LoraMergeConfig(loras=[f"{tmp_path / 'a.safetensors'}:{ratio}"], output=str(out)))
    assert not out.exists()
