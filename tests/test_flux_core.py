"""FLUX.1 core: our BFL-layout transformer computes what diffusers' FluxTransformer2DModel computes, and our kohya-layout
LoRA means the same ΔW to diffusers' own kohya-Flux converter (at FLUX.1's real shapes)."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from loratrain.core.errors import ConfigError
from loratrain.core.lora.flux_network import (
    DOUBLE,
    SINGLE,
    create_flux_lora,
    flux_lora_from_kohya,
    kohya_flux_state_dict,
    linear_shapes,
    load_kohya_flux_state_dict,
    save_flux_lora,
)
from loratrain.core.models.flux import FLUX_DEV, FLUX_SCHNELL, FLUX_TINY, FluxTransformer, flux_config_from_shapes
from loratrain.core.models.flux_keys import bfl_to_diffusers, diffusers_to_bfl, module_map
from loratrain.core.weights import load_state_dict

#: diffusers' own test sizes for FluxTransformer2DModel (tests/models/transformers/test_models_transformer_flux.py)
DIFFUSERS_TINY = dict(patch_size=1, in_channels=4, num_layers=1, num_single_layers=1, attention_head_dim=16,
                      num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32, axes_dims_rope=[4, 4, 8])


def _inputs(cfg, batch=2, side=4, n_txt=7, seed=1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.zeros(side, side, 3)
    ids[..., 1], ids[..., 2] = torch.arange(side)[:, None], torch.arange(side)[None]
    return dict(img=torch.randn(batch, side * side, cfg.in_channels, generator=g), img_ids=ids.reshape(-1, 3),
                txt=torch.randn(batch, n_txt, cfg.context_in_dim, generator=g), txt_ids=torch.zeros(n_txt, 3),
                timesteps=torch.rand(batch, generator=g), y=torch.randn(batch, cfg.vec_in_dim, generator=g),
                guidance=torch.full((batch,), 3.5) if cfg.guidance_embed else None)


def _tiny_model(guidance=False, seed=0, **sizes):
    cfg = dataclasses.replace(FLUX_TINY, guidance_embed=guidance, **sizes)
    torch.manual_seed(seed)
    model = FluxTransformer(cfg).eval()
    with torch.no_grad():  # random everything (norm scales and zero-initialised layers too), so no swap can hide
        for p in model.parameters():
            p.normal_(0, 0.2)
    return model


@pytest.mark.parametrize("guidance", [False, True], ids=["schnell", "dev"])
def test_same_output_as_diffusers_flux_transformer(guidance):
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(0)
    theirs = FluxTransformer2DModel(**DIFFUSERS_TINY, guidance_embeds=guidance).eval()
    with torch.no_grad():
        for p in theirs.parameters():
            p.normal_(0, 0.2)
    bfl = diffusers_to_bfl(theirs.state_dict())
    cfg = flux_config_from_shapes({k: tuple(v.shape) for k, v in bfl.items()})
    assert cfg == dataclasses.replace(FLUX_TINY, guidance_embed=guidance)
    ours = FluxTransformer(cfg).eval()
    ours.load_state_dict(bfl, strict=True)
    back = bfl_to_diffusers(ours.state_dict())
    assert back.keys() == theirs.state_dict().keys()
    assert all(torch.equal(back[k], v) for k, v in theirs.state_dict().items())

    x = _inputs(cfg)
    with torch.no_grad():
        ref = theirs(hidden_states=x["img"], encoder_hidden_states=x["txt"], pooled_projections=x["y"],
                     timestep=x["timesteps"], img_ids=x["img_ids"], txt_ids=x["txt_ids"], guidance=x["guidance"]).sample
        out = ours(**x)
    assert ref.abs().max() > 0.5  # a real signal, not a near-zero output
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def test_config_detected_from_real_shapes_and_prefixes():
    for cfg in (FLUX_DEV, FLUX_SCHNELL):
        with torch.device("meta"):
            model = FluxTransformer(cfg)
        shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
        assert flux_config_from_shapes(shapes) == cfg
        assert flux_config_from_shapes({"model.diffusion_model." + k: v for k, v in shapes.items()}) == cfg
        linears = {n: (m.in_features, m.out_features) for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
        assert {p: s for p, s in linears.items() if not p.startswith("final_layer")} == linear_shapes(cfg)
    assert (FLUX_DEV.variant, FLUX_SCHNELL.variant) == ("dev", "schnell")
    from accelerate import init_empty_weights
    from diffusers import FluxTransformer2DModel

    with init_empty_weights():  # diffusers' default config is FLUX.1-schnell: same parameter count as ours
        theirs = FluxTransformer2DModel()
    assert sum(p.numel() for p in model.parameters()) == sum(p.numel() for p in theirs.parameters())


def test_detection_names_what_is_wrong():
    shapes = {k: tuple(v.shape) for k, v in _tiny_model().state_dict().items()}
    with pytest.raises(ConfigError, match="not a FLUX.1 transformer"):
        flux_config_from_shapes({"model.diffusion_model.input_blocks.0.0.weight": (320, 4, 3, 3)}, "x.safetensors")
    with pytest.raises(ConfigError, match="diffusers' layout"):
        flux_config_from_shapes({"transformer_blocks.0.attn.to_q.weight": (32, 32)})
    chroma = {k: v for k, v in shapes.items() if "_mod." not in k and "modulation" not in k}
    with pytest.raises(ConfigError, match="Chroma"):
        flux_config_from_shapes(chroma)
    with pytest.raises(ConfigError, match="without txt_in.weight"):
        flux_config_from_shapes({k: v for k, v in shapes.items() if not k.startswith("txt_in")})
    with pytest.raises(ConfigError, match="axes"):
        flux_config_from_shapes({**shapes, "double_blocks.0.img_attn.norm.query_norm.scale": (8,)})
    with pytest.raises(ConfigError, match="guidance"):
        _tiny_model(guidance=True)(**{**_inputs(dataclasses.replace(FLUX_TINY, guidance_embed=True)), "guidance": None})


def test_t5_mask_hides_padded_tokens():
    model = _tiny_model()
    x = _inputs(model.config)
    mask = torch.ones(2, 7, dtype=torch.bool)
    mask[:, 5:] = False
    changed = x["txt"].clone()
    changed[:, 5:] += 3.0
    with torch.no_grad():
        a, b = model(**x, txt_mask=mask), model(**{**x, "txt": changed}, txt_mask=mask)
        c = model(**{**x, "txt": changed})
    torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)
    assert (a - c).abs().max() > 1e-3


def check_lora_starts_as_no_op_then_trains_only_itself(model, make_net, x):
    """A hooked LoRA network (FLUX's, SD3's) starts as exactly the base model, gets the same loss and grads with
    gradient checkpointing, trains only itself (base weights and keys untouched) and is removed without a trace.
    Returns the network (its grads are the checkpointed pass's)."""
    with torch.no_grad():
        before = model(**x)
    base = {k: v.clone() for k, v in model.state_dict().items()}
    net = make_net().apply_to(model)
    model.requires_grad_(False)
    with torch.no_grad():
        assert torch.equal(model(**x), before)  # zero-initialised up: exactly the base model

    model.train()
    opt = torch.optim.AdamW(net.parameters(), lr=1e-2)
    target = torch.randn_like(before)
    losses, grads = [], []
    for checkpointing in (False, True):  # gradient checkpointing recomputes the same graph: same loss, same grads
        model.enable_gradient_checkpointing(checkpointing)
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(model(**x), target)
        loss.backward()
        losses.append(loss.item())
        grads.append([p.grad.clone() for p in net.parameters()])
    assert losses[0] == pytest.approx(losses[1], rel=1e-6)
    assert all(torch.allclose(a, b, atol=1e-7) for a, b in zip(*grads))
    opt.step()
    model.eval()
    with torch.no_grad():
        after = model(**x)
    assert (after - before).abs().max() > 1e-4
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in base.items())  # base weights untouched, keys unchanged
    net.remove()
    with torch.no_grad():
        assert torch.equal(model(**x), before)
    return net


def test_lora_starts_as_no_op_then_trains_only_itself():
    model = _tiny_model()
    check_lora_starts_as_no_op_then_trains_only_itself(
        model, lambda: create_flux_lora(model.config, rank=4, alpha=2.0), _inputs(model.config))


@pytest.mark.parametrize("split_qkv", [False, True], ids=["fused", "split_qkv"])
def test_kohya_file_follows_sd_scripts_rules_and_reloads(tmp_path, split_qkv):
    model = _tiny_model(depth=2, depth_single_blocks=2)
    cfg, x = model.config, _inputs(model.config)
    net = create_flux_lora(cfg, rank=4, alpha=1.0, split_qkv=split_qkv).apply_to(model)
    with torch.no_grad():
        for p in net.parameters():
            p.normal_(0, 0.3)
        out = model(**x)
    path = save_flux_lora(net, tmp_path / "flux_lora.safetensors", {"ss_network_module": "networks.lora_flux"})
    sd, meta = load_state_dict(path)
    assert meta["ss_network_module"] == "networks.lora_flux"

    expected = {f"lora_unet_double_blocks_{i}_{m.replace('.', '_')}" for i in range(2) for m in DOUBLE}
    expected |= {f"lora_unet_single_blocks_{i}_{m.replace('.', '_')}" for i in range(2) for m in SINGLE}
    assert {k.split(".")[0] for k in sd} == expected
    shapes = linear_shapes(cfg)
    by_name = {"lora_unet_" + p.replace(".", "_"): p for p in shapes}
    for name in expected:
        fan_in, fan_out = shapes[by_name[name]]
        n = {"qkv": 3, "linear1": 4}.get(by_name[name].rsplit(".", 1)[-1], 1) if split_qkv else 1
        assert sd[f"{name}.lora_down.weight"].shape == (4 * n, fan_in)
        assert sd[f"{name}.lora_up.weight"].shape == (fan_out, 4 * n)
        alpha = sd[f"{name}.alpha"]
        assert alpha.shape == () and alpha.dtype == torch.float32 and float(alpha) == n  # alpha / file rank = 1/4
    assert len(sd) == 3 * len(expected)

    for reload_split in {split_qkv, False}:  # a split file also reads as a plain rank-4n LoRA, same ΔW
        fresh = _tiny_model(depth=2, depth_single_blocks=2)
        flux_lora_from_kohya(cfg, sd, split_qkv=reload_split).apply_to(fresh)
        with torch.no_grad():
            torch.testing.assert_close(fresh(**x), out, atol=1e-5, rtol=1e-5)
    again = create_flux_lora(cfg, rank=4, split_qkv=split_qkv)
    load_kohya_flux_state_dict(again, sd)
    assert all(torch.equal(a, b) for a, b in zip(again.parameters(), net.parameters()))
    if not split_qkv:  # a dense (not block-diagonal) up cannot be split into q/k/v adapters: refused, not truncated
        with pytest.raises(ConfigError, match="split_qkv"):
            flux_lora_from_kohya(cfg, sd, split_qkv=True)


def test_network_args_train_blocks_and_in_dims():
    names = lambda cfg, **kw: set(kohya_flux_state_dict(create_flux_lora(cfg, 2, **kw)))  # noqa: E731
    dev = dataclasses.replace(FLUX_TINY, guidance_embed=True)
    modules = lambda keys: {k.split(".")[0] for k in keys}  # noqa: E731
    assert len(modules(names(FLUX_TINY))) == 13
    assert modules(names(FLUX_TINY, train_blocks="single")) == {f"lora_unet_single_blocks_0_{m.replace('.', '_')}" for m in SINGLE}
    assert len(modules(names(FLUX_TINY, train_blocks="double"))) == 10
    extra = modules(names(dev, in_dims=[2, 2, 2, 2, 2])) - modules(names(dev))
    assert extra == {"lora_unet_img_in", "lora_unet_time_in_in_layer", "lora_unet_time_in_out_layer",
                     "lora_unet_vector_in_in_layer", "lora_unet_vector_in_out_layer", "lora_unet_guidance_in_in_layer",
                     "lora_unet_guidance_in_out_layer", "lora_unet_txt_in"}
    assert modules(names(FLUX_TINY, in_dims=[2, 0, 0, 2, 0])) - modules(names(FLUX_TINY)) == {"lora_unet_img_in"}
    with pytest.raises(ConfigError, match="train_blocks"):
        create_flux_lora(FLUX_TINY, train_blocks="middle")
    with pytest.raises(ConfigError, match="in_dims"):
        create_flux_lora(FLUX_TINY, in_dims=[2, 2])
    with pytest.raises(ConfigError, match="no 32->224 Linear at single_blocks.0.linear1"):
        create_flux_lora(FLUX_TINY).apply_to(_tiny_model(depth_single_blocks=0))


@pytest.mark.parametrize("split_qkv", [False, True], ids=["fused", "split_qkv"])
def test_diffusers_kohya_flux_converter_applies_our_delta_at_real_shapes(split_qkv):
    """Rank 1 on every module sd-scripts trains (in_dims too) at FLUX.1-dev's real sizes, no model: the ΔW diffusers'
    own converter builds for each diffusers Linear equals the rows of the ΔW our network adds to the BFL Linear."""
    from diffusers.loaders.lora_conversion_utils import _convert_kohya_flux_lora_to_diffusers

    torch.manual_seed(0)
    net = create_flux_lora(FLUX_DEV, rank=1, alpha=0.5, split_qkv=split_qkv, in_dims=[1] * 5)
    with torch.no_grad():
        for p in net.parameters():
            p.normal_()
    converted = _convert_kohya_flux_lora_to_diffusers(kohya_flux_state_dict(net))
    table = module_map(FLUX_DEV.depth, FLUX_DEV.depth_single_blocks, FLUX_DEV.hidden_size, FLUX_DEV.mlp_hidden)
    sample = ["double_blocks.0.img_attn.qkv", "double_blocks.18.txt_attn.qkv", "single_blocks.37.linear1"]
    if not split_qkv:  # the other modules are the same either way: checked once
        sample += [f"double_blocks.0.{m}" for m in DOUBLE if "qkv" not in m] + ["single_blocks.0.linear2",
                   "single_blocks.0.modulation.lin", "img_in", "txt_in", "time_in.in_layer", "time_in.out_layer",
                   "vector_in.in_layer", "vector_in.out_layer", "guidance_in.in_layer", "guidance_in.out_layer"]
    checked = set()
    for bfl in sample:
        ours = net.lora["lora_unet_" + bfl.replace(".", "_")].delta_weight()
        for diff, start, end in table[bfl]:
            # diffusers emits the block modules under "transformer." but the embedders without it
            key = next(k for k in (f"transformer.{diff}", diff) if f"{k}.lora_A.weight" in converted)
            theirs = converted[f"{key}.lora_B.weight"].float() @ converted[f"{key}.lora_A.weight"].float()
            mine = ours if end < 0 else ours[start:end]
            assert theirs.shape == mine.shape, diff
            rel = (theirs - mine).norm() / mine.norm()
            assert rel < 1e-6, f"{bfl} -> {diff}: relative error {rel:.2e}"
            checked.add(diff.split(".", 2)[-1] if "blocks." in diff else diff)
    assert {"attn.to_q", "attn.to_k", "attn.to_v", "attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj",
            "proj_mlp"} <= checked
    assert split_qkv or {"attn.to_add_out", "attn.to_out.0", "norm1.linear", "norm1_context.linear", "proj_out",
                         "norm.linear", "ff.net.0.proj", "ff_context.net.2", "x_embedder",
                         "time_text_embed.guidance_embedder.linear_2"} <= checked
