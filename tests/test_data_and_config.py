"""Dataset conventions, the sd-scripts step formula, buckets, captions, config parsing."""
from __future__ import annotations

import importlib.util
import random
import re
import subprocess
import sys

import pytest
from PIL import Image

from loratrain.core.errors import ConfigError
from loratrain.training.config import TrainConfig
from loratrain.training.data.buckets import bucket_resolutions, select_bucket
from loratrain.training.data.captions import process_caption
from loratrain.training.data.dataset import TrainData
from loratrain.training.data.subsets import DatasetError, DatasetSpec, Subset, specs_from_toml, subsets_from_folders
from loratrain.training.optim import OPTIMIZERS, create_optimizer, create_scheduler


def _images(folder, n, size=(8, 8)):
    folder.mkdir(parents=True)
    for i in range(n):
        Image.new("RGB", size).save(folder / f"{i:04d}.png")


def test_reference_worked_example_gives_1500_steps(tmp_path):
    """docs/lora-training.md#total-steps: 15 images x 20 repeats, 200 reg images, batch 2, grad-accum 2, 10 epochs -> 1500 steps."""
    _images(tmp_path / "img" / "20_sks dog", 15)
    _images(tmp_path / "reg" / "1_dog", 200)
    subsets = subsets_from_folders(str(tmp_path / "img"), str(tmp_path / "reg"), {})
    assert subsets[0].class_tokens == "sks dog" and subsets[0].num_repeats == 20
    data = TrainData([DatasetSpec(subsets=subsets, resolution=(512, 512), batch_size=2)], log=lambda s: None)
    plan = data.plan(grad_accum=2, max_train_steps=None, max_train_epochs=10)
    assert (plan.train_samples, plan.reg_samples, plan.batches_per_epoch, plan.steps_per_epoch, plan.max_train_steps) == (300, 300, 300, 150, 1500)
    reg_repeats = sorted(it.repeats for it in data.items() if it.subset.is_reg)
    assert reg_repeats.count(2) == 100 and reg_repeats.count(1) == 100
    assert "1500 optimizer steps" in plan.describe([2])


def test_missing_captions_are_listed_and_fall_back_to_class_tokens(tmp_path):
    _images(tmp_path / "img" / "2_my_char", 3)
    (tmp_path / "img" / "2_my_char" / "0000.txt").write_text("1girl, smile", encoding="utf-8")
    logs = []
    data = TrainData([DatasetSpec(subsets=subsets_from_folders(str(tmp_path / "img"), None, {}), resolution=(512, 512), batch_size=1)], log=logs.append)
    assert sorted(it.caption for it in data.items()) == ["1girl, smile", "my_char", "my_char"]
    assert "2 image(s) have no caption file" in logs[0] and "0001.png" in logs[0] and "0002.png" in logs[0]


def test_folders_without_repeats_are_ignored_and_empty_fails(tmp_path):
    _images(tmp_path / "img" / "notes", 1)
    with pytest.raises(DatasetError, match="no training folders"):
        subsets_from_folders(str(tmp_path / "img"), None, {})


def test_dataset_toml_levels_and_unknown_keys(tmp_path):
    _images(tmp_path / "a", 2)
    toml = tmp_path / "ds.toml"
    toml.write_text('[general]\nshuffle_caption = true\ncaption_extension = ".caption"\n[[datasets]]\nresolution = [512, 768]\n'
                    'batch_size = 4\n[[datasets.subsets]]\nimage_dir = "a"\nnum_repeats = 3\nkeep_tokens = 1\n'
                    '[[datasets.subsets]]\nimage_dir = "a"\nis_reg = true\ncaption_extension = ".txt"\n', encoding="utf-8")
    (spec,) = specs_from_toml(toml, {})
    assert spec.resolution == (512, 768) and spec.batch_size == 4
    a, reg = spec.subsets
    assert (a.num_repeats, a.keep_tokens, a.shuffle_caption, a.caption_extension) == (3, 1, True, ".caption")
    assert reg.is_reg and reg.caption_extension == ".txt"
    toml.write_text('[[datasets]]\n[[datasets.subsets]]\nimage_dir = "a"\nbogus = 1\n', encoding="utf-8")
    with pytest.raises(DatasetError, match="bogus"):
        specs_from_toml(toml, {})


def test_data_options_are_declared_once_and_a_dataset_toml_is_checked_by_the_same_declarations(tmp_path):
    """A folder's options come from one declaration: the command line's value reaches every folder, a dataset TOML
    overrides it per folder, and a TOML value is checked as strictly as the flag (type and range, named)."""
    from loratrain.training.options.data import DatasetOptions, SubsetOptions
    from loratrain.training.trainer import build_specs

    for name, field in {**SubsetOptions.model_fields, **DatasetOptions.model_fields}.items():
        assert TrainConfig.model_fields[name].default == field.default  # the same field, not a copy
    _images(tmp_path / "img" / "2_dot", 2)
    cfg = TrainConfig(pretrained_model_name_or_path="m", train_data_dir=str(tmp_path / "img"), flip_aug=True, keep_tokens=2,
                      min_bucket_reso=128, enable_bucket=True)
    (spec,) = build_specs(cfg)
    assert spec.subsets[0].flip_aug and spec.subsets[0].keep_tokens == 2 and spec.min_bucket_reso == 128
    toml = tmp_path / "ds.toml"
    toml.write_text('[[datasets]]\n[[datasets.subsets]]\nimage_dir = "img/2_dot"\nflip_aug = false\n', encoding="utf-8")
    (spec,) = build_specs(cfg.replace(train_data_dir="", dataset_config=str(toml)))
    assert not spec.subsets[0].flip_aug and spec.subsets[0].keep_tokens == 2  # the table wins; the rest from the flags
    for bad, named in (('keep_tokens = -1', "keep_tokens = -1"), ('flip_aug = "sometimes"', "flip_aug = 'sometimes'"),
                       ('caption_extension = "../x.txt"', "caption_extension")):
        toml.write_text(f'[[datasets]]\n[[datasets.subsets]]\nimage_dir = "img/2_dot"\n{bad}\n', encoding="utf-8")
        with pytest.raises(DatasetError, match=f"ds.toml: datasets\\[0\\].subsets\\[0\\]: {re.escape(named)}"):
            specs_from_toml(toml, {})
    toml.write_text('[[datasets]]\nbucket_reso_steps = 12\n[[datasets.subsets]]\nimage_dir = "img/2_dot"\n', encoding="utf-8")
    with pytest.raises(DatasetError, match=r"datasets\[0\]: bucket_reso_steps = 12: 12 must be a multiple of 8"):
        specs_from_toml(toml, {})


def test_a_network_kind_is_declared_in_one_place(tmp_path):
    """A kind registered from one file is a network_module choice, a LyCORIS algo= spelling, its file's ss_network_module,
    and the options it refuses or alone reads are checked: nothing else lists it."""
    from loratrain.training.kohya import lycoris_algos
    from loratrain.training.metadata import _metadata_module
    from loratrain.training.networks import NETWORKS
    from loratrain.training.networks.base import NetworkKind, register

    saved = dict(NETWORKS._items), dict(NETWORKS._display)
    try:
        register(NetworkKind("probe", NETWORKS.get("lora").build, metadata_module="networks.probe", lycoris_algo="probe",
                             own_options=("max_token_length",), refuses={"flip_aug": "a probe cannot flip"}), "networks.probe")
        cfg = TrainConfig.build({"pretrained_model_name_or_path": "m", "train_data_dir": "d", "network_module": "lycoris.kohya",
                                 "network_args": ["algo=probe"]}, check=False)
        assert cfg.network_module == "probe" and cfg.network_kind == "probe" and lycoris_algos()["probe"] == "probe"
        assert _metadata_module(cfg.network_kind) == "networks.probe"
        with pytest.raises(ConfigError, match="flip_aug: not with network_module probe: a probe cannot flip"):
            cfg.replace(flip_aug=True)
        assert cfg.replace(max_token_length=150).max_token_length == 150
        with pytest.raises(ConfigError, match="max_token_length: an option of network_module probe only, not of lora"):
            cfg.replace(network_module="lora", max_token_length=150)
        assert TrainConfig.build({"network_module": "networks.probe", "pretrained_model_name_or_path": "m"}, check=False).network_kind == "probe"
    finally:
        NETWORKS._items, NETWORKS._display = saved
    assert "probe" not in NETWORKS


def test_buckets_follow_sd_scripts():
    resos = bucket_resolutions((512, 512), 256, 1024, 64)
    assert (512, 512) in resos and (384, 640) in resos and (640, 384) in resos
    assert all(w * h <= 512 * 512 and w % 64 == 0 and h % 64 == 0 for w, h in resos)
    assert select_bucket((1000, 600), resos)[0] > select_bucket((1000, 600), resos)[1]


def test_caption_processing_keeps_tokens_and_shuffles():
    sub = Subset(image_dir=".", keep_tokens=1, shuffle_caption=True)
    rng = random.Random(0)
    outs = {process_caption("sks, a, b, c, d", sub, rng) for _ in range(20)}
    assert all(o.startswith("sks, ") for o in outs) and len(outs) > 1
    assert process_caption("x, y", Subset(image_dir=".", caption_dropout_rate=1.0), rng) == ""


def test_config_toml_then_flags_override(tmp_path):
    toml = tmp_path / "cfg.toml"
    toml.write_text('[model]\npretrained_model_name_or_path = "m.safetensors"\n[network]\nnetwork_dim = 16\nnetwork_alpha = 8\n', encoding="utf-8")
    from loratrain.cli import build_parser

    args = build_parser().parse_args(["train", "--config_file", str(toml), "--network_alpha", "4", "--no-flip_aug"])
    cfg = TrainConfig.from_args(args)
    assert (cfg.network_dim, cfg.network_alpha, cfg.pretrained_model_name_or_path) == (16, 4.0, "m.safetensors")
    toml.write_text("netwrk_dim = 3\n", encoding="utf-8")
    with pytest.raises(ConfigError, match="netwrk_dim"):
        TrainConfig.from_toml(toml)
    with pytest.raises(ConfigError, match="exclude each other"):
        TrainConfig(network_train_unet_only=True, network_train_text_encoder_only=True).check(ready=False)


def test_optimizer_and_scheduler_registries():
    import came_pytorch
    import dadaptation
    import lion_pytorch
    import prodigyopt
    import schedulefree
    import torch
    from dadaptation.experimental import DAdaptAdamPreprint
    from transformers.optimization import Adafactor

    expected = {"AdamW": torch.optim.AdamW, "Lion": lion_pytorch.Lion, "Prodigy": prodigyopt.Prodigy,
                "DAdaptAdam": dadaptation.DAdaptAdam, "Adafactor": Adafactor, "SGD": torch.optim.SGD,
                "SGDNesterov": torch.optim.SGD, "DAdaptation": DAdaptAdamPreprint, "DAdaptLion": dadaptation.DAdaptLion,
                "AdamWScheduleFree": schedulefree.AdamWScheduleFree, "RAdamScheduleFree": schedulefree.RAdamScheduleFree,
                "CAME": came_pytorch.CAME}
    for name, cls in expected.items():
        p = torch.nn.Parameter(torch.zeros(2, 2))
        opt = create_optimizer(name, [{"params": [p]}], 1e-2, [])
        assert type(opt) is cls, name
        if hasattr(opt, "train"):
            opt.train()  # schedule-free optimizers step only in train mode (the trainer switches them)
        for _ in range(6):  # RAdam's rectified steps move nothing for the first few (by design)
            p.grad = torch.ones(2, 2)
            opt.step()
        assert not torch.equal(p.detach(), torch.zeros(2, 2)), f"{name} did not move the parameter"
    nesterov = create_optimizer("SGDNesterov", [{"params": [torch.nn.Parameter(torch.zeros(1))]}], 1.0, [])
    assert nesterov.defaults["nesterov"] and nesterov.defaults["momentum"] == 0.9
    from unittest import mock

    real_find = importlib.util.find_spec
    for present in (False, True):  # the hint depends on the package alone, whether or not this machine has it
        def fake(name, *a, p=present):
            return (object() if p else None) if name == "bitsandbytes" else real_find(name, *a)

        with mock.patch("importlib.util.find_spec", fake):
            hint = OPTIMIZERS.get("PagedAdamW8bit").missing()
        assert (hint is None) if present else ("pip install bitsandbytes" in hint), hint
    p = [torch.nn.Parameter(torch.zeros(2))]
    with pytest.raises(KeyError, match="choose one of"):
        create_optimizer("adamq", [{"params": p}], 1.0, [])
    opt = torch.optim.SGD(p, lr=1.0)
    sched = create_scheduler("cosine_with_restarts", opt, 100, 0.1, num_cycles=2)
    lrs = []
    for _ in range(100):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    # diffusers' (and sd-scripts') warmup: step / warmup, so 0 at the first step and 1.0 after 10 (ratio 0.1)
    assert lrs[0] == 0.0 and lrs[1] == pytest.approx(0.1) and lrs[10] == pytest.approx(1.0)
    assert lrs[54] < 0.05 and lrs[56] > 0.95  # the restart half way through the decay


def test_cli_help_lists_sd_scripts_flags():
    out = subprocess.run([sys.executable, "-m", "loratrain", "train", "--help"], capture_output=True, text=True, timeout=120).stdout
    for flag in ("--network_dim", "--network_alpha", "--noise_offset", "--multires_noise_iterations", "--min_snr_gamma",
                 "--lr_scheduler_num_cycles", "--conv_dim", "--resume", "--dataset_config"):
        assert flag in out


def test_schema_declares_every_option_once_for_flags_files_and_forms(tmp_path):
    schema = TrainConfig.model_json_schema()
    groups = set()
    for name, prop in schema["properties"].items():
        assert prop.get("description") and prop.get("group") and "advanced" in prop, name
        groups.add(prop["group"])
    assert {"Model", "Dataset", "Network", "Optimizer and schedule", "Noise and loss", "Saving and resume", "Sampling"} <= groups
    assert schema["properties"]["optimizer_type"]["registry"].endswith(":OPTIMIZERS")
    assert schema["properties"]["network_dim"]["minimum"] == 1
    cfg = TrainConfig(network_dim=16, resolution="768,512", optimizer_args=["weight_decay=0.1"], conv_dim=None)
    text = cfg.to_toml()
    assert text.startswith("schema_version = 1\n") and "conv_dim" not in text  # TOML has no null: unset stays unset
    saved = tmp_path / "saved.toml"
    saved.write_text(text, encoding="utf-8")
    assert TrainConfig.from_toml(saved, check=False) == cfg
    saved.write_text("schema_version = 99\nnetwork_dim = 4\n", encoding="utf-8")
    with pytest.raises(ConfigError, match="schema_version 99 is newer"):
        TrainConfig.from_toml(saved)
    with pytest.raises(ConfigError) as err:  # every field error at once, each named
        TrainConfig(network_dim=0, clip_skip=0, resolution="36", mixed_precision="fp8")
    assert {f for f, _ in err.value.problems} == {"network_dim", "clip_skip", "resolution", "mixed_precision"}


def test_the_other_sd_scripts_schedules():
    import torch

    def lrs(name, total=100, warmup=0.0, **kw):
        opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
        sched = create_scheduler(name, opt, total, warmup, **kw)
        out = []
        for _ in range(total):
            out.append(opt.param_groups[0]["lr"])
            opt.step()
            sched.step()
        return out

    assert lrs("cosine_with_min_lr", min_lr_ratio=0.1)[-1] == pytest.approx(0.1, abs=0.01)
    wsd = lrs("warmup_stable_decay", warmup=10, decay=0.2, min_lr_ratio=0.0)
    assert wsd[5] == pytest.approx(0.5) and wsd[50] == pytest.approx(1.0) and wsd[79] == pytest.approx(1.0) and wsd[-1] < 0.01
    inv = lrs("inverse_sqrt", warmup=0, timescale=25)
    assert inv[0] == pytest.approx(1.0) and inv[75] == pytest.approx((25 / (75 + 25)) ** 0.5, rel=1e-3)
    piece = lrs("piecewise_constant", args=["step_rules=1:10,0.5:30,0.1"])
    assert piece[5] == 1.0 and piece[20] == 0.5 and piece[50] == pytest.approx(0.1)
    with pytest.raises(ConfigError, match="step_rules"):
        TrainConfig(lr_scheduler="piecewise_constant").check(ready=False)
    with pytest.raises(ConfigError, match="lr_decay_steps"):
        TrainConfig(lr_scheduler="warmup_stable_decay").check(ready=False)


@pytest.mark.parametrize("text, named", [
    ('general = 5\n[[datasets]]\n[[datasets.subsets]]\nimage_dir = "a"\n', "general must be a table"),
    ('datasets = 5\n', "datasets must be an array of tables"),
    ('datasets = [5]\n', "datasets must be an array of tables"),
    ('[datasets]\nresolution = 64\n', "datasets must be an array of tables"),
    ('[[datasets]]\nsubsets = "abc"\n', r"datasets\[0\].subsets must be an array of tables"),
    ('[[datasets]]\n[datasets.subsets]\nimage_dir = "a"\n', r"datasets\[0\].subsets must be an array of tables"),
    ('[[datasets]]\n[[datasets.subsets]]\nimage_dir = 5\n', r"subsets\[0\]: image_dir = 5: must be a path"),
    ('[[datasets]]\n[[datasets.subsets]]\nimage_dir = ["a"]\n', r"subsets\[0\]: image_dir = \['a'\]: must be a path"),
    ('[[datasets]]\n[[datasets.subsets]]\nimage_dir = ""\n', r"subsets\[0\]: image_dir = '': must be a path"),
    ('[[datasets]]\n[[datasets.subsets]]\nimage_dir = "a"\nconditioning_data_dir = true\n', "conditioning_data_dir = True"),
    ('[[datasets]]\nresolution = inf\n[[datasets.subsets]]\nimage_dir = "a"\n', "resolution inf must be N or W,H"),
    ('[[datasets]]\n[[datasets.subsets]]\nimage_dir = "a"\nnum_repeats = 0\n', "num_repeats = 0: Input should be greater"),
    ('[[datasets]]\n[[datasets.subsets]]\nimage_dir = "a"\nnum_repeats = -5\n', "num_repeats = -5"),
    ('[[datasets]]\nbatch_size = 0\n[[datasets.subsets]]\nimage_dir = "a"\n', r"datasets\[0\]: batch_size = 0"),
    ('[[datasets]]\nenable_bucket = true\nmin_bucket_reso = 512\nmax_bucket_reso = 256\n[[datasets.subsets]]\nimage_dir = "a"\n',
     "min_bucket_reso = 512: min_bucket_reso is above max_bucket_reso"),
    ('[[datasets]]\n[[datasets.subsets]]\nimage_dir = "a"\ntrigger_word = "sks, dog"\n', "trigger_word = 'sks, dog'.*caption_separator"),
    ('[[datasets]]\n[[datasets.subsets]]\nimage_dir = "a"\ntrigger_word = "   "\n', "trigger_word = '   ': is only spaces"),
    ('[[datasets]]\n[[datasets.subsets]]\nimage_dir = "a"\ntrigger_word = "sks\\ndog"\n', "must be one line"),
    ('[[datasets]]\n[[datasets.subsets]]\nimage_dir = "a"\ncaption_separator = ""\n', "caption_separator = '': must not be empty"),
])
def test_a_dataset_toml_of_the_wrong_shape_or_value_is_named_not_a_crash(tmp_path, text, named):
    """Hostile or careless dataset TOMLs: a table where an array of tables belongs, a number where a path belongs, 0
    repeats or batch 0 (a division by zero, or a 0-step LoRA, before), rules between values the command line also
    applies: each a DatasetError naming the file and key, never a TypeError or AttributeError from deep inside."""
    _images(tmp_path / "a", 1)
    toml = tmp_path / "ds.toml"
    toml.write_text(text, encoding="utf-8")
    with pytest.raises(DatasetError, match=named):
        specs_from_toml(toml, {})


def test_a_dataset_toml_error_ends_the_cli_with_one_line_before_any_model_loads(tmp_path, capsys):
    from loratrain.cli import main

    _images(tmp_path / "a", 1)
    toml = tmp_path / "ds.toml"
    toml.write_text('[[datasets]]\nbatch_size = 0\n[[datasets.subsets]]\nimage_dir = "a"\n', encoding="utf-8")
    model = tmp_path / "m.safetensors"
    model.write_bytes(b"not read: the dataset is checked first")
    code = main(["train", "--pretrained_model_name_or_path", str(model), "--dataset_config", str(toml),
                 "--output_dir", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err and "batch_size = 0" in err


@pytest.mark.parametrize("value, why", [("sks, dog", "caption_separator"), ("  ", "only spaces"), ("sks\ndog", "one line"),
                                        ("a|||b", "keep_tokens_separator")])
def test_a_trigger_word_is_one_tag(value, why):
    """The trigger goes first in every caption as one tag: one holding the separator would be split and doubled
    (with_trigger('a, b, c', 'a, b') gave 'a, b, a, b, c'), a newline would make a caption line of its own."""
    with pytest.raises(ConfigError, match=why):
        TrainConfig.build({"pretrained_model_name_or_path": "m", "train_data_dir": "d", "trigger_word": value,
                           "keep_tokens_separator": "|||"}, check=True)
    cfg = TrainConfig.build({"pretrained_model_name_or_path": "m", "train_data_dir": "d", "trigger_word": " sks "}, check=False)
    assert cfg.trigger_word == "sks"  # spaces around it are no part of the tag


def test_a_repeat_count_that_would_fill_memory_is_refused_naming_the_folder(tmp_path, monkeypatch):
    from loratrain.training.data import dataset as dataset_module

    _images(tmp_path / "img" / "99999999999_x", 2)
    with pytest.raises(DatasetError, match=r"99999999999_x: 99,999,999,999 repeats; at most 10,000"):
        subsets_from_folders(str(tmp_path / "img"), None, {})
    toml = tmp_path / "ds.toml"
    toml.write_text(f'[[datasets]]\n[[datasets.subsets]]\nimage_dir = "{tmp_path / "img" / "99999999999_x"}"\n'
                    'num_repeats = 9223372036854775807\n', encoding="utf-8")
    with pytest.raises(DatasetError, match="num_repeats"):
        specs_from_toml(toml, {})
    _images(tmp_path / "ok" / "500_y", 3)
    monkeypatch.setattr(dataset_module, "MAX_EPOCH_SAMPLES", 1000)
    with pytest.raises(DatasetError, match=r"one epoch would hold 1,500 samples .* largest repeat count is 500"):
        TrainData([DatasetSpec(subsets=subsets_from_folders(str(tmp_path / "ok"), None, {}), resolution=(512, 512),
                               batch_size=1)], log=lambda s: None)
