"""LoHa, LoKr and DoRA: trained on the tiny model through the CLI, written in LyCORIS' layout, and the weight
change the file implies (computed here from the published formulas) is what the trained network does, what
`lora bake` writes and what generation applies; plus LyCORIS files made by hand ((IA)^3, full, Tucker LoHa)."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from loratrain.cli import main
from loratrain.core.lora.keys import module_kohya_names
from loratrain.core.models.loading import load_model
from loratrain.core.session import LoraUse, WeightPatcher
from loratrain.core.weights import read_safetensors_metadata
from loratrain.training.networks import NetworkSpec, build_network


def formula_delta(sd: dict[str, torch.Tensor], name: str, weight: torch.Tensor) -> torch.Tensor:
    """dW of module `name`, from the formulas in docs/lora-formats.md#module-kinds, written out here."""
    t = {k[len(name) + 1:]: v.float() for k, v in sd.items() if k.startswith(name + ".")}
    shape, w = weight.shape, weight.float()
    if "on_input" in t:  # (IA)^3: W' = W * (1 + w), w along the input (or output) channels
        view = [1] * len(shape)
        view[1 if int(t["on_input"]) else 0] = -1
        return w * t["weight"].flatten().reshape(view)
    if "hada_w1_a" in t:
        r = t["hada_w1_b"].shape[0]
        d = (t["hada_w1_a"] @ t["hada_w1_b"]) * (t["hada_w2_a"] @ t["hada_w2_b"]) * (float(t["alpha"]) / r)
    elif "lokr_w1" in t or "lokr_w1_a" in t:
        w1 = t["lokr_w1"] if "lokr_w1" in t else t["lokr_w1_a"] @ t["lokr_w1_b"]
        w2 = t["lokr_w2"] if "lokr_w2" in t else t["lokr_w2_a"] @ t["lokr_w2_b"]
        low = "lokr_w2_b" if "lokr_w2_b" in t else "lokr_w1_b" if "lokr_w1_b" in t else None
        scale = float(t["alpha"]) / t[low].shape[0] if low else 1.0
        if len(shape) == 4:
            w2 = w2.reshape(w2.shape[0], -1, *shape[2:]) if w2.dim() == 2 else w2
            w1 = w1[:, :, None, None]
        d = torch.kron(w1, w2) * scale
    else:
        up, down = t["lora_up.weight"], t["lora_down.weight"]
        d = (up.reshape(up.shape[0], -1) @ down.reshape(down.shape[0], -1)) * (float(t["alpha"]) / down.shape[0])
    d = d.reshape(shape)
    if "dora_scale" in t:  # W' = m * (W + dW) / ||W + dW|| per output channel
        merged = w + d
        norm = merged.reshape(shape[0], -1).norm(dim=1).reshape(-1, *([1] * (len(shape) - 1)))
        d = t["dora_scale"].reshape(norm.shape) * merged / norm - w
    return d


def _unet_out(model, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    cfg = model.unet.config
    x = torch.randn(1, cfg.in_channels, 8, 8, generator=g)
    ctx = torch.randn(1, 4, cfg.cross_attention_dim, generator=g)
    kw = {}
    if model.family.is_sdxl:
        kw["added_cond_kwargs"] = {"text_embeds": torch.randn(1, 32, generator=g), "time_ids": torch.randn(1, 6, generator=g)}
    with torch.no_grad():
        return model.unet(x, torch.tensor([500]), ctx, **kw).sample


@pytest.fixture(scope="module")
def trained(tiny_files, tmp_path_factory):
    from loratrain.training.demo import make_concept_images

    root = tmp_path_factory.mktemp("lyco")
    make_concept_images(root / "data" / "3_circle", "circle", 4, 64, 0)
    out = {}
    for kind, extra in (("loha", ["--conv_dim", "2", "--conv_alpha", "1"]), ("lokr", []), ("dora", []), ("ia3", [])):
        args = ["train", "--pretrained_model_name_or_path", str(tiny_files["sd1_file"]), "--train_data_dir", str(root / "data"),
                "--output_dir", str(root / kind), "--output_name", kind, "--resolution", "64", "--network_module", kind,
                "--network_dim", "4", "--network_alpha", "2", "--learning_rate", "1e-2", "--max_train_steps", "3",
                "--train_batch_size", "2", "--save_precision", "float", *extra]
        assert main(args) == 0
        out[kind] = root / kind / f"{kind}.safetensors"
    return out


@pytest.mark.parametrize("kind", ["loha", "lokr", "dora", "ia3"])
def test_the_file_is_lycoris_layout_and_its_formula_is_the_trained_effect(tiny_files, trained, kind):
    path = trained[kind]
    sd, meta = load_file(str(path)), read_safetensors_metadata(path)
    marker = {"loha": ".hada_w1_a", "lokr": ".lokr_w1", "dora": ".dora_scale", "ia3": ".on_input"}[kind]
    assert any(k.endswith(marker) for k in sd) and all(k.startswith(("lora_unet_", "lora_te_")) for k in sd)
    assert meta["ss_network_module"] == "lycoris.kohya"
    assert json.loads(meta["ss_network_args"]).get("algo" if kind != "dora" else "dora_wd") == (kind if kind != "dora" else "True")
    if kind == "loha":
        assert any(k.startswith("lora_unet_down_blocks_") and "_resnets_" in k for k in sd)  # conv_dim reached the 3x3 convolutions
    # the network, loaded from the file, changes the UNet output exactly as W + formula dW does
    model = load_model(tiny_files["sd1_file"])
    base_out = _unet_out(model)
    names = module_kohya_names(model)
    net = build_network(kind, model, NetworkSpec(network_dim=4, network_alpha=2.0, conv_dim=2 if kind == "loha" else None,
                                                 conv_alpha=1.0 if kind == "loha" else None))
    net.load_kohya(sd, str(path))
    with_net = _unet_out(model)
    assert (with_net - base_out).abs().max() > 1e-5  # the training moved something
    plain = load_model(tiny_files["sd1_file"])
    pnames = module_kohya_names(plain)
    modules = {k.split(".")[0] for k in sd}
    with torch.no_grad():
        for name in modules:
            if name.startswith("lora_unet_"):
                w = pnames[name].weight
                w += formula_delta(sd, name, w)
    assert torch.allclose(_unet_out(plain), with_net, atol=1e-5), (_unet_out(plain) - with_net).abs().max()
    del names


@pytest.mark.parametrize("kind", ["loha", "lokr", "dora", "ia3"])
def test_bake_and_generation_apply_the_formula(tiny_files, trained, tmp_path, kind):
    path = trained[kind]
    sd = load_file(str(path))
    out = tmp_path / "baked.safetensors"
    assert main(["lora", "bake", str(tiny_files["sd1_file"]), "--output", str(out), "--loras", f"{path}:0.5"]) == 0
    baked, base = load_model(out), load_model(tiny_files["sd1_file"])
    bnames, names = module_kohya_names(baked), module_kohya_names(base)
    checked = 0
    for name in {k.split(".")[0] for k in sd}:
        if name in names:
            w = names[name].weight
            expected = w + 0.5 * formula_delta(sd, name, w) if kind != "dora" else None
            if expected is None:  # DoRA is not linear in its ratio: bake applies ratio * (W' - W)
                expected = w + 0.5 * formula_delta(sd, name, w)
            assert torch.allclose(bnames[name].weight, expected, atol=1e-5), name
            checked += 1
    assert checked == len({k.split(".")[0] for k in sd})
    # generation patches the same weights in memory; weight 0 is the model itself
    patcher = WeightPatcher()
    patcher.apply(base, [LoraUse(str(path), 0.5)])
    for name in {k.split(".")[0] for k in sd}:
        assert torch.allclose(names[name].weight, bnames[name].weight, atol=1e-5)
    original = load_model(tiny_files["sd1_file"])
    onames = module_kohya_names(original)
    patcher.apply(base, [LoraUse(str(path), 0.0)])
    assert all(torch.equal(names[n].weight, onames[n].weight) for n in {k.split(".")[0] for k in sd})


def test_hand_made_ia3_full_and_tucker_loha_files_bake_by_their_formulas(tiny_files, tmp_path):
    base = load_model(tiny_files["sd1_file"])
    names = module_kohya_names(base)
    lin = next(n for n in names if n.startswith("lora_unet_") and n.endswith("attn1_to_q"))
    conv = next(n for n in names if n.startswith("lora_unet_down_blocks") and n.endswith("conv1"))
    g = torch.Generator().manual_seed(0)
    w_lin, w_conv = names[lin].weight.detach().clone(), names[conv].weight.detach().clone()
    out_c, in_c, kh, kw = w_conv.shape
    r = 2
    files = {
        "ia3": {f"{lin}.weight": torch.randn(w_lin.shape[0], generator=g), f"{lin}.on_input": torch.tensor(False)},
        "full": {f"{lin}.diff": torch.randn(*w_lin.shape, generator=g) * 0.1},
        "tucker": {f"{conv}.hada_w1_a": torch.randn(r, out_c, generator=g), f"{conv}.hada_w1_b": torch.randn(r, in_c, generator=g),
                   f"{conv}.hada_t1": torch.randn(r, r, kh, kw, generator=g), f"{conv}.hada_w2_a": torch.randn(r, out_c, generator=g),
                   f"{conv}.hada_w2_b": torch.randn(r, in_c, generator=g), f"{conv}.hada_t2": torch.randn(r, r, kh, kw, generator=g),
                   f"{conv}.alpha": torch.tensor(1.0)},
    }
    expected = {
        "ia3": (lin, w_lin * (1 + files["ia3"][f"{lin}.weight"][:, None])),
        "full": (lin, w_lin + files["full"][f"{lin}.diff"]),
    }
    t = files["tucker"]

    def rebuild(core, a, b):  # w[p, q, k, l] = sum_ij core[i, j, k, l] * a[i, p] * b[j, q]
        return torch.einsum("ijkl,ip,jq->pqkl", core, a, b)

    expected["tucker"] = (conv, w_conv + rebuild(t[f"{conv}.hada_t1"], t[f"{conv}.hada_w1_a"], t[f"{conv}.hada_w1_b"])
                          * rebuild(t[f"{conv}.hada_t2"], t[f"{conv}.hada_w2_a"], t[f"{conv}.hada_w2_b"]) * (1.0 / r))
    for kind, tensors in files.items():
        path = tmp_path / f"{kind}.safetensors"
        save_file(tensors, str(path))
        out = tmp_path / f"{kind}_baked.safetensors"
        assert main(["lora", "bake", str(tiny_files["sd1_file"]), "--output", str(out), "--loras", str(path)]) == 0
        name, want = expected[kind]
        got = module_kohya_names(load_model(out))[name].weight
        assert torch.allclose(got, want, atol=1e-4), kind
    # merging into a LoRA needs shapes a LyCORIS file does not hold: a clear message, nothing written
    assert main(["lora", "merge", "--loras", str(tmp_path / "full.safetensors"), "--output", str(tmp_path / "m.safetensors")]) != 0
    assert not (tmp_path / "m.safetensors").exists()


def test_lycoris_spellings_of_sd_scripts_users(tiny_files, tmp_path):
    from loratrain.training.config import TrainConfig

    cfg = TrainConfig.build({"network_module": "lycoris.kohya", "network_args": ["algo=lokr", "conv_dim=2", "conv_alpha=1"]})
    assert cfg.network_module == "lokr" and cfg.conv_dim == 2
    assert TrainConfig.build({"network_module": "networks.lora", "network_args": ["dora_wd=True"]}).network_module == "dora"
    from loratrain.core.errors import ConfigError

    with pytest.raises(ConfigError, match="algo=glora"):
        TrainConfig.build({"network_module": "lycoris.kohya", "network_args": ["algo=glora"]})
    assert TrainConfig.build({"network_module": "lycoris.kohya", "network_args": ["algo=ia3"]}).network_module == "ia3"


def test_the_lycoris_network_args_the_kohya_gui_writes_are_accepted():
    """The GUI writes every LyCORIS switch, algo last (lora_gui.py); the values that are what we do pass, others are named."""
    from loratrain.core.errors import ConfigError
    from loratrain.training.config import TrainConfig

    gui = ("preset=full conv_dim=4 conv_alpha=1 use_tucker=False rank_dropout=0 bypass_mode=False dora_wd=True "
           "module_dropout=0 use_tucker=False use_scalar=False rank_dropout_scale=False algo=locon train_norm=False").split()
    cfg = TrainConfig.build({"network_module": "lycoris.kohya", "network_args": gui})
    assert (cfg.network_module, cfg.conv_dim) == ("dora", 4)  # dora_wd before algo still makes a DoRA LoCon
    assert any("preset=full" in note for note in cfg.notes)  # accepted, and what differs is named
    lokr = ["factor=-1", "decompose_both=False", "use_cp=False", "algo=lokr"]
    assert TrainConfig.build({"network_module": "lycoris.kohya", "network_args": lokr}).network_module == "lokr"
    with pytest.raises(ConfigError, match="factor=8"):
        TrainConfig.build({"network_module": "lycoris.kohya", "network_args": ["factor=8", "algo=lokr"]})
    with pytest.raises(ConfigError, match="train_on_input=False"):
        TrainConfig.build({"network_module": "lycoris.kohya", "network_args": ["train_on_input=False", "algo=ia3"]})


def test_generate_and_grid_apply_lycoris_files(tiny_files, trained, tmp_path):
    """diffusers' loader reads no LoHa: generation patches the weights itself; weight 0 is the plain model's image."""
    import numpy as np
    from PIL import Image

    common = ["generate", "--model", str(tiny_files["sd1_file"]), "--prompt", "a circle", "--width", "64", "--height", "64",
              "--steps", "2", "--seed", "1"]
    assert main([*common, "--output", str(tmp_path / "plain.png")]) == 0
    assert main([*common, "--network_weights", f"{trained['loha']}:0", "--output", str(tmp_path / "zero.png")]) == 0
    assert main([*common, "--network_weights", f"{trained['loha']}:1", "--output", str(tmp_path / "one.png")]) == 0
    plain, zero, one = (np.asarray(Image.open(tmp_path / f"{n}.png")).astype(int) for n in ("plain", "zero", "one"))
    assert np.array_equal(plain, zero)
    assert np.abs(one - plain).max() > 0


def test_lora_resize_fixed_and_dynamic(tmp_path):
    from loratrain.core.lora.files import read_lora

    g = torch.Generator().manual_seed(0)
    sv = torch.tensor([8.0, 4.0, 2.0, 1.0, 0.5, 0.25])
    q1, _ = torch.linalg.qr(torch.randn(40, 6, generator=g))
    q2, _ = torch.linalg.qr(torch.randn(30, 6, generator=g))
    up, down = (q1 * sv).contiguous(), q2.T.contiguous()  # up @ down has exactly these singular values
    conv_down, conv_up = torch.randn(6, 8, 3, 3, generator=g), torch.randn(16, 6, 1, 1, generator=g)
    src = tmp_path / "r6.safetensors"
    save_file({"lora_unet_a.lora_up.weight": up, "lora_unet_a.lora_down.weight": down, "lora_unet_a.alpha": torch.tensor(3.0),
               "lora_unet_c.lora_up.weight": conv_up, "lora_unet_c.lora_down.weight": conv_down,
               "lora_unet_c.alpha": torch.tensor(6.0)}, str(src))
    original, _ = read_lora(src)
    out = tmp_path / "r2.safetensors"
    assert main(["lora", "resize", str(src), "--output", str(out), "--new_rank", "2", "--save_precision", "float"]) == 0
    got, meta = read_lora(out)
    assert got["lora_unet_a"].rank == 2 and got["lora_unet_a"].scale == pytest.approx(0.5)  # alpha/rank scale kept
    best = (q1[:, :2] * sv[:2]) @ q2.T[:2] * 0.5  # the best rank-2 approximation (Eckart-Young), scaled
    assert torch.allclose(got["lora_unet_a"].delta((40, 30)), best, atol=1e-5)
    shape = (16, 8, 3, 3)
    full, cut = original["lora_unet_c"].delta(shape), got["lora_unet_c"].delta(shape)
    s = torch.linalg.svdvals(full.reshape(16, -1))
    assert torch.allclose((full - cut).reshape(16, -1).norm(), s[2:].norm(), atol=1e-4)  # error = the dropped values
    assert json.loads(meta["loratrain.resize"])["new_rank"] == 2
    # dynamic: sv_ratio 5 keeps 8, 4, 2 (>= 8/5); sv_fro 0.99 needs 3 (0.992), sv_cumulative 0.9 needs 4 (0.952)
    for method, param, want in (("sv_ratio", 5, 3), ("sv_fro", 0.99, 3), ("sv_cumulative", 0.9, 4), ("sv_cumulative", 0.5, 1)):
        dyn = tmp_path / f"{method}{param}.safetensors"
        assert main(["lora", "resize", str(src), "--output", str(dyn), "--new_rank", "6", "--dynamic_method", method,
                     "--dynamic_param", str(param)]) == 0
        assert read_lora(dyn)[0]["lora_unet_a"].rank == want, (method, param)
    assert main(["lora", "resize", str(src), "--output", str(tmp_path / "x.safetensors"), "--dynamic_method", "sv_fro"]) != 0


def test_dylora_trains_every_rank_and_its_cut_is_the_first_components(tiny_files, trained, tmp_path):
    from loratrain.core.lora.files import read_lora

    data = trained["loha"].parent.parent / "data"
    out = tmp_path / "dy"
    assert main(["train", "--pretrained_model_name_or_path", str(tiny_files["sd1_file"]), "--train_data_dir", str(data),
                 "--output_dir", str(out), "--output_name", "dy", "--resolution", "64", "--network_module", "networks.dylora",
                 "--network_args", "unit=2", "--network_dim", "8", "--network_alpha", "4", "--learning_rate", "1e-2",
                 "--max_train_steps", "6", "--train_batch_size", "2", "--save_precision", "float", "--network_train_unet_only"]) == 0
    path = out / "dy.safetensors"
    meta = read_safetensors_metadata(path)
    assert meta["ss_network_module"] == "networks.dylora" and json.loads(meta["ss_network_args"])["unit"] == "2"
    sd = load_file(str(path))
    ups = [v for k, v in sd.items() if k.endswith("lora_up.weight")]
    for block in range(4):  # every rank step was trained somewhere (lora_up starts at zero)
        assert any(u[:, 2 * block:2 * block + 2].abs().sum() > 0 for u in ups), block
    cut = tmp_path / "dy4.safetensors"
    assert main(["lora", "resize", str(path), "--output", str(cut), "--dylora_rank", "4", "--save_precision", "float"]) == 0
    full, small = read_lora(path)[0], read_lora(cut)[0]
    for name, m in small.items():
        assert m.rank == 4 and torch.equal(m.down, full[name].down[:4]) and torch.equal(m.up, full[name].up[:, :4])
        assert m.alpha == full[name].alpha  # alpha kept: the rank-4 LoRA was trained at alpha/4
    assert main(["lora", "resize", str(path), "--output", str(tmp_path / "x.safetensors"), "--dylora_rank", "3"]) != 0
    # the network evaluated at rank 4 changes the UNet exactly as the cut file does
    model = load_model(tiny_files["sd1_file"])
    net = build_network("dylora", model, NetworkSpec(network_dim=8, network_alpha=4.0, unit=2, train_text_encoder=False))
    net.load_kohya(sd, str(path))
    net.forced_rank = 4
    with_net = _unet_out(model)
    plain = load_model(tiny_files["sd1_file"])
    names = module_kohya_names(plain)
    cut_sd = load_file(str(cut))
    with torch.no_grad():
        for name in small:
            w = names[name].weight
            w += formula_delta(cut_sd, name, w)
    assert torch.allclose(_unet_out(plain), with_net, atol=1e-5)


def test_lora_merge_takes_lycoris_files_with_the_base_model(tiny_files, trained, tmp_path):
    """LoHa + DoRA merged into one LoRA by SVD: at full rank the merged LoRA is exactly the sum of their formulas."""
    from loratrain.core.lora.files import read_lora

    loha, dora = trained["loha"], trained["dora"]
    out = tmp_path / "merged.safetensors"
    assert main(["lora", "merge", "--loras", f"{loha}:0.7", f"{dora}:0.5", "--output", str(out)]) != 0  # no --model
    assert not out.exists()
    assert main(["lora", "merge", "--loras", f"{loha}:0.7", f"{dora}:0.5", "--model", str(tiny_files["sd1_file"]), "--mode", "svd",
                 "--new_rank", "512", "--clamp_quantile", "1", "--save_precision", "float", "--output", str(out)]) == 0
    merged, _ = read_lora(out)
    base = load_model(tiny_files["sd1_file"])
    names = module_kohya_names(base)
    a, b = load_file(str(loha)), load_file(str(dora))
    checked = 0
    for name, m in merged.items():
        if not name.startswith("lora_unet_"):
            continue
        w = names[name].weight
        want = torch.zeros_like(w)
        if any(k.startswith(name + ".") for k in a):
            want += 0.7 * formula_delta(a, name, w)
        if any(k.startswith(name + ".") for k in b):
            want += 0.5 * formula_delta(b, name, w)
        assert torch.allclose(m.delta(tuple(w.shape)), want, atol=1e-4), name
        checked += 1
    assert checked > 20


def test_convert_ia3_to_a_lora_is_its_formula_to_the_svd_truncation(tiny_files, trained, tmp_path, capsys):
    """`lora convert-ia3`: at full rank the LoRA's dW is the (IA)^3 file's W * w (and bakes the same); at rank r the
    error is what the truncated SVD drops; a file of another kind is refused by name, nothing written."""
    from loratrain.core.lora.files import LoraModule, read_lora

    ia3, base_file = trained["ia3"], tiny_files["sd1_file"]
    sd = load_file(str(ia3))
    names = module_kohya_names(load_model(base_file))
    full, low = tmp_path / "full.safetensors", tmp_path / "low.safetensors"
    common = ["lora", "convert-ia3", "--model", str(base_file), "--lora", str(ia3), "--save_precision", "float"]
    assert main([*common, "--rank", "4096", "--output", str(full)]) == 0
    assert main([*common, "--rank", "2", "--output", str(low)]) == 0
    converted, low_rank = read_lora(full)[0], read_lora(low)[0]
    assert set(converted) == {k.split(".")[0] for k in sd} and all(isinstance(m, LoraModule) for m in converted.values())
    for name, m in converted.items():
        w = names[name].weight.detach()
        want = formula_delta(sd, name, w)
        assert torch.allclose(m.delta(tuple(w.shape)), want, atol=1e-5), name
        s = torch.linalg.svdvals(want.reshape(want.shape[0], -1).double())
        dropped = float(s[2:].square().sum().sqrt())
        got = float((low_rank[name].delta(tuple(w.shape)) - want).double().norm())
        assert got == pytest.approx(dropped, rel=1e-3, abs=1e-6), name
    baked = {}
    for name, path in (("ia3", ia3), ("lora", full)):
        baked[name] = tmp_path / f"baked_{name}.safetensors"
        assert main(["lora", "bake", str(base_file), "--output", str(baked[name]), "--loras", str(path),
                     "--save_precision", "float"]) == 0
    a, b = load_file(str(baked["ia3"])), load_file(str(baked["lora"]))
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-5
    capsys.readouterr()
    refused = tmp_path / "refused.safetensors"
    assert main(["lora", "convert-ia3", "--model", str(base_file), "--lora", str(trained["loha"]), "--output", str(refused)]) != 0
    assert "is not an (IA)^3 file" in capsys.readouterr().err and not refused.exists()
