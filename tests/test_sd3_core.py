"""SD3 / SD3.5 core: our single-file-layout MMDiT computes what diffusers' SD3Transformer2DModel computes (3.0, and
3.5 with MMDiT-X dual attention and RMS q/k norms), the key conversion agrees with diffusers' own single-file
converter, configs are read back from shapes, and our kohya-layout LoRA follows sd-scripts' lora_sd3 rules."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from loratrain.core.errors import ConfigError
from loratrain.core.lora.sd3_network import (
    create_sd3_lora,
    kohya_sd3_state_dict,
    linear_shapes,
    load_kohya_sd3_state_dict,
    save_sd3_lora,
    sd3_lora_from_kohya,
)
from loratrain.core.models.sd3 import (
    SD3_MEDIUM,
    SD3_TINY,
    SD35_LARGE,
    SD35_MEDIUM,
    SD35_TINY,
    SD3Transformer,
    sd3_config_from_shapes,
)
from loratrain.core.models.sd3_keys import diffusers_to_sd3, sd3_to_diffusers
from loratrain.core.weights import load_state_dict
from tests.test_flux_core import check_lora_starts_as_no_op_then_trains_only_itself

#: diffusers' own test sizes for SD3Transformer2DModel (tests/models/transformers/test_models_transformer_sd3.py)
DIFFUSERS_TINY = dict(sample_size=32, patch_size=1, in_channels=4, num_layers=4, attention_head_dim=8,
                      num_attention_heads=4, caption_projection_dim=32, joint_attention_dim=32, pooled_projection_dim=64,
                      out_channels=4, pos_embed_max_size=96, dual_attention_layers=(), qk_norm=None)
CASES = {"sd3": ({}, SD3_TINY),
         "sd35": (dict(dual_attention_layers=(0,), qk_norm="rms_norm"), SD35_TINY),
         # patch 2 (as the real models) so the patchify / unpatchify order is checked too; MMDiT-X on two blocks
         "sd35_patch2": (dict(patch_size=2, dual_attention_layers=(0, 2), qk_norm="rms_norm"),
                         dataclasses.replace(SD35_TINY, patch_size=2, dual_attention_layers=(0, 2)))}


def _shapes(sd):
    return {k: tuple(v.shape) for k, v in sd.items()}


def _inputs(cfg, batch=2, rows=4, cols=6, n_ctx=9, seed=1):
    """A non-square latent, so rows and columns cannot be swapped unnoticed."""
    g = torch.Generator().manual_seed(seed)
    p = cfg.patch_size
    return dict(x=torch.randn(batch, cfg.in_channels, rows * p, cols * p, generator=g),
                timesteps=torch.tensor([17.0, 803.0][:batch]),
                context=torch.randn(batch, n_ctx, cfg.joint_attention_dim, generator=g),
                y=torch.randn(batch, cfg.pooled_projection_dim, generator=g))


def _tiny_model(cfg=SD35_TINY, seed=0):
    torch.manual_seed(seed)
    model = SD3Transformer(cfg).eval()
    with torch.no_grad():  # random everything (norm weights, zero-initialised layers, positions), so no swap can hide
        for p in model.parameters():
            p.normal_(0, 0.2)
        model.pos_embed.normal_(0, 0.5)
    return model


@pytest.mark.parametrize("case", list(CASES))
def test_same_output_as_diffusers_sd3_transformer(case):
    from diffusers import SD3Transformer2DModel
    from diffusers.loaders.single_file_utils import convert_sd3_transformer_checkpoint_to_diffusers

    extra, expected = CASES[case]
    torch.manual_seed(0)
    theirs = SD3Transformer2DModel(**{**DIFFUSERS_TINY, **extra}).eval()
    with torch.no_grad():
        for p in theirs.parameters():
            p.normal_(0, 0.2)
        theirs.pos_embed.pos_embed.normal_(0, 0.5)
    ours_sd = diffusers_to_sd3(theirs.state_dict())
    head = None if expected.qk_norm else 8  # SD3 3.0 files show no head size; SAI's are 64, the tiny model's 8
    cfg = sd3_config_from_shapes(_shapes(ours_sd), head_dim=head)
    assert cfg == expected
    ours = SD3Transformer(cfg).eval()
    ours.load_state_dict(ours_sd, strict=True)
    back = sd3_to_diffusers(ours.state_dict())
    assert back.keys() == theirs.state_dict().keys()
    assert all(torch.equal(back[k], v) for k, v in theirs.state_dict().items())
    # diffusers' own single-file converter reads our layout into exactly the same tensors
    official = convert_sd3_transformer_checkpoint_to_diffusers({"model.diffusion_model." + k: v.clone()
                                                                for k, v in ours.state_dict().items()})
    assert official.keys() == back.keys() and all(torch.equal(official[k], v) for k, v in back.items())

    x = _inputs(cfg)
    with torch.no_grad():
        ref = theirs(hidden_states=x["x"], encoder_hidden_states=x["context"], pooled_projections=x["y"],
                     timestep=x["timesteps"]).sample
        out = ours(**x)
    assert ref.shape == out.shape == x["x"].shape
    assert ref.abs().max() > 0.5  # a real signal, not a near-zero output
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def test_config_detected_from_real_shapes_and_prefixes():
    from accelerate import init_empty_weights
    from diffusers import SD3Transformer2DModel

    diffusers_cfg = {  # the released models' transformer configs, in diffusers' names
        "medium": dict(num_layers=24, num_attention_heads=24, caption_projection_dim=1536, pos_embed_max_size=192),
        "5-large": dict(num_layers=38, num_attention_heads=38, caption_projection_dim=2432, pos_embed_max_size=192,
                        qk_norm="rms_norm"),
        "5-medium": dict(num_layers=24, num_attention_heads=24, caption_projection_dim=1536, pos_embed_max_size=384,
                         qk_norm="rms_norm", dual_attention_layers=tuple(range(13))),
    }
    for cfg in (SD3_MEDIUM, SD35_LARGE, SD35_MEDIUM):
        with torch.device("meta"):
            model = SD3Transformer(cfg)
        shapes = _shapes(model.state_dict())
        assert sd3_config_from_shapes(shapes) == cfg
        assert sd3_config_from_shapes({"model.diffusion_model." + k: v for k, v in shapes.items()}) == cfg
        layers = {n: (m.in_channels, m.out_channels) if isinstance(m, torch.nn.Conv2d) else (m.in_features, m.out_features)
                  for n, m in model.named_modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))}
        assert layers == linear_shapes(cfg)
        with init_empty_weights():
            theirs = SD3Transformer2DModel(**diffusers_cfg[cfg.variant])
        assert _shapes(sd3_to_diffusers(model.state_dict())) == _shapes(theirs.state_dict())
    assert (SD3_MEDIUM.variant, SD35_LARGE.variant, SD35_MEDIUM.variant) == ("medium", "5-large", "5-medium")
    assert SD35_LARGE.hidden_size == 2432 and SD35_MEDIUM.hidden_size == SD3_MEDIUM.hidden_size == 1536


def test_detection_names_what_is_wrong():
    shapes = _shapes(_tiny_model().state_dict())
    with pytest.raises(ConfigError, match="not an SD3"):
        sd3_config_from_shapes({"model.diffusion_model.double_blocks.0.img_attn.qkv.weight": (96, 32)}, "x.safetensors")
    with pytest.raises(ConfigError, match="diffusers' layout"):
        sd3_config_from_shapes({"transformer_blocks.0.attn.add_q_proj.weight": (32, 32)})
    with pytest.raises(ConfigError, match="without context_embedder.weight"):
        sd3_config_from_shapes({k: v for k, v in shapes.items() if not k.startswith("context_embedder")})
    with pytest.raises(ConfigError, match="LayerNorm q/k"):
        sd3_config_from_shapes({**shapes, "joint_blocks.0.x_block.attn.ln_q.bias": (8,)})
    with pytest.raises(ConfigError, match="square"):
        sd3_config_from_shapes({**shapes, "pos_embed": (1, 50, 32)})
    no_norms = {k: v for k, v in _shapes(_tiny_model(SD3_TINY).state_dict()).items()}
    with pytest.raises(ConfigError, match="head size 64"):  # a 3.0-style file: 64-channel heads assumed, 32 does not fit
        sd3_config_from_shapes(no_norms)
    patch2 = dataclasses.replace(SD35_TINY, patch_size=2)
    with pytest.raises(ConfigError, match="patch size 2"), torch.no_grad():
        _tiny_model(patch2)(**_inputs(patch2, batch=1) | {"x": torch.randn(1, 4, 5, 6)})
    with pytest.raises(ConfigError, match="position grid"), torch.no_grad():
        _tiny_model()(**_inputs(SD35_TINY, batch=1, rows=97, cols=2))
    with pytest.raises(ConfigError, match="dual_attention_layers"):
        SD3Transformer(dataclasses.replace(SD35_TINY, dual_attention_layers=(3,)))


def test_lora_starts_as_no_op_then_trains_only_itself():
    cfg = dataclasses.replace(SD35_TINY, patch_size=2)
    model = _tiny_model(cfg)
    net = check_lora_starts_as_no_op_then_trains_only_itself(  # the x_embedder conv too
        model, lambda: create_sd3_lora(cfg, rank=4, alpha=2.0, emb_dims=[2] * 6), _inputs(cfg))
    assert net.lora["lora_unet_x_embedder_proj"].up.grad.abs().max() > 0


def _expected_default_modules(cfg):
    """sd-scripts' rule, written out: every Linear of both halves of every joint block; the last block's context half
    is pre-only (modulation and qkv); MMDiT-X blocks add attn2's qkv and proj to the image half."""
    names = set()
    for i in range(cfg.num_layers):
        last = i == cfg.num_layers - 1
        ctx = ["adaLN_modulation_1", "attn_qkv"] + ([] if last else ["attn_proj", "mlp_fc1", "mlp_fc2"])
        img = ["adaLN_modulation_1", "attn_qkv", "attn_proj", "mlp_fc1", "mlp_fc2"]
        img += ["attn2_qkv", "attn2_proj"] if i in cfg.dual_attention_layers else []
        names |= {f"lora_unet_joint_blocks_{i}_context_block_{m}" for m in ctx}
        names |= {f"lora_unet_joint_blocks_{i}_x_block_{m}" for m in img}
    return names


@pytest.mark.parametrize("split_qkv", [False, True], ids=["fused", "split_qkv"])
def test_kohya_file_follows_sd_scripts_rules_and_reloads(tmp_path, split_qkv):
    cfg = SD35_TINY
    model = _tiny_model(cfg)
    x = _inputs(cfg)
    net = create_sd3_lora(cfg, rank=4, alpha=1.0, split_qkv=split_qkv).apply_to(model)
    with torch.no_grad():
        for p in net.parameters():
            p.normal_(0, 0.3)
        out = model(**x)
    path = save_sd3_lora(net, tmp_path / "sd3_lora.safetensors", {"ss_network_module": "networks.lora_sd3"})
    sd, meta = load_state_dict(path)
    assert meta["ss_network_module"] == "networks.lora_sd3"

    expected = _expected_default_modules(cfg)
    assert len(expected) == 4 * 10 - 3 + 2  # 4 blocks x 10, minus the pre-only half's 3, plus block 0's attn2
    assert {k.split(".")[0] for k in sd} == expected
    assert len(sd) == 3 * len(expected)
    shapes = {"lora_unet_" + p.replace(".", "_"): s for p, s in linear_shapes(cfg).items()}
    for name in expected:
        fan_in, fan_out = shapes[name]
        n = 3 if split_qkv and name.endswith("qkv") else 1
        assert sd[f"{name}.lora_down.weight"].shape == (4 * n, fan_in)
        assert sd[f"{name}.lora_up.weight"].shape == (fan_out, 4 * n)
        alpha = sd[f"{name}.alpha"]
        assert alpha.shape == () and alpha.dtype == torch.float32 and float(alpha) == n  # alpha / file rank = 1/4
    assert sd["lora_unet_joint_blocks_3_context_block_adaLN_modulation_1.lora_up.weight"].shape[0] == 2 * 32
    assert sd["lora_unet_joint_blocks_0_x_block_adaLN_modulation_1.lora_up.weight"].shape[0] == 9 * 32

    for reload_split in {split_qkv, False}:  # a split file also reads as a plain rank-3r LoRA, same ΔW
        fresh = _tiny_model(cfg)
        sd3_lora_from_kohya(cfg, sd, split_qkv=reload_split).apply_to(fresh)
        with torch.no_grad():
            torch.testing.assert_close(fresh(**x), out, atol=1e-5, rtol=1e-5)
    again = create_sd3_lora(cfg, rank=4, split_qkv=split_qkv)
    load_kohya_sd3_state_dict(again, sd)
    assert all(torch.equal(a, b) for a, b in zip(again.parameters(), net.parameters()))
    if not split_qkv:  # a dense (not block-diagonal) up cannot be split into q/k/v adapters: refused, not truncated
        with pytest.raises(ConfigError, match="split_qkv"):
            sd3_lora_from_kohya(cfg, sd, split_qkv=True)
    with pytest.raises(ConfigError, match="another SD3"):  # SD3.5 medium's attn2 does not exist in a 3.0-style model
        sd3_lora_from_kohya(dataclasses.replace(cfg, dual_attention_layers=()), sd)


def test_network_args_type_dims_emb_dims_and_blocks(tmp_path):
    cfg = dataclasses.replace(SD35_TINY, patch_size=2)
    modules = lambda **kw: {k.split(".")[0]: v for k, v in kohya_sd3_state_dict(create_sd3_lora(cfg, 2, **kw)).items()  # noqa: E731
                            if k.endswith("lora_down.weight")}
    default = modules()
    assert set(default) == _expected_default_modules(cfg)
    typed = modules(type_dims=dict(context_mlp_dim=0, x_attn_dim=6, x_mod_dim=3))
    assert not any("context_block_mlp" in n for n in typed)
    assert all(typed[n].shape[0] == 6 for n in typed if "x_block_attn" in n)  # attn2 too: sd-scripts matches "attn"
    assert typed["lora_unet_joint_blocks_0_x_block_adaLN_modulation_1"].shape[0] == 3
    assert typed["lora_unet_joint_blocks_0_context_block_attn_qkv"].shape[0] == 2
    blocks = modules(train_block_indices="0,2-3")
    assert {n.split("_")[4] for n in blocks} == {"0", "2", "3"}
    assert modules(train_block_indices="none") == {}

    emb = modules(emb_dims=[1, 2, 3, 4, 0, 5])
    assert set(emb) - set(default) == {"lora_unet_context_embedder", "lora_unet_t_embedder_mlp_0",
                                       "lora_unet_t_embedder_mlp_2", "lora_unet_x_embedder_proj",
                                       "lora_unet_y_embedder_mlp_0", "lora_unet_y_embedder_mlp_2",
                                       "lora_unet_final_layer_linear"}
    assert emb["lora_unet_x_embedder_proj"].shape == (3, 4, 2, 2)  # conv down: the patch kernel, rank 3
    net = create_sd3_lora(cfg, 2, emb_dims=[0, 0, 3, 0, 0, 0], conv_dim=5, conv_alpha=2.5)
    sd = kohya_sd3_state_dict(net)
    assert sd["lora_unet_x_embedder_proj.lora_up.weight"].shape == (32, 5, 1, 1)  # conv_dim wins, as in sd-scripts
    assert float(sd["lora_unet_x_embedder_proj.alpha"]) == 2.5
    model = _tiny_model(cfg)
    with torch.no_grad():
        for p in net.parameters():
            p.normal_(0, 0.3)
    x = _inputs(cfg)
    net.apply_to(model)
    with torch.no_grad():
        out = model(**x)
        conv = net.lora["lora_unet_x_embedder_proj"]  # the conv LoRA is exactly its dense ΔW added to the conv
        dense = torch.nn.functional.conv2d(x["x"], conv.delta_weight(), stride=2)
        torch.testing.assert_close(model.x_embedder.proj(x["x"]) - torch.nn.functional.conv2d(
            x["x"], model.x_embedder.proj.weight, model.x_embedder.proj.bias, stride=2), dense, atol=1e-5, rtol=1e-5)
    save_sd3_lora(net, tmp_path / "emb.safetensors")
    fresh = _tiny_model(cfg)
    sd3_lora_from_kohya(cfg, load_state_dict(tmp_path / "emb.safetensors")[0]).apply_to(fresh)
    with torch.no_grad():
        torch.testing.assert_close(fresh(**x), out, atol=1e-5, rtol=1e-5)

    with pytest.raises(ConfigError, match="emb_dims"):
        create_sd3_lora(cfg, emb_dims=[1, 2])
    with pytest.raises(ConfigError, match="outside"):
        create_sd3_lora(cfg, train_block_indices="0-9")
    with pytest.raises(ConfigError, match="train_block_indices"):
        create_sd3_lora(cfg, train_block_indices="first")
    with pytest.raises(ConfigError, match="context_dim"):
        create_sd3_lora(cfg, type_dims={"context_dim": 2})
    with pytest.raises(ConfigError, match="no 32->288 Linear at joint_blocks.0.x_block.adaLN_modulation.1"):
        create_sd3_lora(cfg).apply_to(_tiny_model(dataclasses.replace(cfg, dual_attention_layers=())))


def test_sd3_block_swap_gives_the_same_loss_and_lora_gradients():
    """--blocks_to_swap on SD3 (the last N joint blocks): with every swapped weight NaN while "on the host", a
    checkpointed step gives the same loss and LoRA gradients as the resident model, and the blocks stream in order."""
    import copy

    from loratrain.core.lora.sd3_network import create_sd3_lora
    from loratrain.core.models.block_swap import enable_block_swap
    from loratrain.core.models.sd3 import SD35_TINY, SD3Transformer

    torch.manual_seed(0)
    base = SD3Transformer(SD35_TINY).requires_grad_(False)
    with torch.no_grad():
        for p in base.parameters():
            p.normal_(0, 0.05)

    def step(swap: int):
        model = copy.deepcopy(base)
        sw = enable_block_swap(model, swap, "cpu", poison=True) if swap else None
        torch.manual_seed(1)
        net = create_sd3_lora(SD35_TINY, 4, 2.0)
        for name, p in net.named_parameters():
            if "up" in name:
                torch.nn.init.normal_(p, std=0.1)
        net.apply_to(model)
        model.enable_gradient_checkpointing()
        model.train()
        g = torch.Generator().manual_seed(3)
        out = model(torch.randn(2, 4, 8, 8, generator=g), torch.rand(2, generator=g) * 1000,
                    torch.randn(2, 6, 32, generator=g), torch.randn(2, 64, generator=g))
        loss = out.pow(2).mean()
        loss.backward()
        return loss.detach(), {k: p.grad.clone() for k, p in net.named_parameters()}, sw

    loss, grads, _ = step(0)
    loss_s, grads_s, sw = step(3)
    assert sw.swapped == {1, 2, 3}
    assert torch.isfinite(loss) and torch.equal(loss, loss_s)
    assert all(torch.equal(grads[k], grads_s[k]) for k in grads)
    assert [i for kind, i in sw.events if kind == "use"] == [1, 2, 3, 3, 2, 1]
    assert all(torch.isnan(t).all() for t in sw.model.joint_blocks[-1].parameters())  # "on the host" again


@pytest.mark.parametrize("split", [False, True])
def test_diffusers_layout_lora_gives_diffusers_the_same_output(split):
    """Our kohya SD3 LoRA written in diffusers' PEFT layout (--save_diffusers_layout) and loaded by diffusers'
    own SD3Transformer2DModel.load_lora_adapter computes what our model computes with the kohya file; read back, it
    is the same ΔW in our layout."""
    from diffusers import SD3Transformer2DModel

    from loratrain.core.lora.sd3_layouts import diffusers_sd3_to_kohya, kohya_sd3_to_diffusers
    from loratrain.core.lora.sd3_network import create_sd3_lora, kohya_sd3_state_dict, sd3_lora_from_kohya

    cfg = SD35_TINY
    ours = _tiny_model(cfg)
    torch.manual_seed(5)
    net = create_sd3_lora(cfg, 4, 2.0, split_qkv=split, emb_dims=[2, 2, 0, 2, 2, 2])
    with torch.no_grad():
        for name, p in net.named_parameters():
            if "up" in name:
                p.normal_(0, 0.3)
    kohya = kohya_sd3_state_dict(net)
    twin = kohya_sd3_to_diffusers(kohya, cfg)
    assert all(k.startswith("transformer.") and (".lora_A." in k or ".lora_B." in k) for k in twin)
    theirs = SD3Transformer2DModel(**{**DIFFUSERS_TINY, "dual_attention_layers": (0,), "qk_norm": "rms_norm"}).eval()
    theirs.load_state_dict(sd3_to_diffusers(ours.state_dict()), strict=True)
    theirs.load_lora_adapter(twin, prefix="transformer", adapter_name="t")
    net.apply_to(ours)
    x = _inputs(cfg)
    with torch.no_grad():
        ref = theirs(hidden_states=x["x"], encoder_hidden_states=x["context"], pooled_projections=x["y"],
                     timestep=x["timesteps"]).sample
        out = ours(**x)
    assert (ref - out).abs().max() < 1e-4 * max(1.0, ref.abs().max().item())
    back = diffusers_sd3_to_kohya(twin, cfg)
    again = sd3_lora_from_kohya(cfg, back)
    for name, module in net.lora.items():
        assert (again.lora[name].delta_weight() - module.delta_weight()).abs().max() < 1e-5, name
