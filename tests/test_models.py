"""Loading: both on-disk layouts, family detection, real-size key layouts, bad files."""
from __future__ import annotations

import json

import pytest
import torch
from accelerate import init_empty_weights
from safetensors.torch import save_file

from loratrain.core.errors import UnsafeFileError
from loratrain.core.models.families import FAMILIES, ModelTypeError, detect_family
from loratrain.core.models.loading import SDModel, build_component, load_model
from loratrain.core.models.single_file import join_checkpoint, split_checkpoint
from loratrain.core.models.text_encoder_keys import canonical_state_dict
from loratrain.training.networks.base import NetworkSpec, find_targets


def _same(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


@pytest.mark.parametrize("fam", ["sd1", "sdxl"])
def test_single_file_and_folder_load_the_same_weights(tiny_files, fam):
    a, b = load_model(tiny_files[f"{fam}_file"]), load_model(tiny_files[f"{fam}_dir"])
    assert a.family.name == b.family.name == fam
    _same(a.unet, b.unet)
    _same(a.vae, b.vae)
    for x, y in zip(a.text_encoders, b.text_encoders):
        _same(x, y)


@pytest.mark.parametrize("fam", ["sd1", "sdxl"])
def test_loading_straight_into_the_training_dtype(tiny_files, fam):
    """bf16 training loads UNet and text encoders as bf16 (no float32 copy), the VAE stays float32; the same values as a cast."""
    full = load_model(tiny_files[f"{fam}_file"])
    for source in (tiny_files[f"{fam}_file"], tiny_files[f"{fam}_dir"]):
        half = load_model(source, dtype=torch.bfloat16)
        for a, b in ((full.unet, half.unet), *zip(full.text_encoders, half.text_encoders)):
            sa, sb = a.state_dict(), b.state_dict()
            for k in sa:
                if sa[k].is_floating_point():
                    assert sb[k].dtype == torch.bfloat16 and torch.equal(sa[k].to(torch.bfloat16), sb[k]), k
        assert all(p.dtype == torch.float32 for p in half.vae.parameters())
        _same(full.vae, half.vae)


@pytest.mark.parametrize("fam", ["sd1", "sdxl"])
def test_ldm_layout_matches_diffusers_own_converter(tiny_files, fam):
    """diffusers' independent single-file converter reads our LDM file to the same tensors."""
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    cls = StableDiffusionXLPipeline if fam == "sdxl" else StableDiffusionPipeline
    pipe = cls.from_single_file(str(tiny_files[f"{fam}_file"]), config=str(tiny_files[f"{fam}_dir"]), local_files_only=True)
    ours = load_model(tiny_files[f"{fam}_dir"])
    _same(pipe.unet, ours.unet)
    _same(pipe.vae, ours.vae)
    theirs, mine = canonical_state_dict(pipe.text_encoder), canonical_state_dict(ours.text_encoders[0])
    assert all(torch.equal(theirs[k], mine[k]) for k in mine)


def _meta_model(fam: str) -> SDModel:
    family = FAMILIES[fam]
    cfgs = family.shipped_configs()
    with init_empty_weights():
        unet = build_component("unet", cfgs["unet"])
        tes = [build_component(s.component, cfgs[s.component], s.with_projection) for s in family.text_encoders]
    return SDModel(family, unet, None, tes, [], None, "meta", cfgs)


@pytest.mark.parametrize("fam,unet_modules,te_modules", [("sd1", 192, 72), ("sdxl", 722, 264)])
def test_real_size_layouts(fam, unet_modules, te_modules):
    """Full-size SD1.5 / SDXL configs (no memory: meta tensors): LoRA module counts as sd-scripts prints
    them, and every UNet / text encoder key has an LDM name that maps back."""
    model = _meta_model(fam)
    targets = find_targets(model, NetworkSpec())
    assert sum(t.part == "unet" for t in targets) == unet_modules
    assert sum(t.part != "unet" for t in targets) == te_modules
    if fam == "sdxl":
        names = {t.kohya_name for t in targets}
        assert "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q" in names
        assert "lora_unet_middle_block_1_transformer_blocks_9_attn2_to_v" in names
        assert "lora_te2_text_model_encoder_layers_31_mlp_fc2" in names
    parts = {"unet": model.unet.state_dict(), "vae": {}}
    for spec, te in zip(model.family.text_encoders, model.text_encoders):
        parts[spec.component] = canonical_state_dict(te)
    flat = join_checkpoint({**parts, "vae": _meta_vae_state(model.configs["vae"])}, model.family, model.configs)
    assert detect_family(set(flat), "x").name == fam
    back = split_checkpoint(flat, model.family, model.configs, "x")
    assert set(back["unet"]) == set(parts["unet"])
    assert "model.diffusion_model.input_blocks.1.0.in_layers.2.weight" in flat


def _meta_vae_state(cfg):
    with init_empty_weights():
        vae = build_component("vae", cfg)
    return vae.state_dict()


def test_bad_files_give_clear_errors(tmp_path, tiny_files):
    lora = tmp_path / "a_lora.safetensors"
    save_file({"lora_unet_x.lora_down.weight": torch.zeros(1, 1)}, str(lora))
    with pytest.raises(ModelTypeError, match="LoRA file"):
        load_model(lora)
    vae = tmp_path / "vae.safetensors"
    save_file({"encoder.conv_in.weight": torch.zeros(1)}, str(vae))
    with pytest.raises(ModelTypeError, match="VAE file"):
        load_model(vae)
    with pytest.raises(FileNotFoundError, match="model not found"):
        load_model(tmp_path / "missing.safetensors")
    with pytest.raises(ModelTypeError, match="sdxl model, but sd1"):
        load_model(tiny_files["sdxl_file"], expect_family="sd1")


def test_shape_mismatch_names_the_key(tmp_path, tiny_files):
    from safetensors import safe_open

    with safe_open(str(tiny_files["sd1_file"]), "pt") as f:
        sd = {k: f.get_tensor(k) for k in f.keys()}
        meta = f.metadata()
    key = "model.diffusion_model.input_blocks.1.0.in_layers.2.weight"
    sd[key] = torch.zeros(3, 3, 3, 3)
    bad = tmp_path / "bad.safetensors"
    save_file(sd, str(bad), metadata=meta)
    with pytest.raises(ModelTypeError, match="shape mismatch.*down_blocks.0.resnets.0.conv1.weight"):
        load_model(bad)


def test_pickle_refused_unless_allowed(tmp_path, tiny_files):
    from safetensors import safe_open

    with safe_open(str(tiny_files["sd1_file"]), "pt") as f:
        sd = {k: f.get_tensor(k) for k in f.keys()}
        cfgs = json.loads(f.metadata()["loratrain.configs"])
    ckpt = tmp_path / "model.ckpt"
    torch.save({"state_dict": sd}, ckpt)
    with pytest.raises(UnsafeFileError, match="allow_pickle"):
        load_model(ckpt)
    # a pickled tiny model has no embedded config: the shipped SD1.5 config is used, and the
    # shape check explains the mismatch instead of failing somewhere deep
    with pytest.raises(ModelTypeError, match="do not fit"):
        load_model(ckpt, allow_pickle=True)
    assert cfgs["unet"]["block_out_channels"] == [32, 32, 64, 64]


def test_pickle_with_code_is_rejected_even_when_allowed(tmp_path):
    import os
    import pickle

    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    path = tmp_path / "evil.ckpt"
    with open(path, "wb") as fh:
        pickle.dump({"state_dict": Evil()}, fh)
    with pytest.raises(ValueError, match="could not be loaded as plain weights"):
        load_model(path, allow_pickle=True)
