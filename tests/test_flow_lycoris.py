"""LoHa and LoKr on FLUX.1 and SD3 (issue 25: "our LyCORIS kinds where their layout exists for these models"):
LyCORIS' tensors under sd-scripts' `lora_unet_<path>` names (what LyCORIS' kohya wrapper writes on these models and
ComfyUI maps), the ΔW the live hooks apply equal to what the independent file reader (core/lora/kinds.py) and
`lora bake` compute, and through the real CLI: training, metadata, bit-exact resume, reload, and clear refusals."""
from __future__ import annotations

import json

import pytest
import torch

from loratrain.cli import main
from loratrain.core.lora.flux_network import create_flux_lora, flux_lora_from_kohya, kohya_flux_state_dict
from loratrain.core.lora.hooked_kinds import HookedLokrModule, factorization
from loratrain.core.lora.kinds import lycoris_module
from loratrain.core.lora.sd3_network import create_sd3_lora, kohya_sd3_state_dict, sd3_lora_from_kohya
from loratrain.core.models.flux import FluxTransformer
from loratrain.core.models.sd3 import SD35_TINY, SD3Transformer
from loratrain.core.safe_io import save_safetensors
from loratrain.core.weights import load_state_dict
from tests.test_flux_core import _inputs, _tiny_model
from tests.test_flux_train import CFG as FLUX_CFG
from tests.test_flux_train import _args as flux_args
from tests.test_flux_train import _cli, _tensors, flux_files  # noqa: F401  (a fixture)
from tests.test_sd3_train import _args as sd3_args
from tests.test_sd3_train import sd3_files  # noqa: F401  (a fixture)


def _randomise(net: torch.nn.Module, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)


def _check_reader_and_merge(net, model, run, sd: dict[str, torch.Tensor]) -> None:
    """Every module's ΔW from the file (the independent LyCORIS reader) equals the adapter's, and the model with the
    adapters hooked computes what the model with W + ΔW merged computes."""
    weights = dict(model.named_parameters())
    for name, module in net.lora.items():
        parts = {k.split(".", 1)[1]: v for k, v in sd.items() if k.split(".", 1)[0] == name}
        shape = tuple(weights[net.paths[name] + ".weight"].shape)
        torch.testing.assert_close(lycoris_module(name, parts).delta(shape), module.delta_weight(), rtol=1e-5, atol=1e-7)
    with torch.no_grad():
        net.apply_to(model)
        live = run(model)
        net.remove()
        plain = run(model)
        for name, module in net.lora.items():
            weights[net.paths[name] + ".weight"].add_(module.delta_weight())
        merged = run(model)
    assert (live - plain).abs().max() > 1e-3
    torch.testing.assert_close(live, merged, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("kind, rank", [("loha", 4), ("lokr", 4), ("lokr", 32)])
def test_flux_lycoris_file_means_what_the_hooks_apply(kind, rank):
    model = _tiny_model(guidance=True, depth=2, depth_single_blocks=2).eval()
    x = _inputs(model.config)
    net = create_flux_lora(model.config, rank, 2.0, kind=kind)
    lora_names = set(create_flux_lora(model.config, rank, 2.0).lora)
    assert set(net.lora) == lora_names  # LyCORIS' FLUX preset: every Linear of the double and single blocks
    _randomise(net)
    sd = kohya_flux_state_dict(net)
    suffixes = {k.split(".", 1)[1] for k in sd}
    if kind == "loha":
        assert suffixes == {"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "alpha"}
        assert sd["lora_unet_double_blocks_0_img_attn_qkv.hada_w1_a"].shape == (3 * model.config.hidden_size, rank)
    elif rank == 4:  # a low-rank W2 (rank < max(out_k, in_n) / 2): alpha / rank scales
        assert "lora_unet_single_blocks_0_linear1.lokr_w2_a" in sd and "lora_unet_single_blocks_0_linear1.lokr_w2" not in sd
    else:  # both factors whole: LyCORIS ignores alpha and saves alpha = dim
        assert "lora_unet_double_blocks_0_img_attn_proj.lokr_w2" in sd
        assert float(sd["lora_unet_double_blocks_0_img_attn_proj.alpha"]) == rank
    _check_reader_and_merge(net, model, lambda m: m(**x), sd)
    # the file rebuilds the same network (kind and shapes from the tensors)
    again = flux_lora_from_kohya(model.config, sd)
    assert again.kind == kind and all(torch.equal(again.lora[n].delta_weight(), net.lora[n].delta_weight()) for n in net.lora)


def test_lokr_factors_are_lycoris_most_balanced_split():
    assert [factorization(d) for d in (3072, 9216, 12, 127, 16)] == [(48, 64), (96, 96), (3, 4), (1, 127), (4, 4)]
    m = HookedLokrModule(3072, 9216, 16, 16.0)  # FLUX.1's attn.qkv
    assert (m.lokr_w1.shape, m.lokr_w2_a.shape, m.lokr_w2_b.shape) == ((96, 48), (96, 16), (16, 64))


@pytest.mark.parametrize("kind", ["loha", "lokr"])
def test_sd3_lycoris_file_means_what_the_hooks_apply(kind):
    torch.manual_seed(0)
    model = SD3Transformer(SD35_TINY).eval()
    net = create_sd3_lora(SD35_TINY, 4, 2.0, kind=kind, emb_dims=[2, 0, 0, 2, 0, 2])
    assert set(net.lora) == set(create_sd3_lora(SD35_TINY, 4, 2.0, emb_dims=[2, 0, 0, 2, 0, 2]).lora)
    _randomise(net, 1)
    sd = kohya_sd3_state_dict(net)
    assert "lora_unet_joint_blocks_0_x_block_attn2_qkv." + ("hada_w1_a" if kind == "loha" else "lokr_w1") in sd
    c = SD35_TINY
    inputs = (torch.randn(1, c.in_channels, 8, 8), torch.tensor([500.0]), torch.randn(1, 5, c.joint_attention_dim),
              torch.randn(1, c.pooled_projection_dim))
    _check_reader_and_merge(net, model, lambda m: m(*inputs), sd)
    assert sd3_lora_from_kohya(SD35_TINY, sd).kind == kind
    with pytest.raises(Exception, match="patchifying conv"):
        create_sd3_lora(SD35_TINY, 4, 2.0, kind=kind, emb_dims=[0, 0, 2, 0, 0, 0])


def test_cli_trains_a_flux_loha_with_its_text_encoder_bakes_and_reloads(flux_files, tmp_path):  # noqa: F811
    args = [a for a in flux_args(flux_files, tmp_path / "o", "--network_module", "lycoris.kohya",
                                 "--network_args", "algo=loha", "--text_encoder_lr", "1e-3")
            if a != "--network_train_unet_only"]
    res = _cli(args)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert "lycoris.kohya algo=loha" in res.stdout + res.stderr
    sd, meta = _tensors(tmp_path / "o" / "f.safetensors")
    unet = {k for k in sd if k.startswith("lora_unet_")}
    te = {k for k in sd if k.startswith("lora_te1_")}
    assert unet and te and len(unet) + len(te) == len(sd)
    assert {k.split(".", 1)[1] for k in sd} == {"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "alpha"}
    names = {k.split(".")[0] for k in unet}
    assert names == set(create_flux_lora(FLUX_CFG, 4, 2.0).lora)
    assert any(sd[k].abs().max() > 0 for k in unet if k.endswith("hada_w2_a"))  # it trained (starts at zero)
    assert any(sd[k].abs().max() > 0 for k in te if k.endswith("hada_w2_a"))
    assert meta["ss_network_module"] == "lycoris.kohya" and json.loads(meta["ss_network_args"]) == {"algo": "loha"}
    assert meta["modelspec.architecture"] == "flux-1-dev/lora"
    # lora bake: the checkpoint's Linear becomes W + ΔW, ΔW as the LyCORIS reader computes it from the file
    baked = tmp_path / "baked.safetensors"
    assert main(["lora", "bake", str(flux_files["model"]), "--loras", str(tmp_path / "o" / "f.safetensors"),
                 "--output", str(baked)]) == 0
    before, _ = load_state_dict(flux_files["model"])
    after, _ = load_state_dict(baked)
    name = "lora_unet_double_blocks_0_img_attn_qkv"
    key = "model.diffusion_model.double_blocks.0.img_attn.qkv.weight"
    parts = {k.split(".", 1)[1]: v for k, v in sd.items() if k.startswith(name + ".")}
    delta = lycoris_module(name, parts).delta(tuple(before[key].shape))
    assert delta.abs().max() > 0
    torch.testing.assert_close(after[key].float(), before[key].float() + delta, rtol=1e-5, atol=1e-6)
    # the file starts a new run with every module filled, text encoder included
    res = _cli(args[:args.index("--output_dir") + 1] + [str(tmp_path / "r")] + args[args.index("--output_dir") + 2:]
               + ["--network_weights", str(tmp_path / "o" / "f.safetensors"), "--max_train_steps", "1"])
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]


def test_sd3_lokr_stops_resumes_bit_identically_and_reloads(sd3_files, tmp_path):  # noqa: F811
    from loratrain.core.progress import RecordingReporter
    from loratrain.training.trainer import run_train

    from .flow_helpers import config_from_args, run_stopped_at

    extra = ("--network_module", "lokr")
    straight = run_train(config_from_args(sd3_args(sd3_files, tmp_path / "a", *extra)), RecordingReporter())
    run_stopped_at(sd3_args(sd3_files, tmp_path / "b", *extra))
    res = _cli(sd3_args(sd3_files, tmp_path / "b", *extra, "--resume", "latest"))
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    a, meta = _tensors(straight.lora_path)
    b, _ = _tensors(tmp_path / "b" / "s.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert all(".lokr_" in k or k.endswith(".alpha") for k in a) and any(k.endswith(".lokr_w2_b") for k in a)
    assert meta["ss_network_module"] == "lycoris.kohya" and json.loads(meta["ss_network_args"]) == {"algo": "lokr"}
    assert meta["modelspec.architecture"] == "stable-diffusion-3-5-medium/lora"
    res = _cli(sd3_args(sd3_files, tmp_path / "r", *extra, "--network_weights", str(tmp_path / "b" / "s.safetensors"),
                        "--max_train_steps", "1"))
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    n = len({k.split(".")[0] for k in a})
    assert f"{n} of {n} modules" in res.stdout + res.stderr
    # the same file in a LoRA run is named for what it is, not loaded as something else
    res = _cli(sd3_args(sd3_files, tmp_path / "x", "--network_weights", str(tmp_path / "b" / "s.safetensors"),
                        "--max_train_steps", "1"))
    assert res.returncode != 0 and "Traceback" not in res.stderr
    assert "lokr" in res.stderr, res.stderr[-2000:]


@pytest.mark.parametrize("extra, field", [
    (("--network_module", "loha", "--network_args", "split_qkv=True"), "split_qkv"),
    (("--network_module", "lycoris.kohya", "--network_args", "algo=lokr", "--save_diffusers_layout"), "save_diffusers_layout"),
    (("--network_module", "dylora"), "network_module"),
])
def test_flux_lycoris_mistakes_are_named_before_loading(flux_files, tmp_path, extra, field):  # noqa: F811
    res = _cli(flux_args(flux_files, tmp_path / "o", *extra))
    assert res.returncode == 2, res.stdout[-2000:] + res.stderr[-2000:]
    assert field in res.stderr and "Traceback" not in res.stderr, res.stderr[-2000:]
    assert not (tmp_path / "o").exists() or not any((tmp_path / "o").iterdir())


def test_a_flux_checkpoint_bakes_a_lokr_as_the_live_hooks_apply(tmp_path):
    model = _tiny_model(guidance=True, depth=2, depth_single_blocks=2).eval()
    ckpt = tmp_path / "flux.safetensors"
    save_safetensors({"model.diffusion_model." + k: v for k, v in model.state_dict().items()}, ckpt)
    net = create_flux_lora(model.config, 4, 2.0, kind="lokr")
    _randomise(net, 3)
    save_safetensors(kohya_flux_state_dict(net), tmp_path / "lokr.safetensors")
    out = tmp_path / "baked.safetensors"
    assert main(["lora", "bake", str(ckpt), "--loras", f"{tmp_path / 'lokr.safetensors'}:0.5", "--output", str(out)]) == 0
    sd, _ = load_state_dict(out)
    baked = FluxTransformer(model.config).eval()
    baked.load_state_dict({k[len("model.diffusion_model."):]: v for k, v in sd.items()})
    x = _inputs(model.config)
    net.set_multiplier(0.5)
    with torch.no_grad():
        net.apply_to(model)
        torch.testing.assert_close(baked(**x), model(**x), rtol=2e-5, atol=2e-5)


def _lying_files(cfg) -> dict[str, dict[str, torch.Tensor]]:
    """LoHa / LoKr / LoRA files that lie (a hostile review's list): each is refused with its file and module named."""
    g = torch.Generator().manual_seed(5)
    good = {k: v for k, v in kohya_flux_state_dict(create_flux_lora(cfg, 4, 2.0, kind="lokr")).items()}
    loha = kohya_flux_state_dict(create_flux_lora(cfg, 4, 2.0, kind="loha"))
    lora = kohya_flux_state_dict(create_flux_lora(cfg, 4, 2.0))
    name = "lora_unet_double_blocks_0_img_attn_qkv"
    w1, w2a = good[f"{name}.lokr_w1"], good[f"{name}.lokr_w2_a"]

    def edit(base: dict, **parts) -> dict:
        out = dict(base)
        for part, value in parts.items():
            if value is None:
                out.pop(f"{name}.{part}")
            else:
                out[f"{name}.{part}"] = value
        return out

    return {
        "loha_missing_w1_b": edit(loha, hada_w1_b=None),
        "loha_w1_b_0d": edit(loha, hada_w1_b=torch.tensor(1.0)),
        "loha_rank_mismatch": edit(loha, hada_w2_a=torch.randn(loha[f"{name}.hada_w2_a"].shape[0], 3, generator=g)),
        "lokr_w2_missing_b": edit(good, lokr_w2_b=None),
        "lokr_only_w1": {f"{name}.lokr_w1": w1},
        "lokr_w1_transposed": edit(good, lokr_w1=w1.t().contiguous()),  # same element count, another ΔW shape
        "lokr_w2_whole_and_pair": edit(good, lokr_w2=torch.randn(w2a.shape[0], 8, generator=g)),
        "loha_plus_lora_parts": {**loha, f"{name}.lora_down.weight": torch.zeros(4, 32)},
        "alpha_nan": edit(loha, alpha=torch.tensor(float("nan"))),
        "alpha_two_values": edit(good, alpha=torch.tensor([1.0, 2.0])),
        "lora_weight_inf": {**lora, f"{name}.lora_up.weight": torch.full_like(lora[f"{name}.lora_up.weight"], float("inf"))},
    }


def test_lying_lycoris_files_are_refused_with_file_and_module_named(tmp_path, capsys):
    from loratrain.core.errors import ConfigError

    model = _tiny_model(guidance=True, depth=2, depth_single_blocks=2).eval()
    ckpt = tmp_path / "flux.safetensors"
    save_safetensors({"model.diffusion_model." + k: v for k, v in model.state_dict().items()}, ckpt)
    for label, sd in _lying_files(model.config).items():
        path = tmp_path / f"{label}.safetensors"
        save_safetensors(sd, path)
        with pytest.raises(ConfigError) as e:  # what generate / the grid / --network_weights read
            flux_lora_from_kohya(model.config, sd, source=str(path))
        assert f"{label}.safetensors" in str(e.value) and "lora_unet_double_blocks_0_img_attn_qkv" in str(e.value), label
        out = tmp_path / f"{label}_baked.safetensors"
        capsys.readouterr()
        assert main(["lora", "bake", str(ckpt), "--loras", str(path), "--output", str(out)]) != 0, label
        err = capsys.readouterr().err
        assert "Traceback" not in err and f"{label}.safetensors" in err and "img_attn_qkv" in err, (label, err)
        assert not out.exists(), label


def test_empty_lora_files_and_vocabulary_less_t5_tokenizers_are_named(tmp_path):
    from types import SimpleNamespace

    from loratrain.core.errors import ConfigError
    from loratrain.core.flux_sampling import read_flux_lora
    from loratrain.core.models.flux_loading import find_t5_tokenizer

    save_safetensors({}, tmp_path / "empty.safetensors")
    with pytest.raises(ConfigError, match="empty.safetensors: no LoRA modules"):
        read_flux_lora(str(tmp_path / "empty.safetensors"), SimpleNamespace(config=FLUX_CFG))
    (tmp_path / "tok").mkdir()
    (tmp_path / "tok" / "tokenizer_config.json").write_text('{"tokenizer_class": "T5Tokenizer"}')
    with pytest.raises(ConfigError, match="holds no vocabulary"):
        find_t5_tokenizer(tmp_path, str(tmp_path / "tok"), "tokenizer_2")


@pytest.mark.parametrize("family", ["flux", "sd3"])
def test_dora_file_means_what_the_hooks_apply(family, tmp_path):
    """DoRA (LyCORIS' LoRA with dora_wd) on FLUX.1 / SD3: starts as a no-op (dora_scale = ‖W‖ per row, taken when it
    is hooked on), and the file's change, as the bake reader (files.read_lora -> kinds.DoraModule) computes it from
    the weight, is what the hooks apply; the file rebuilds the same network."""
    from loratrain.core.lora.files import read_lora

    torch.manual_seed(0)
    if family == "flux":
        model = _tiny_model(guidance=True, depth=2, depth_single_blocks=2).eval()
        x = _inputs(model.config)
        net, run = create_flux_lora(model.config, 4, 2.0, kind="dora"), (lambda m: m(**x))
        to_file, from_file = kohya_flux_state_dict, flux_lora_from_kohya
    else:
        model = SD3Transformer(SD35_TINY).eval()
        c = SD35_TINY
        x = (torch.randn(1, c.in_channels, 8, 8), torch.tensor([500.0]), torch.randn(1, 5, c.joint_attention_dim),
             torch.randn(1, c.pooled_projection_dim))
        net, run = create_sd3_lora(SD35_TINY, 4, 2.0, kind="dora"), (lambda m: m(*x))
        to_file, from_file = kohya_sd3_state_dict, sd3_lora_from_kohya
    with torch.no_grad():
        base = run(model)
        net.apply_to(model)
        torch.testing.assert_close(run(model), base)  # up = 0 and dora_scale = ‖W‖: no change yet
        net.remove()
        g = torch.Generator().manual_seed(1)
        for name, p in net.named_parameters():
            p.mul_(1 + 0.1 * torch.randn(p.shape, generator=g)) if "dora_scale" in name else p.copy_(
                torch.randn(p.shape, generator=g) * 0.3)
    sd = to_file(net)
    first = next(iter(net.lora))
    assert {k.split(".", 1)[1] for k in sd if k.startswith(first + ".")} == {"lora_down.weight", "lora_up.weight", "alpha",
                                                                          "dora_scale"}
    assert sd[f"{first}.dora_scale"].shape == (net.lora[first].out_features, 1)  # LyCORIS' wd_on_out layout
    save_safetensors(sd, tmp_path / "dora.safetensors")
    modules, _ = read_lora(tmp_path / "dora.safetensors")
    with torch.no_grad():
        net.apply_to(model)
        live = run(model)
        net.remove()
        weights = dict(model.named_parameters())
        for name in net.lora:
            w = weights[net.paths[name] + ".weight"]
            w.add_(modules[name].delta(tuple(w.shape), w.detach().clone()))
        merged = run(model)
    assert (live - base).abs().max() > 1e-2
    torch.testing.assert_close(live, merged, rtol=1e-4, atol=1e-5)
    assert from_file(SD35_TINY if family == "sd3" else model.config, sd).kind == "dora"


def test_cli_trains_a_flux_dora_from_sd_scripts_args_resumes_and_generates(flux_files, tmp_path):  # noqa: F811
    from tests.test_flux_sampling import _generate, _pixels

    from .flow_helpers import config_from_args, run_stopped_at

    def args(out):
        return [a for a in flux_args(flux_files, tmp_path / out, "--network_module", "lycoris.kohya", "--network_args",
                                     "algo=lora", "dora_wd=True") if a != "--network_train_unet_only"]

    from loratrain.core.progress import RecordingReporter
    from loratrain.training.trainer import run_train

    straight = run_train(config_from_args(args("a")), RecordingReporter())
    run_stopped_at(args("b"))
    res = _cli(args("b") + ["--resume", "latest"])
    assert res.returncode == 0 and "resumed from" in res.stdout + res.stderr, res.stdout[-3000:] + res.stderr[-3000:]
    a, meta = _tensors(straight.lora_path)
    b, _ = _tensors(tmp_path / "b" / "f.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # dora_scale resumes too
    assert any(k.startswith("lora_te1_") and k.endswith(".dora_scale") for k in a)  # the CLIP-L half is DoRA too
    assert meta["ss_network_module"] == "lycoris.kohya"
    assert json.loads(meta["ss_network_args"]) == {"algo": "lora", "dora_wd": "True"}
    base = _pixels(_generate(flux_files, tmp_path / "base.png"))
    off = _pixels(_generate(flux_files, tmp_path / "off.png", "--network_weights", f"{straight.lora_path}:0"))
    on = _pixels(_generate(flux_files, tmp_path / "on.png", "--network_weights", f"{straight.lora_path}:1"))
    assert (base == off).all() and (on != base).any()
