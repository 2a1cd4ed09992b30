"""FLUX LoRA layouts: our kohya file <-> diffusers / PEFT / SimpleTuner / ai-toolkit / ComfyUI layouts, same ΔW on every
Linear both ways, and diffusers' own loader applies our diffusers-layout copy as our network does (tiny model, CPU)."""
from __future__ import annotations

import json

import pytest
import torch

from loratrain.core.errors import ConfigError
from loratrain.core.lora.flux_layouts import flux_lora_to_kohya, is_flux_lora, kohya_flux_to_diffusers, save_diffusers_layout
from loratrain.core.lora.flux_network import create_flux_lora, flux_lora_from_kohya, kohya_flux_state_dict, kohya_name, linear_shapes
from loratrain.core.models.flux_keys import FINAL_MOD, diffusers_to_bfl, module_map, swap_halves
from tests.test_flux_core import DIFFUSERS_TINY, _inputs, _tiny_model


def _net(cfg, split_qkv, seed=3):
    net = create_flux_lora(cfg, rank=3, alpha=1.5, split_qkv=split_qkv, in_dims=[2, 2, 2, 2, 2])
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return net


def kohya_deltas(sd):
    """BFL module path -> dense ΔW of a kohya file (alpha / rank * up @ down)."""
    out = {}
    for key in sd:
        if key.endswith(".lora_down.weight"):
            name = key[:-len(".lora_down.weight")]
            down, up = sd[key].double(), sd[f"{name}.lora_up.weight"].double()
            out[name] = float(sd.get(f"{name}.alpha", down.shape[0])) / down.shape[0] * up @ down
    return out


def diffusers_deltas(sd, cfg):
    """The same, from a diffusers-layout file (scale 1), each diffusers Linear's rows put back into its BFL Linear."""
    table = module_map(cfg.depth, cfg.depth_single_blocks, cfg.hidden_size, cfg.mlp_hidden)
    out = {}
    for bfl, targets in table.items():
        rows = []
        for diff, start, end in targets:
            a = sd.get(f"transformer.{diff}.lora_A.weight")
            if a is None:
                continue
            rows.append((start, end, sd[f"transformer.{diff}.lora_B.weight"].double() @ a.double()))
        if not rows:
            continue
        n_out = rows[0][2].shape[0] if targets[0][2] < 0 else targets[-1][2]
        dw = torch.zeros(n_out, rows[0][2].shape[1], dtype=torch.float64)
        for start, end, d in rows:
            dw[start:(end if end >= 0 else n_out)] = d
        out["lora_unet_" + bfl.replace(".", "_")] = swap_halves(dw) if bfl == FINAL_MOD[0] else dw
    return out


@pytest.mark.parametrize("split_qkv", [False, True], ids=["fused", "split_qkv"])
def test_kohya_diffusers_round_trip_keeps_every_delta(split_qkv):
    model = _tiny_model(guidance=True, depth=2, depth_single_blocks=2)
    cfg = model.config
    sd = kohya_flux_state_dict(_net(cfg, split_qkv))
    g = torch.Generator().manual_seed(9)
    for name, (n_out, n_in) in {"final_layer_adaLN_modulation_1": (2 * cfg.hidden_size, cfg.hidden_size),
                                "final_layer_linear": (cfg.in_channels, cfg.hidden_size)}.items():
        sd[f"lora_unet_{name}.lora_down.weight"] = torch.randn(2, n_in, generator=g)
        sd[f"lora_unet_{name}.lora_up.weight"] = torch.randn(n_out, 2, generator=g)
        sd[f"lora_unet_{name}.alpha"] = torch.tensor(1.0)
    sd["lora_te1_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight"] = torch.randn(2, 8, generator=g)
    sd["lora_te1_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight"] = torch.randn(8, 2, generator=g)
    sd["lora_te1_text_model_encoder_layers_0_self_attn_q_proj.alpha"] = torch.tensor(4.0)
    want = kohya_deltas(sd)

    diff, skipped = kohya_flux_to_diffusers(sd)
    assert skipped == []
    assert all(k.startswith(("transformer.", "text_encoder.")) and k.endswith((".lora_A.weight", ".lora_B.weight")) for k in diff)
    assert "text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_A.weight" in diff
    assert "transformer.norm_out.linear.lora_B.weight" in diff and "transformer.single_transformer_blocks.1.proj_mlp.lora_A.weight" in diff
    if split_qkv:  # each slice keeps only its own rank-3 columns
        assert diff["transformer.transformer_blocks.0.attn.to_k.lora_A.weight"].shape == (3, cfg.hidden_size)
    got = diffusers_deltas(diff, cfg)
    unet = {k: v for k, v in want.items() if k.startswith("lora_unet_")}
    assert got.keys() == unet.keys()
    for name, dw in unet.items():
        torch.testing.assert_close(got[name], dw, atol=1e-6, rtol=1e-6, msg=name)

    back = flux_lora_to_kohya(diff)
    assert is_flux_lora(diff) and is_flux_lora(back)
    again = kohya_deltas(back)
    assert again.keys() == want.keys()
    for name, dw in want.items():
        torch.testing.assert_close(again[name], dw, atol=1e-6, rtol=1e-6, msg=name)
    if not split_qkv:  # a fused LoRA comes back at its own rank, not 3x
        assert back["lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight"].shape[0] == 3


def _their_model(guidance=True):
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(0)
    theirs = FluxTransformer2DModel(**DIFFUSERS_TINY, guidance_embeds=guidance).eval()
    with torch.no_grad():
        for p in theirs.parameters():
            p.normal_(0, 0.2)
    return theirs


def _ours_from(theirs):
    from loratrain.core.models.flux import FluxTransformer, flux_config_from_shapes

    bfl = diffusers_to_bfl(theirs.state_dict())
    ours = FluxTransformer(flux_config_from_shapes({k: tuple(v.shape) for k, v in bfl.items()})).eval()
    ours.load_state_dict(bfl, strict=True)
    return ours


def _run_theirs(theirs, x):
    return theirs(hidden_states=x["img"], encoder_hidden_states=x["txt"], pooled_projections=x["y"], timestep=x["timesteps"],
                  img_ids=x["img_ids"], txt_ids=x["txt_ids"], guidance=x["guidance"]).sample


@pytest.mark.parametrize("split_qkv", [False, True], ids=["fused", "split_qkv"])
def test_diffusers_loads_our_diffusers_layout_copy(tmp_path, split_qkv):
    from diffusers.loaders import FluxLoraLoaderMixin

    theirs = _their_model()
    ours = _ours_from(theirs)
    x = _inputs(ours.config)
    net = _net(ours.config, split_qkv).apply_to(ours)
    with torch.no_grad():
        ref, plain = ours(**x), _run_theirs(theirs, x)
    assert (ref - plain).abs().max() > 1e-2  # the LoRA changes the output
    path = tmp_path / "lora_diffusers.safetensors"
    assert save_diffusers_layout(kohya_flux_state_dict(net), path, {"ss_network_module": "networks.lora_flux"}) == []
    state = FluxLoraLoaderMixin.lora_state_dict(str(path))  # diffusers' pipeline loader reads it as is
    assert all(k.startswith("transformer.") for k in state)
    theirs.load_lora_adapter(state, prefix="transformer", adapter_name="ours")
    with torch.no_grad():
        torch.testing.assert_close(_run_theirs(theirs, x), ref, atol=1e-5, rtol=1e-5)


_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out", "ff.net.0.proj",
            "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2", "norm1.linear", "norm1_context.linear", "proj_mlp",
            "single_transformer_blocks.0.proj_out", "norm.linear", "x_embedder", "context_embedder"]


def _peft_lora(theirs, alpha):
    """A PEFT LoRA on every block Linear (separate q/k/v A's, as diffusers, SimpleTuner and ai-toolkit train), random."""
    from peft import LoraConfig, get_peft_model_state_dict, inject_adapter_in_model

    inject_adapter_in_model(LoraConfig(r=4, lora_alpha=alpha, target_modules=_TARGETS), theirs, adapter_name="default")
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for n, p in theirs.named_parameters():
            if "lora_" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return get_peft_model_state_dict(theirs, adapter_name="default")


def _layout(sd, kind, alpha):
    if kind == "simpletuner":  # diffusers' save_lora_weights: transformer. prefix, alpha in the header metadata
        return {f"transformer.{k}": v for k, v in sd.items()}, {"lora_adapter_metadata": json.dumps({"r": 4, "lora_alpha": alpha})}
    if kind == "ai-toolkit":  # diffusion_model. prefix, kohya part names, an alpha key per module
        out = {}
        for k, v in sd.items():
            module = k.rsplit(".lora_", 1)[0]
            out["diffusion_model." + k.replace(".lora_A.weight", ".lora_down.weight").replace(".lora_B.weight", ".lora_up.weight")] = v
            out[f"diffusion_model.{module}.alpha"] = torch.tensor(float(alpha))
        return out, {}
    return {f"transformer.{k}": v for k, v in sd.items()}, {}  # alpha == rank: no alpha anywhere


@pytest.mark.parametrize("kind", ["simpletuner", "ai-toolkit", "plain"])
def test_peft_trained_lora_reads_into_our_network(kind):
    theirs = _their_model()
    ours = _ours_from(theirs)
    x = _inputs(ours.config)
    alpha = 4 if kind == "plain" else 8
    peft_sd = _peft_lora(theirs, alpha)
    with torch.no_grad():
        ref = _run_theirs(theirs, x)
    sd, meta = _layout(peft_sd, kind, alpha)
    kohya = flux_lora_to_kohya(sd, meta, source=kind)
    assert all(k.startswith("lora_unet_") for k in kohya)
    flux_lora_from_kohya(ours.config, kohya).apply_to(ours)
    with torch.no_grad():
        torch.testing.assert_close(ours(**x), ref, atol=1e-5, rtol=1e-5)


def test_comfyui_bfl_names_and_bad_files():
    cfg = _tiny_model().config
    sd = kohya_flux_state_dict(_net(cfg, False))
    by_name = {kohya_name(p): p for p in linear_shapes(cfg)}
    parts = {"lora_down.weight": "lora_A.weight", "lora_up.weight": "lora_B.weight", "alpha": "alpha"}
    comfy = {f"diffusion_model.{by_name[k.split('.')[0]]}.{parts[k.partition('.')[2]]}": v for k, v in sd.items()}
    back = flux_lora_to_kohya(comfy)
    assert back.keys() == sd.keys()
    assert all(torch.equal(back[k], sd[k]) for k in sd)
    with pytest.raises(ConfigError, match="no Linear"):
        flux_lora_to_kohya({f"transformer.transformer_blocks.0.attn.{m}.lora_{p}.weight": torch.zeros(2, 32) if p == "A" else
                            torch.zeros(32, 2) for m in ("to_q", "norm_q") for p in "AB"})
    with pytest.raises(ConfigError, match="lacks"):
        flux_lora_to_kohya({"transformer.transformer_blocks.0.attn.to_q.lora_A.weight": torch.zeros(2, 16)})
    with pytest.raises(ConfigError, match="DoRA"):
        flux_lora_to_kohya({"transformer.transformer_blocks.0.attn.to_q.lora_magnitude_vector": torch.zeros(16)})


def test_network_weights_read_a_diffusers_layout_file(tmp_path):
    """`--network_weights` with a diffusers-layout FLUX LoRA starts the trainer's network at the same ΔW."""
    from loratrain.training.networks.base import NetworkSpec
    from loratrain.training.networks.flux import FluxNetwork

    model = _tiny_model(guidance=True, depth=2, depth_single_blocks=2)
    cfg = model.config
    src = _net(cfg, split_qkv=False)
    want = kohya_deltas(kohya_flux_state_dict(src, torch.float32))
    path = tmp_path / "diffusers_layout.safetensors"
    save_diffusers_layout(kohya_flux_state_dict(src, torch.float32), path, {})
    from safetensors.torch import load_file

    fresh = FluxNetwork(create_flux_lora(cfg, rank=3, alpha=1.5, in_dims=[2, 2, 2, 2, 2]), NetworkSpec(), {})
    assert fresh.load_kohya(load_file(str(path)), str(path)) == len(fresh.net.lora)
    got = kohya_deltas(kohya_flux_state_dict(fresh.net, torch.float32))
    assert set(got) == set(want)
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-5, atol=1e-6)
