"""The simple mode's trigger word, repeats, rank and batch choices, and the training health line."""
from __future__ import annotations

import hashlib
import math
from pathlib import Path

import pytest
from safetensors import safe_open

from loratrain.cli import main
from loratrain.training.config import TrainConfig
from loratrain.training.data.captions import with_trigger
from loratrain.training.demo import make_concept_images
from loratrain.training.health import health_line
from loratrain.training.simple import repeats_for, simple_plan, suggest_batch
from loratrain.ui.pages.train import simple_settings, step_plan


def _sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def test_the_trigger_goes_first_on_every_line_once():
    assert with_trigger("1girl, smile", "sks") == "sks, 1girl, smile"
    assert with_trigger("1girl, sks, smile", "sks") == "sks, 1girl, smile"  # moved, not doubled
    assert with_trigger("", "sks") == "sks"
    assert with_trigger("a, b\nsks, c", "sks") == "sks, a, b\nsks, c"  # each line of a multi-line caption


def test_repeats_rank_and_batch_follow_the_image_count_as_the_guides_say():
    assert repeats_for(20) == 7 and repeats_for(50) == 5  # the guides' figures
    assert repeats_for(5) > repeats_for(20) > repeats_for(50) > repeats_for(200) >= 1 and repeats_for(3) <= 10
    small, large = simple_plan("character", 12, "sks"), simple_plan("character", 60, "sks")
    assert small.values["network_dim"] == large.values["network_dim"] // 2  # a small set gets half the rank
    assert any("halved under 30 images" in r for r in small.reasons)
    assert suggest_batch(None) == (1, suggest_batch(None)[1]) and "no GPU" in suggest_batch(None)[1]
    for gib, batch in ((4, 1), (6.5, 2), (9, 4), (24, 8), (80, 8)):
        assert suggest_batch(int(gib * 2**30))[0] == batch, gib
    assert suggest_batch(12 * 2**30, "sdxl")[0] == 1 and suggest_batch(24 * 2**30, "sdxl")[0] == 2


def test_simple_mode_trains_with_the_trigger_first_in_every_caption(tmp_path, tiny_files):
    images = tmp_path / "pics"
    make_concept_images(images, "circle", 20, 64, 0)
    captions = sorted(images.glob("*.txt"))
    captions[0].write_text("circle, sks, red circle", encoding="utf-8")  # a caption that has it elsewhere
    captions[1].unlink()  # and an image without a caption
    values, reasons = simple_settings("character", str(tiny_files["sd1_file"]), str(images), "sks", "mine", tmp_path,
                                      free_bytes=9 * 2**30)
    assert values["train_batch_size"] == 4 and values["network_dim"] == 16
    assert "repeats 7 for 20 images" in "\n".join(reasons) and "9.0 GiB free" in "\n".join(reasons)
    toml = Path(values["dataset_config"]).read_text(encoding="utf-8")
    assert "num_repeats = 7" in toml and 'trigger_word = "sks"' in toml and "keep_tokens = 1" in toml
    cfg = TrainConfig.build({**values, "resolution": "64", "max_train_steps": 2, "train_batch_size": 2,
                             "save_every_n_steps": 0, "mixed_precision": "no"}, check=False)
    plan = step_plan(cfg)
    assert "Trigger word 'sks' first in every caption (keep_tokens 1 keeps it there)" in plan and "140 samples" in plan
    # train with the captions encoded once and kept on disk: the cache files name the captions the model saw
    toml_text = toml.replace("shuffle_caption = true", "shuffle_caption = false")
    Path(values["dataset_config"]).write_text(toml_text, encoding="utf-8")
    cached = cfg.replace(shuffle_caption=False, cache_text_encoder_outputs_to_disk=True, network_train_unet_only=True)
    code = main(["train", "--config_file", str(_toml(tmp_path, cached))])
    assert code == 0
    seen = set()  # one file per distinct caption, named after one of its images
    for path in (images / ".loratrain_cache").glob("*.te.safetensors"):
        with safe_open(str(path), framework="pt") as f:
            seen.add(f.metadata()["caption_sha256"])
    texts = {(image.with_suffix(".txt").read_text(encoding="utf-8") if image.with_suffix(".txt").exists() else "sks")
             for image in images.glob("*.png")}
    assert seen == {_sha(with_trigger(text, "sks")) for text in texts} and len(seen) > 2
    assert not seen & {_sha(text) for text in texts if text != "sks"}  # no caption reached the model without it
    assert _sha("sks, circle, red circle") in seen


def _toml(tmp_path: Path, cfg: TrainConfig) -> Path:
    path = tmp_path / "run.toml"
    path.write_text(cfg.to_toml(), encoding="utf-8")
    return path


def test_health_line_rules_of_thumb():
    falling = [1.0 - 0.5 * i / 99 for i in range(100)]
    assert "falling" in health_line(falling) and "-4" in health_line(falling)  # first 20 steps vs last 20: about -40%
    rising = [0.1 + 0.001 * i for i in range(100)]
    line = health_line(rising)
    assert line.startswith("training health (rule of thumb):") and "rising" in line and "learning rate is probably too high" in line
    flat = [0.1 + (0.001 if i % 2 else -0.001) for i in range(100)]
    assert "no clear fall" in health_line(flat) and "±2%" in health_line(flat)
    assert "too few" in health_line([0.1] * 5)
    assert "became nan at step 4" in health_line([0.1, 0.1, 0.1, math.nan])
    diverging = health_line(falling, [(10, 0.30), (20, 0.25), (30, 0.31)])
    assert "validation diverging" in diverging and "step 20" in diverging and "+24%" in diverging
    assert "validation 0.3 -> 0.2" in health_line(falling, [(10, 0.3), (20, 0.2)])


def test_a_cli_run_ends_with_the_health_line(tmp_path, tiny_files, dataset, capsys):
    code = main(["train", "--pretrained_model_name_or_path", str(tiny_files["sd1_file"]), "--train_data_dir", str(dataset),
                 "--resolution", "64", "--output_dir", str(tmp_path / "out"), "--max_train_steps", "3", "--network_dim", "2",
                 "--save_precision", "float"])
    assert code == 0
    out = capsys.readouterr()
    assert "training health (rule of thumb): 3 steps are too few to judge a trend" in out.out + out.err


@pytest.mark.parametrize("value", ["", "sks"])
def test_trigger_word_is_an_ordinary_option(value):
    cfg = TrainConfig.build({"pretrained_model_name_or_path": "m", "train_data_dir": "d", "trigger_word": value}, check=False)
    assert cfg.trigger_word == value


def test_simple_mode_refuses_an_empty_folder_and_a_trigger_that_is_no_tag_before_writing_anything(tmp_path):
    from loratrain.core.errors import ConfigError

    empty, images = tmp_path / "empty", tmp_path / "pics"
    empty.mkdir()
    make_concept_images(images, "circle", 3, 64, 0)
    model = tmp_path / "m.safetensors"
    with pytest.raises(ConfigError, match="no images"):
        simple_settings("character", str(model), str(empty), "sks", "a", tmp_path)
    for trigger, why in (("sks, dog", "caption_separator"), ("sks\ndog", "one line"), ("   ", "only spaces")):
        with pytest.raises(ConfigError, match=why):
            simple_settings("character", str(model), str(images), trigger, "b", tmp_path)
    assert not (tmp_path / "output").exists()  # no dataset TOML was written for any of them
    values, _ = simple_settings("character", str(model), str(images), "sks", "c", tmp_path)
    assert values["trigger_word"] == "sks"


def test_the_trigger_stays_ahead_of_a_caption_prefix():
    import random

    from loratrain.training.data.captions import process_caption
    from loratrain.training.data.subsets import Subset

    sub = Subset(image_dir="x", trigger_word="sks", caption_prefix="photo,", keep_tokens=1, shuffle_caption=True)
    for seed in range(5):
        assert process_caption("sks, dog, grass", sub, random.Random(seed)).startswith("sks, ")


def test_the_training_page_names_the_models_family_from_its_header(tmp_path):
    """The line above the training form (ui/pages/train.model_family): FLUX.1, SD3 or SD, read from headers inside
    the workspace; a path outside it is refused, a missing one says nothing."""
    import torch
    from safetensors.torch import save_file

    from loratrain.core.models.flux import FLUX_TINY, FluxTransformer
    from loratrain.core.models.sd3 import SD35_TINY, SD3Transformer
    from loratrain.ui.config import AppContext
    from loratrain.ui.pages.train import model_family
    from loratrain.ui.workspace import Workspace

    ctx = AppContext(workspace=Workspace([tmp_path]), runner=None)
    save_file({"model.diffusion_model." + k: v.contiguous() for k, v in FluxTransformer(FLUX_TINY).state_dict().items()},
              tmp_path / "flux.safetensors")
    save_file({"model.diffusion_model." + k: v.contiguous() for k, v in SD3Transformer(SD35_TINY).state_dict().items()},
              tmp_path / "sd3.safetensors")
    save_file({"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(4, 4, 3, 3),
               "cond_stage_model.transformer.text_model.final_layer_norm.weight": torch.zeros(4)}, tmp_path / "sd.safetensors")
    save_file({"lora_unet_x.lora_down.weight": torch.zeros(1, 1)}, tmp_path / "lora.safetensors")
    (tmp_path / "notes.txt").write_text("hello")
    assert model_family(ctx, str(tmp_path / "flux.safetensors"))[0] == "flux"
    kind, text = model_family(ctx, str(tmp_path / "sd3.safetensors"))
    assert kind == "sd3" and "clip_g" in text
    assert model_family(ctx, str(tmp_path / "sd.safetensors")) == ("sd", "**sd.safetensors: an SD1 model** (the "
                                                                  "FLUX.1 and SD3.5 groups do not apply).")
    kind, text = model_family(ctx, str(tmp_path / "lora.safetensors"))
    assert kind == "" and "a LoRA file, not a base checkpoint" in text
    assert model_family(ctx, str(tmp_path / "notes.txt"))[0] == ""
    assert model_family(ctx, str(tmp_path))[0] == ""  # a folder that is no diffusers model
    assert model_family(ctx, str(tmp_path / "missing.safetensors")) == ("", "")
    kind, text = model_family(ctx, "/etc/hostname")
    assert kind == "" and "outside" in text
    (tmp_path / "link.safetensors").symlink_to("/etc/hostname")
    kind, text = model_family(ctx, str(tmp_path / "link.safetensors"))
    assert kind == "" and "outside" in text
