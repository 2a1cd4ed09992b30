"""Review of training/: each network kind listed once, a dataset TOML's paths kept inside an app job's workspace,
the simple mode's kinds and the health line's validation part."""
from __future__ import annotations

import os

import pytest

from loratrain.core.errors import ConfigError
from loratrain.core.paths import confined
from loratrain.training.config import TrainConfig
from loratrain.training.data.subsets import DatasetError, specs_from_toml
from loratrain.training.health import health_line
from loratrain.training.kohya import lycoris_algos
from loratrain.training.networks import NETWORKS, network_kinds
from loratrain.training.simple import KINDS, PRESETS, simple_plan


def test_each_network_kind_is_listed_once_under_its_own_name():
    kinds = network_kinds()
    assert len({k.name for k in kinds}) == len(kinds)
    assert {k.name for k in kinds} == {NETWORKS.get(n).name for n in NETWORKS.names()}
    assert lycoris_algos() == {"lora": "lora", "locon": "locon", "loha": "loha", "lokr": "lokr", "dylora": "dylora",
                               "ia3": "ia3"}


def test_an_option_of_another_kind_is_named_once():
    cfg = TrainConfig.build({"network_module": "networks.lora", "oft_layout": "sd-scripts"}, check=False)
    assert [p for p in cfg.problems() if p[0] == "oft_layout"] == [
        ("oft_layout", "an option of network_module oft only, not of lora")]


def test_a_missing_mask_folder_is_a_requirement(tmp_path):
    cfg = TrainConfig.build({"conditioning_data_dir": str(tmp_path / "nope")}, check=False)
    assert ("conditioning_data_dir", f"not found: {tmp_path / 'nope'}") in cfg.requirements()


def _toml(tmp_path, subset: str) -> str:
    path = tmp_path / "ws" / "d.toml"
    path.write_text(f"[[datasets]]\n[[datasets.subsets]]\n{subset}\n", encoding="utf-8")
    return str(path)


@pytest.fixture
def workspace(tmp_path):
    (tmp_path / "ws" / "img").mkdir(parents=True)
    (tmp_path / "outside").mkdir()
    os.symlink(tmp_path / "outside", tmp_path / "ws" / "link")
    return tmp_path


@pytest.mark.parametrize("subset", ['image_dir = "../outside"', 'image_dir = "{out}"', 'image_dir = "link"',
                                    'image_dir = "img"\nconditioning_data_dir = "{out}"',
                                    'image_dir = "img"\nconditioning_data_dir = "link"'])
def test_a_dataset_toml_cannot_reach_out_of_the_workspace(workspace, subset):
    toml = _toml(workspace, subset.format(out=workspace / "outside"))
    with confined([workspace / "ws"]), pytest.raises(DatasetError, match="outside the workspace"):
        specs_from_toml(toml, {})


def test_a_dataset_toml_inside_the_workspace_reads(workspace):
    toml = _toml(workspace, 'image_dir = "img"\ntrigger_word = " sks "')
    with confined([workspace / "ws"]):
        (spec,) = specs_from_toml(toml, {})
    assert spec.subsets[0].trigger_word == "sks" and spec.subsets[0].image_dir == str((workspace / "ws" / "img").resolve())


def test_the_simple_kinds_are_the_presets():
    assert KINDS == tuple(PRESETS) == ("character", "style", "concept")
    plan = simple_plan("style", 40, "sks", free_gpu_bytes=None)
    assert plan.values["train_batch_size"] == 1 and plan.values["network_alpha"] == PRESETS["style"]["network_dim"] / 2
    with pytest.raises(KeyError):
        simple_plan("portrait", 40, "sks")


def test_the_health_line_names_the_best_validation_step():
    losses = [1.0 - i / 100 for i in range(40)]
    line = health_line(losses, [(10, 0.5), (20, 0.4), (30, 0.6)])
    assert "validation diverging" in line and "(step 20)" in line
    assert "validation 0.5 -> 0.45 (best 0.45)" in health_line(losses, [(10, 0.5), (20, 0.45)])
    assert "validation" not in health_line(losses, [(10, 0.5)])


def test_a_wrong_trigger_word_is_a_config_error():
    with pytest.raises(ConfigError, match="trigger_word"):
        TrainConfig.build({"trigger_word": "a\nb"}, check=False)
