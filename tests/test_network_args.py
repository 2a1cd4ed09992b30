"""sd-scripts' networks.lora arguments: block_dims / block_alphas, down/mid/up_lr_weight, LoRA+, rank and module
dropout; given as options or as --network_args the way kohya users type them."""
from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from loratrain.core.progress import RecordingReporter, StopFlag
from loratrain.core.weights import read_safetensors_metadata
from loratrain.training.networks.blocks import BlockSpec, block_index, lr_weights
from loratrain.training.trainer import LoRATrainer, run_train

from .conftest import quick_config


def kohya_config(model, data, out, **kw):  # noqa: ANN001, ANN201
    """quick_config's run with sd-scripts keys (network_args ...) translated as from a TOML or the command line."""
    from loratrain.training.config import TrainConfig

    return TrainConfig.build({**quick_config(model, data, out).model_dump(exclude_none=True), **kw}, check=False)


def setup(tiny_files, dataset, tmp_path, fam="sd1", **kw) -> LoRATrainer:
    trainer = LoRATrainer(quick_config(tiny_files[f"{fam}_file"], dataset, tmp_path / "o", **kw), RecordingReporter(), StopFlag())
    trainer.setup()
    return trainer


def test_block_index_is_sd_scripts_numbering():
    assert block_index("lora_unet_down_blocks_0_attentions_1_proj_in", False) == 2  # IN02
    assert block_index("lora_unet_down_blocks_2_downsamplers_0_conv", False) == 9  # IN09
    assert block_index("lora_unet_mid_block_attentions_0_proj_in", False) == 12
    assert block_index("lora_unet_up_blocks_3_attentions_2_proj_out", False) == 13 + 11  # OUT11
    assert block_index("lora_unet_input_blocks_4_1_proj_in", True) == 5
    assert block_index("lora_unet_middle_block_1_proj_in", True) == 11
    assert block_index("lora_unet_output_blocks_8_0_conv1", True) == 21
    w = lr_weights(BlockSpec(down_lr_weight="linear", up_lr_weight="zeros+0.5", mid_lr_weight="2"), False)
    assert w[:12] == pytest.approx([i / 11 for i in range(12)]) and w[12] == 2.0 and w[13:] == [0.5] * 12


@pytest.mark.parametrize("fam", ["sd1", "sdxl"])
def test_block_dims_give_each_block_its_rank(tiny_files, dataset, tmp_path, fam):
    n = 23 if fam == "sdxl" else 25
    dims = [(i % 3) * 2 for i in range(n)]  # 0, 2, 4, 0, 2, 4 ...: rank 0 = no module in that block
    alphas = [float(i + 1) for i in range(n)]
    res = run_train(kohya_config(tiny_files[f"{fam}_file"], dataset, tmp_path / "o", max_train_steps=1, network_train_unet_only=True,
                                 network_args=[f"block_dims={','.join(map(str, dims))}",
                                               f"block_alphas={','.join(map(str, alphas))}"]), RecordingReporter())
    sd = load_file(res.lora_path)
    downs = {k.rsplit(".", 2)[0]: v for k, v in sd.items() if k.endswith("lora_down.weight")}
    seen = set()
    for name, down in downs.items():
        i = block_index(name, fam == "sdxl")
        seen.add(i)
        assert down.shape[0] == dims[i], name
        assert float(sd[f"{name}.alpha"]) == alphas[i]
    assert seen and all(dims[i] for i in seen)
    assert "block_dims" in read_safetensors_metadata(res.lora_path)["ss_network_args"]


def test_block_lr_weights_make_one_group_per_block_and_drop_zero_blocks(tiny_files, dataset, tmp_path):
    trainer = setup(tiny_files, dataset, tmp_path, unet_lr=1e-3, network_train_unet_only=True,
                    down_lr_weight="0,0,0,0,1,1,1,1,0.05,0.05,0.05,0.05", up_lr_weight="cosine", block_lr_zero_threshold=0.1)
    groups = {g["name"]: g["lr"] for g in trainer.optimizer.param_groups}
    blocks = {block_index(t.kohya_name, False) for t in trainer.network.targets}
    assert not blocks & {1, 2, 3, 9, 10, 11, 12 + 12}  # weight 0 or <= threshold: no module (cosine ends at 0 for OUT11)
    assert groups["unet_block4"] == pytest.approx(1e-3) and groups["unet_block12"] == pytest.approx(1e-3)  # mid: 1
    import math

    assert groups["unet_block16"] == pytest.approx(1e-3 * math.sin(math.pi / 2 * 8 / 11))  # OUT03 on the cosine ramp
    assert set(groups) == {f"unet_block{i}" for i in blocks}


def test_loraplus_moves_the_up_matrices_ratio_times_as_fast(tiny_files, dataset, tmp_path):
    def first_step_up(ratio):
        kw = dict(max_train_steps=1, optimizer_type="AdamW", optimizer_args=["weight_decay=0"], max_grad_norm=0)
        if ratio:
            kw["network_args"] = [f"loraplus_lr_ratio={ratio}"]
        res = run_train(kohya_config(tiny_files["sd1_file"], dataset, tmp_path / f"o{ratio}", **kw), RecordingReporter())
        sd = load_file(res.lora_path)
        return (torch.cat([v.flatten().abs() for k, v in sd.items() if "lora_up" in k]).mean(),
                torch.cat([v.flatten() for k, v in sd.items() if "lora_down" in k]))

    (up_plain, down_plain), (up_plus, down_plus) = first_step_up(None), first_step_up(4)
    assert float(up_plus / up_plain) == pytest.approx(4.0, rel=0.02)  # Adam's first step moves every weight by ~lr
    assert torch.allclose(down_plain, down_plus)  # down keeps the base lr


def test_rank_and_module_dropout_act_in_training_only(tiny_files, dataset, tmp_path):
    trainer = setup(tiny_files, dataset, tmp_path, rank_dropout=0.5, module_dropout=0.3)
    layer = next(layer for _, layer in trainer.network._pairs() if isinstance(layer.base_layer, torch.nn.Linear))
    with torch.no_grad():
        layer.lora_B["loratrain"].weight.normal_()
    x = torch.randn(2, 7, layer.in_features)
    layer.train()
    outs = [layer(x) for _ in range(8)]
    assert any(not torch.equal(outs[0], o) for o in outs[1:])
    base = layer.base_layer(x)
    assert any(torch.equal(o, base) for o in outs + [layer(x) for _ in range(30)])  # module dropout: adapter skipped
    layer.eval()  # the whole adapter, every rank, every time: W x + scale * B A x
    with torch.no_grad():
        full = base + layer.lora_B["loratrain"](layer.lora_A["loratrain"](x)) * layer.scaling["loratrain"]
    torch.testing.assert_close(layer(x), full)
    assert not torch.allclose(full, base)

    def train(out: str, **kw):  # noqa: ANN202
        return run_train(quick_config(tiny_files["sd1_file"], dataset, tmp_path / out, **kw), RecordingReporter())

    res, again = train("a", rank_dropout=0.5, module_dropout=0.3), train("b", rank_dropout=0.5, module_dropout=0.3)
    assert again.losses == res.losses  # seeded per micro-batch: repeatable (and resumable)
    assert train("c").losses[1:] != res.losses[1:]  # and it changes what is learned
    read_args = read_safetensors_metadata(res.lora_path)["ss_network_args"]
    assert '"rank_dropout": "0.5"' in read_args and '"module_dropout": "0.3"' in read_args


def test_lora_only_arguments_are_refused_for_other_kinds(tiny_files, dataset, tmp_path):
    from loratrain.core.errors import ConfigError

    with pytest.raises(ConfigError, match="networks.lora argument"):
        quick_config(tiny_files["sd1_file"], dataset, tmp_path / "o", network_module="loha", rank_dropout=0.1).check()
    with pytest.raises(ConfigError, match="block_dims.*24 values"):
        quick_config(tiny_files["sd1_file"], dataset, tmp_path / "o", block_dims=",".join(["4"] * 24)).check()
    with pytest.raises(ConfigError, match="down_lr_weight"):
        quick_config(tiny_files["sd1_file"], dataset, tmp_path / "o", down_lr_weight="wavy").check()


def test_dim_from_weights_takes_each_modules_rank_and_alpha_from_the_file(tiny_files, dataset, tmp_path):
    dims = ",".join(str((i % 3) + 1) for i in range(25))
    first = run_train(kohya_config(tiny_files["sd1_file"], dataset, tmp_path / "a", max_train_steps=1, network_module="locon",
                                   conv_dim=2, conv_alpha=1, network_args=[f"block_dims={dims}"]), RecordingReporter())
    src = load_file(first.lora_path)
    rec = RecordingReporter()
    second = run_train(kohya_config(tiny_files["sd1_file"], dataset, tmp_path / "b", max_train_steps=1, network_dim=8,
                                    network_weights=str(first.lora_path), dim_from_weights=True), rec)
    out = load_file(second.lora_path)
    assert set(out) == set(src) and all(out[k].shape == src[k].shape for k in src)  # same modules, same ranks
    assert all(float(out[k]) == float(src[k]) for k in src if k.endswith(".alpha"))
    assert any("dim_from_weights" in line for line in rec.lines)


def test_base_weights_are_merged_into_the_model_before_training(tiny_files, dataset, tmp_path):
    lora = run_train(quick_config(tiny_files["sd1_file"], dataset, tmp_path / "a", max_train_steps=2), RecordingReporter()).lora_path
    plain = setup(tiny_files, dataset, tmp_path / "p")
    merged = setup(tiny_files, dataset, tmp_path / "m", base_weights=[str(lora)], base_weights_multiplier=[0.5])
    sd = load_file(lora)
    name = next(k[: -len(".lora_down.weight")] for k in sd if k.endswith("attn1_to_q.lora_down.weight"))
    down, up, alpha = sd[f"{name}.lora_down.weight"], sd[f"{name}.lora_up.weight"], float(sd[f"{name}.alpha"])
    path = next(t.module_path for t in plain.network.targets if t.kohya_name == name)
    w0 = plain.model.unet.get_submodule(path).base_layer.weight
    w1 = merged.model.unet.get_submodule(path).base_layer.weight
    assert torch.allclose(w1 - w0, 0.5 * (up @ down) * alpha / down.shape[0], atol=1e-6)
