"""OFT (sd-scripts' networks.oft): trained through the CLI with sd-scripts' spelling, written as `oft_unet_*.oft_blocks`
with `alpha` (oft_layout sd-scripts) or, by default, in the layout ComfyUI loads (`lora_unet_*`, alpha the absolute cap,
blocks already inside it); the rotation the file implies (computed here from the paper's Cayley formula) is what the
trained network does, what `lora bake` writes and what generation applies."""
from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from loratrain.cli import main
from loratrain.core.lora.keys import module_kohya_names
from loratrain.core.models.loading import load_model
from loratrain.core.session import LoraUse, WeightPatcher
from loratrain.core.weights import read_safetensors_metadata
from loratrain.training.networks import NetworkSpec, build_network

from .test_lycoris import _unet_out


def rotated(blocks: torch.Tensor, alpha: float, w: torch.Tensor) -> torch.Tensor:
    """W' = R^T W per block of output rows; R = (I + Q)(I - Q)^-1, Q = B - B^T scaled so ||Q|| <= alpha * out."""
    k, n, _ = blocks.shape
    q = blocks.double() - blocks.double().transpose(1, 2)
    norm = torch.linalg.norm(q)
    limit = alpha * w.shape[0]
    if norm > limit:
        q = q * (limit / norm)
    eye = torch.eye(n, dtype=torch.float64)
    out = []
    for i in range(k):
        r = (eye + q[i]) @ torch.linalg.inv(eye - q[i])
        out.append(r.T @ w.double()[i * n:(i + 1) * n].reshape(n, -1))
    return torch.cat(out).reshape(w.shape).float()


@pytest.fixture(scope="module")
def trained(tiny_files, tmp_path_factory):
    from loratrain.training.demo import make_concept_images

    root = tmp_path_factory.mktemp("oft")
    make_concept_images(root / "data" / "3_circle", "circle", 4, 64, 0)
    assert main(["train", "--pretrained_model_name_or_path", str(tiny_files["sd1_file"]), "--train_data_dir", str(root / "data"),
                 "--output_dir", str(root / "o"), "--output_name", "oft", "--resolution", "64", "--network_module", "networks.oft",
                 "--network_dim", "4", "--network_alpha", "0.05", "--network_args", "enable_all_linear=True",
                 "--oft_layout", "sd-scripts", "--learning_rate", "1e-2", "--max_train_steps", "3", "--train_batch_size", "2", "--save_precision", "float"]) == 0
    return root / "o" / "oft.safetensors"


def test_the_file_is_sd_scripts_layout_and_its_rotation_is_the_trained_effect(tiny_files, trained):
    sd, meta = load_file(str(trained)), read_safetensors_metadata(trained)
    assert all(k.startswith("oft_unet_") and k.endswith((".oft_blocks", ".alpha")) for k in sd)
    assert any("_ff_net_" in k for k in sd)  # enable_all_linear reached the feed-forward layers
    assert meta["ss_network_module"] == "networks.oft" and meta["ss_network_dim"] == "4"
    model = load_model(tiny_files["sd1_file"])
    base_out = _unet_out(model)
    net = build_network("oft", model, NetworkSpec(network_dim=4, network_alpha=0.05, oft_all_linear=True))
    assert net.load_kohya(sd, str(trained)) == len(net.targets)
    with_net = _unet_out(model)
    assert (with_net - base_out).abs().max() > 1e-5
    plain = load_model(tiny_files["sd1_file"])
    names = module_kohya_names(plain)
    with torch.no_grad():
        for key in [k for k in sd if k.endswith(".oft_blocks")]:
            name = "lora_unet_" + key.split(".")[0].removeprefix("oft_unet_")
            w = names[name].weight
            w.copy_(rotated(sd[key], float(sd[key.replace("oft_blocks", "alpha")]), w))
    assert torch.allclose(_unet_out(plain), with_net, atol=1e-5), (_unet_out(plain) - with_net).abs().max()


def test_bake_and_generation_apply_the_rotation(tiny_files, trained, tmp_path):
    sd = load_file(str(trained))
    out = tmp_path / "baked.safetensors"
    assert main(["lora", "bake", str(tiny_files["sd1_file"]), "--output", str(out), "--loras", f"{trained}:0.5"]) == 0
    baked, base = load_model(out), load_model(tiny_files["sd1_file"])
    bnames, names = module_kohya_names(baked), module_kohya_names(base)
    modules = ["lora_unet_" + k.split(".")[0].removeprefix("oft_unet_") for k in sd if k.endswith(".oft_blocks")]
    for name in modules:
        w = names[name].weight
        key = "oft_unet_" + name.removeprefix("lora_unet_")
        full = rotated(sd[f"{key}.oft_blocks"], float(sd[f"{key}.alpha"]), w)
        assert torch.allclose(bnames[name].weight, w + 0.5 * (full - w), atol=1e-5), name  # weight w: w * dW
    patcher = WeightPatcher()
    patcher.apply(base, [LoraUse(str(trained), 0.5)])
    assert all(torch.allclose(names[n].weight, bnames[n].weight, atol=1e-5) for n in modules)
    patcher.apply(base, [LoraUse(str(trained), 0.0)])
    original = module_kohya_names(load_model(tiny_files["sd1_file"]))
    assert all(torch.equal(names[n].weight, original[n].weight) for n in modules)


def test_oft_resumes_exactly_and_refuses_what_it_does_not_do(tiny_files, tmp_path):
    from loratrain.core.errors import ConfigError
    from loratrain.core.progress import RecordingReporter, StopFlag
    from loratrain.training.demo import make_concept_images
    from loratrain.training.trainer import run_train

    from .conftest import quick_config

    make_concept_images(tmp_path / "d" / "2_dot", "dot", 4, 64, 0)

    def cfg(out, **kw):  # noqa: ANN001, ANN202
        return quick_config(tiny_files["sd1_file"], tmp_path / "d", tmp_path / out, network_module="oft", network_alpha=0.05,
                            max_train_steps=4, **kw)

    whole = run_train(cfg("whole"), RecordingReporter())
    stop = StopFlag()

    class StopAtTwo(RecordingReporter):
        def advance(self, n=1, **m):  # noqa: ANN001, ANN003, ANN202
            super().advance(n, **m)
            if m and self.step >= 2:
                stop.set()

    assert run_train(cfg("part"), StopAtTwo(), stop).global_step == 2
    resumed = run_train(cfg("part", resume="latest"), RecordingReporter())
    a, b = load_file(whole.lora_path), load_file(resumed.lora_path)
    assert all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(ConfigError, match="networks.lora argument"):
        cfg("x", rank_dropout=0.1).check()
    with pytest.raises(ConfigError, match="an option of network_module oft only"):
        quick_config(tiny_files["sd1_file"], tmp_path / "d", tmp_path / "y", enable_conv=True).check()


def comfyui_rule(blocks: torch.Tensor, alpha: float, w: torch.Tensor, strength: float) -> torch.Tensor:
    """ComfyUI's OFT adapter, in our words (comfy/weight_adapter/oft.py): alpha > 0 caps the norm of Q = B - B^T over
    all blocks at alpha itself (Q * alpha / (|Q| + 1e-8) when |Q| + 1e-8 > alpha), R = (I + Q)(I - Q)^-1, and the
    weight becomes W + s * ((s R - s I)^T W) per block of rows: strength s enters twice."""
    k, n, _ = blocks.shape
    q = blocks.double() - blocks.double().transpose(1, 2)
    norm = torch.linalg.norm(q) + 1e-8
    if alpha > 0 and norm > alpha:
        q = q * (alpha / norm)
    eye = torch.eye(n, dtype=torch.float64)
    r = (eye + q) @ torch.linalg.inv(eye - q)
    rows = w.double().reshape(k, n, -1)
    diff = torch.einsum("knm,knp->kmp", strength * r - strength * eye, rows).reshape(w.shape)
    return (w.double() + strength * diff).float()


@pytest.fixture(scope="module")
def both_layouts(tiny_files, tmp_path_factory):
    """The same run (a cap small enough to bind) saved in each layout."""
    from loratrain.training.demo import make_concept_images

    root = tmp_path_factory.mktemp("oft_layouts")
    make_concept_images(root / "data" / "3_circle", "circle", 4, 64, 0)
    out = {}
    for layout in ("comfyui", "sd-scripts"):
        args = ["train", "--pretrained_model_name_or_path", str(tiny_files["sd1_file"]), "--train_data_dir", str(root / "data"),
                "--output_dir", str(root / "o"), "--output_name", layout, "--resolution", "64", "--network_module", "oft",
                "--network_dim", "4", "--network_alpha", "1e-4", "--network_args", "enable_all_linear=True",
                "--learning_rate", "1e-2", "--max_train_steps", "3", "--train_batch_size", "2", "--save_precision", "float",
                "--seed", "5"]
        assert main(args if layout == "comfyui" else [*args, "--oft_layout", layout]) == 0  # comfyui is the default
        out[layout] = root / "o" / f"{layout}.safetensors"
    return out


def test_both_layouts_bake_the_same_and_the_default_is_what_comfyui_reads(tiny_files, both_layouts, tmp_path):
    from loratrain.core.lora.keys import lora_sites

    comfy, kohya = load_file(str(both_layouts["comfyui"])), load_file(str(both_layouts["sd-scripts"]))
    assert all(k.startswith("oft_unet_") for k in kohya)
    rest = {k.split(".")[0].removeprefix("oft_unet_") for k in kohya}
    assert {k.split(".")[0].removeprefix("lora_unet_") for k in comfy} == rest and all(k.startswith("lora_unet_") for k in comfy)
    # the cap binds in the raw blocks of this run (sd-scripts' alpha: per output channel), so its meaning matters
    caps = {r: float(kohya[f"oft_unet_{r}.alpha"]) * kohya[f"oft_unet_{r}.oft_blocks"].shape[0] * kohya[f"oft_unet_{r}.oft_blocks"].shape[1]
            for r in rest}
    q_norm = {r: float(torch.linalg.norm(b - b.transpose(1, 2))) for r in rest for b in [kohya[f"oft_unet_{r}.oft_blocks"].double()]}
    assert sum(q_norm[r] > caps[r] for r in rest) > len(rest) // 2
    baked = {}
    for layout, path in both_layouts.items():
        baked[layout] = tmp_path / f"{layout}.safetensors"
        assert main(["lora", "bake", str(tiny_files["sd1_file"]), "--output", str(baked[layout]), "--loras", str(path),
                     "--save_precision", "float"]) == 0
    a, b = load_file(str(baked["comfyui"])), load_file(str(baked["sd-scripts"]))
    base = load_file(str(tiny_files["sd1_file"]))
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-6
    assert max((a[k] - base[k]).abs().max().item() for k in a) > 1e-4  # the bakes did change the weights
    # ComfyUI's rule: `lora_unet_` + a checkpoint weight's path, 3-D oft_blocks [k, n, n] with k * n output channels,
    # alpha the absolute cap; applied by that rule, the file gives our bake (at strength 1; s enters twice there)
    sites = lora_sites({k: tuple(v.shape) for k, v in base.items()}, load_model(tiny_files["sd1_file"]).family,
                       read_safetensors_metadata(tiny_files["sd1_file"]))
    for r in rest:
        blocks, alpha = comfy[f"lora_unet_{r}.oft_blocks"], float(comfy[f"lora_unet_{r}.alpha"])
        site = sites[f"lora_unet_{r}"]
        assert blocks.dim() == 3 and blocks.shape[0] * blocks.shape[1] == site.shape[0] == blocks.shape[0] * blocks.shape[2]
        assert alpha == pytest.approx(1e-4 * site.shape[0], rel=1e-5)  # the cap (or a hair above: float rounding)
        w = base[site.key]
        assert torch.allclose(comfyui_rule(blocks, alpha, w, 1.0), a[site.key], atol=1e-6), r
        half = comfyui_rule(blocks, alpha, w, 0.5 ** 0.5)  # ComfyUI strength sqrt(w) is our weight w
        assert torch.allclose(half, w + 0.5 * (a[site.key] - w), atol=1e-6), r


def test_either_layout_loads_into_either_run(tiny_files, both_layouts):
    model = load_model(tiny_files["sd1_file"])
    for layout, path in both_layouts.items():
        for run_layout in ("comfyui", "sd-scripts"):
            net = build_network("oft", model, NetworkSpec(network_dim=4, network_alpha=1e-4, oft_all_linear=True,
                                                          oft_layout=run_layout))
            assert net.load_kohya(load_file(str(path)), str(path)) == len(net.targets), (layout, run_layout)
            saved = net.kohya_state_dict(torch.float32)
            assert all(k.startswith("lora_unet_" if run_layout == "comfyui" else "oft_unet_") for k in saved)
