"""A hostile user's mistakes (issue 21), each through the CLI's `main`: exit 2, one error line per problem naming the
option (or file) and what is wrong, no traceback (an exception escaping `main` fails the test just as a traceback
would show), nothing written - and every check made from config values and file headers, before any model loads."""
from __future__ import annotations

import json
import signal
from pathlib import Path

import pytest
import torch
from PIL import Image

from loratrain.cli import main
from loratrain.core.lora.keys import lora_sites
from loratrain.core.models.families import FAMILIES
from loratrain.core.safe_io import save_safetensors
from loratrain.core.tensor_io import LazySafetensors


@pytest.fixture(autouse=True)
def keep_sigint():
    handler = signal.getsignal(signal.SIGINT)  # main installs its Ctrl-C handler
    yield
    signal.signal(signal.SIGINT, handler)


@pytest.fixture(scope="module")
def loras(tiny_files, tmp_path_factory) -> dict[str, Path]:
    """A plain LoRA (no metadata) for each family: three text-encoder modules of rank 2."""
    root = tmp_path_factory.mktemp("loras")
    out = {}
    for family in ("sd1", "sdxl"):
        with LazySafetensors(tiny_files[f"{family}_file"]) as f:
            sites = lora_sites({k: v.shape for k, v in f.tensors.items()}, FAMILIES[family], f.metadata)
        g = torch.Generator().manual_seed(0)
        sd = {}
        for name in [n for n, s in sites.items() if len(s.shape) == 2][:3]:
            rows, cols = sites[name].shape
            sd[f"{name}.lora_down.weight"] = torch.randn(2, cols, generator=g) * 0.1
            sd[f"{name}.lora_up.weight"] = torch.randn(rows, 2, generator=g) * 0.1
            sd[f"{name}.alpha"] = torch.tensor(1.0)
        out[family] = root / f"{family}_lora.safetensors"
        save_safetensors(sd, out[family])
    return out


@pytest.fixture
def train(tiny_files, dataset, tmp_path) -> list[str]:
    return ["--pretrained_model_name_or_path", str(tiny_files["sd1_file"]), "--train_data_dir", str(dataset), "--resolution", "64",
            "--output_dir", str(tmp_path / "out"), "--output_name", "t", "--max_train_steps", "1"]


def refused(capsys, args: list, *expected: str) -> str:
    """Run the CLI, which must refuse with exit 2 and error lines holding every expected text; the errors."""
    code = main([str(a) for a in args])
    err = capsys.readouterr().err
    assert code == 2, err[-2000:]
    assert "Traceback" not in err, err[-2000:]
    assert err.strip() and all(line.startswith("error:") for line in err.strip().splitlines()), err[-2000:]
    for text in expected:
        assert text in err, (text, err[-2000:])
    return err


def gui_json(path: Path, tiny_files, dataset, out: Path, **changes) -> Path:
    data = {"LoRA_type": "Standard", "pretrained_model_name_or_path": str(tiny_files["sd1_file"]), "train_data_dir": str(dataset),
            "max_resolution": "64,64", "output_dir": str(out), "output_name": "gui", "lr_scheduler": "cosine", "max_train_steps": 1,
            "optimizer": "AdamW", "learning_rate": 0.001, "network_dim": 4, "network_alpha": 2, **changes}
    path.write_text(json.dumps(data), encoding="utf-8")
    return path


def test_optimizer_and_scheduler_args_are_tried_on_a_stand_in(capsys, train, tmp_path):
    refused(capsys, ["train", *train, "--optimizer_args", "betas=(0.9,"], "optimizer_args", "betas=(0.9,", "AdamW",
            "passed as text")
    refused(capsys, ["train", *train, "--optimizer_args", "weight_decay=0.1", "bogus=1"], "optimizer_args",
            "AdamW takes no argument 'bogus'")
    refused(capsys, ["train", *train, "--optimizer_args", "nodefault"], "optimizer_args", "'nodefault' is not key=value")
    refused(capsys, ["train", *train, "--lr_scheduler_type", "StepLR", "--lr_scheduler_args", "step_size=abc"],
            "lr_scheduler_args", "step_size=abc")
    refused(capsys, ["train", *train, "--lr_scheduler_type", "StepLR", "--lr_scheduler_args", "step_size=3", "gamma_x=1"],
            "lr_scheduler_args", "gamma_x")
    assert not (tmp_path / "out").exists()
    # what works is not refused: known keywords, and Adafactor's own lr (relative_step) as sd-scripts runs it
    from loratrain.training.config import TrainConfig

    for kw in ({"optimizer_args": ["weight_decay=0.1", "betas=(0.9,0.99)"]},
               {"optimizer_type": "Adafactor", "optimizer_args": ["relative_step=True"], "lr_scheduler": "adafactor"},
               {"lr_scheduler_type": "StepLR", "lr_scheduler_args": ["step_size=3", "gamma=0.5"]}):
        TrainConfig(pretrained_model_name_or_path=train[1], train_data_dir=train[3], output_dir=str(tmp_path / "ok"), **kw).check()


def test_reduce_lr_on_plateau_is_refused(capsys, train, tmp_path):
    refused(capsys, ["train", *train, "--lr_scheduler_type", "ReduceLROnPlateau"], "lr_scheduler_type", "ReduceLROnPlateau",
            "metric")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("warmup", ["ten", [10], -5])
def test_gui_lr_warmup_that_is_no_percentage(capsys, tiny_files, dataset, tmp_path, warmup):
    path = gui_json(tmp_path / "gui.json", tiny_files, dataset, tmp_path / "out", lr_warmup=warmup)
    refused(capsys, ["train", "--config_file", path], "lr_warmup:", str(path), "percent")
    assert not (tmp_path / "out").exists()


def test_infinite_or_nan_floats_are_refused(capsys, train, tmp_path):
    refused(capsys, ["train", *train, "--learning_rate", "inf", "--unet_lr", "nan", "--text_encoder_lr", "1e-4", "inf",
                     "--noise_offset", "inf"],
            "learning_rate: inf", "unet_lr: nan", "text_encoder_lr.1: inf", "noise_offset: inf", "finite")
    refused(capsys, ["train", *train, "--network_args", "conv_dim=4", "conv_alpha=inf"], "conv_alpha", "finite")
    assert not (tmp_path / "out").exists()


def test_network_args_switches_take_true_or_false_words(capsys, train, tmp_path):
    refused(capsys, ["train", *train, "--network_args", "dora_wd=maybe", "enable_conv=perhaps"], "network_args",
            "dora_wd=maybe: a switch", "enable_conv=perhaps: a switch")
    assert not (tmp_path / "out").exists()
    from loratrain.training.config import TrainConfig

    assert TrainConfig.build({"network_args": ["dora_wd=YES"]}, check=False).network_module == "dora"
    assert TrainConfig.build({"network_args": ["dora_wd=No"]}, check=False).network_module == "lora"
    assert TrainConfig.build({"network_module": "oft", "network_args": ["enable_conv=1"]}, check=False).enable_conv is True


def test_block_lr_weights_need_one_value_per_block(capsys, train, tiny_files, tmp_path):
    refused(capsys, ["train", *train, "--down_lr_weight", "1,1,1", "--mid_lr_weight", "1,1"],
            "down_lr_weight: 3 values; give 12 (SDXL: 9)", "mid_lr_weight: 2 values; give 1 (SDXL: 3)")
    err = refused(capsys, ["train", *train, "--up_lr_weight", ",".join(["1"] * 9)],
                  "up_lr_weight: 9 values; the model is SD1/SD2: give 12")
    assert err.count("error:") == 1
    sdxl = [a if a != str(tiny_files["sd1_file"]) else str(tiny_files["sdxl_file"]) for a in train]
    refused(capsys, ["train", *sdxl, "--down_lr_weight", ",".join(["1"] * 12), "--mid_lr_weight", "1"],
            "down_lr_weight: 12 values; the model is SDXL: give 9", "mid_lr_weight: 1 values; the model is SDXL: give 3")
    assert not (tmp_path / "out").exists()
    from loratrain.training.networks.blocks import BlockSpec, lr_weights

    with pytest.raises(ValueError, match="down_lr_weight"):  # the loop itself never pads or cuts a list either
        lr_weights(BlockSpec(down_lr_weight="1,1,1"), False)


def test_dylora_cut_of_a_plain_lora_is_refused(capsys, loras, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    refused(capsys, ["lora", "resize", loras["sd1"], "--output", out / "cut.safetensors", "--dylora_rank", "1"],
            "dylora_rank", "is not a DyLoRA", "--new_rank")
    assert not list(out.iterdir())


@pytest.mark.parametrize("mode", ["svd", "concat"])
def test_merging_loras_of_two_families_is_refused(capsys, loras, tmp_path, mode):
    out = tmp_path / "out"
    out.mkdir()
    refused(capsys, ["lora", "merge", "--loras", loras["sd1"], loras["sdxl"], "--mode", mode, "--output", out / "m.safetensors"],
            "loras", f"{loras['sd1']} is an SD1/SD2 LoRA and {loras['sdxl']} an SDXL LoRA")
    assert not list(out.iterdir())


def test_junk_in_the_reg_folder_is_no_class_image(tmp_path):
    from loratrain.training.dreambooth import count_class_images

    reg = tmp_path / "reg"
    (reg / "1_dog").mkdir(parents=True)
    (reg / "notes").mkdir()
    for name in ("a.png", "b.jpg"):
        (reg / "1_dog" / name).write_text("not an image", encoding="utf-8")
    (reg / "1_dog" / "c.webp").touch()
    (reg / "1_dog" / "a.txt").write_text("a dog", encoding="utf-8")
    Image.new("RGB", (8, 8)).save(reg / "1_dog" / "ok.png")
    Image.new("RGB", (8, 8)).save(reg / "notes" / "x.png")  # not a <repeats>_<class> folder: training never reads it
    Image.new("RGB", (8, 8)).save(reg / "stray.png")
    assert count_class_images(reg) == 1
    assert count_class_images(tmp_path / "none") == 0


def test_ema_options_without_use_ema_are_refused(capsys, train, tmp_path):
    refused(capsys, ["finetune", *train, "--ema_decay", "0.99", "--ema_on_cpu"], "ema_decay", "ema_on_cpu", "--use_ema")
    refused(capsys, ["dreambooth", *train, "--ema_on_cpu"], "ema_on_cpu", "--use_ema")
    assert not (tmp_path / "out").exists()


def test_gui_json_problems_name_the_gui_keys(capsys, tiny_files, dataset, tmp_path):
    path = gui_json(tmp_path / "gui.json", tiny_files, dataset, tmp_path / "out", optimizer="adamq", max_resolution="63")
    err = refused(capsys, ["train", "--config_file", path], "optimizer: unknown optimizer 'adamq'", "max_resolution: '63'",
                  str(path))
    assert "optimizer_type" not in err and "error: resolution" not in err
    path = gui_json(tmp_path / "loha.json", tiny_files, dataset, tmp_path / "out", LoRA_type="LyCORIS/LoHa", down_lr_weight="sine",
                    lora_network_weights=str(tmp_path / "missing.safetensors"))
    err = refused(capsys, ["train", "--config_file", path], "not for LoRA_type 'LyCORIS/LoHa'", "lora_network_weights: not found")
    assert "network_module" not in err and "network_weights:" not in err.replace("lora_network_weights:", "")
    path = gui_json(tmp_path / "dora.json", tiny_files, dataset, tmp_path / "out", dora_wd="maybe")
    refused(capsys, ["train", "--config_file", path], "dora_wd: dora_wd=maybe: a switch")
    assert not (tmp_path / "out").exists()


def test_a_lora_of_the_other_family_is_named_as_such(capsys, train, loras, tmp_path):
    refused(capsys, ["train", *train, "--network_weights", loras["sdxl"]],
            f"network_weights: {loras['sdxl']} is an SDXL LoRA; the model is SD1")
    refused(capsys, ["train", *train, "--base_weights", loras["sdxl"]], f"base_weights: {loras['sdxl']} is an SDXL LoRA; the model")
    assert not (tmp_path / "out").exists()


def test_a_lora_weight_that_is_no_number_is_named(capsys, train, loras, tmp_path):
    err = refused(capsys, ["train", *train, "--base_weights", f"{loras['sd1']}:abc"], "base_weights", "the weight 'abc'",
                  "is not a number")
    assert "not found" not in err
    out = tmp_path / "m"
    out.mkdir()
    refused(capsys, ["lora", "merge", "--loras", f"{loras['sd1']}:abc", loras["sd1"], "--output", out / "m.safetensors"],
            "loras", "the weight 'abc'")
    assert not (tmp_path / "out").exists() and not list(out.iterdir())


def _state(folder: Path) -> Path:
    """A training state folder as saving.save_state writes it (network, optimizer, train_state.json with sizes)."""
    folder.mkdir(parents=True)
    save_safetensors({"w": torch.zeros(2)}, folder / "network.safetensors")
    torch.save({"optimizer": {"state": {}, "param_groups": []}, "scheduler": {}}, folder / "optimizer.pt")
    sizes = {n: (folder / n).stat().st_size for n in ("network.safetensors", "optimizer.pt")}
    (folder / "train_state.json").write_text(json.dumps({"global_step": 1, "epoch": 0, "micro": 1, "files": sizes}))
    return folder


def test_a_tampered_resume_state_is_named_corrupt(capsys, train, tmp_path):
    grown = _state(tmp_path / "grown")
    with open(grown / "optimizer.pt", "ab") as fh:
        fh.write(b"x")
    err = refused(capsys, ["train", *train, "--resume", grown], f"resume: {grown / 'optimizer.pt'}: corrupt")
    assert "interrupted" not in err
    zeroed = _state(tmp_path / "zeroed")
    data = bytearray((zeroed / "optimizer.pt").read_bytes())
    data[:64] = bytes(64)  # same size, unreadable
    (zeroed / "optimizer.pt").write_bytes(bytes(data))
    refused(capsys, ["train", *train, "--resume", zeroed], f"{zeroed / 'optimizer.pt'}: corrupt or unreadable")
    broken = _state(tmp_path / "broken")
    (broken / "train_state.json").write_text('{"global', encoding="utf-8")
    refused(capsys, ["train", *train, "--resume", broken], f"{broken / 'train_state.json'}: corrupt or unreadable")
    assert not (tmp_path / "out").exists()
