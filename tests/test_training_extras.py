"""sd-scripts' training options added for kohya users: zero terminal SNR, validation split/loss, masked loss,
fp8 base weights, the kohya_ss GUI's JSON. Each test checks what the option does, not only that it parses."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from loratrain.core.progress import RecordingReporter, StopFlag
from loratrain.core.weights import read_safetensors_metadata
from loratrain.training.data.dataset import TrainData
from loratrain.training.data.subsets import DatasetSpec, subsets_from_folders
from loratrain.training.noise import debiased_weight, min_snr_weight
from loratrain.training.trainer import LoRATrainer, run_train

from .conftest import quick_config


# -- zero terminal SNR ----------------------------------------------------------------------------------------------
def test_zero_terminal_snr_rescales_the_schedule_as_lin_et_al(tiny_files, dataset, tmp_path):
    cfg = quick_config(tiny_files["sd1_file"], dataset, tmp_path / "o", zero_terminal_snr=True, min_snr_gamma=5.0,
                       min_timestep=990, max_train_steps=2, v_parameterization=True)
    trainer = LoRATrainer(cfg, RecordingReporter(), StopFlag())
    trainer.setup()
    base = trainer.model.noise_scheduler.alphas_cumprod.double().sqrt()
    new = trainer.noise_scheduler.alphas_cumprod.double().sqrt()
    # Lin et al. 2023, algorithm 1: sqrt(abar) shifted so the last is 0 and scaled so the first is unchanged
    expected = (base - base[-1]) * base[0] / (base[0] - base[-1])
    assert torch.allclose(new, expected, atol=1e-6)
    assert new[-1] == 0 and base[-1] > 0.06  # the plain SD schedule keeps ~0.07 of the image at t=999
    res = trainer.run()
    assert all(torch.isfinite(torch.tensor(loss)) for loss in res.losses)  # min-SNR at SNR 0: weight 1, not 0/0
    assert read_safetensors_metadata(res.lora_path)["ss_zero_terminal_snr"] == "True"


def test_snr_weights_are_finite_at_zero_snr():
    from diffusers import DDPMScheduler

    sched = DDPMScheduler(rescale_betas_zero_snr=True)
    t = torch.tensor([999, 500])
    w = min_snr_weight(sched, t, 5.0, False)
    assert w[0] == 1.0 and torch.isfinite(w).all()
    assert torch.isfinite(debiased_weight(sched, t, False)).all()
    plain = DDPMScheduler()
    from diffusers.training_utils import compute_snr

    s = compute_snr(plain, torch.tensor([10, 900]))
    assert torch.allclose(min_snr_weight(plain, torch.tensor([10, 900]), 5.0, False), torch.clamp(s, max=5.0) / s)


# -- validation -------------------------------------------------------------------------------------------------------
def test_validation_split_holds_images_out_of_training(tmp_path):
    from loratrain.training.demo import make_concept_images

    make_concept_images(tmp_path / "img" / "2_a", "a", 10, 64, 0)
    make_concept_images(tmp_path / "reg" / "1_b", "b", 4, 64, 1)

    def data(seed: int) -> TrainData:
        subsets = subsets_from_folders(str(tmp_path / "img"), str(tmp_path / "reg"), {})
        return TrainData([DatasetSpec(subsets=subsets, resolution=(512, 512), batch_size=1, validation_split=0.2, validation_seed=seed)], log=lambda s: None)

    one, again, other = data(1), data(1), data(2)
    held = {it.image for it in one.validation_items()}
    assert len(held) == 2 and held == {it.image for it in again.validation_items()}
    assert held != {it.image for it in other.validation_items()}
    train = {it.image for it in one.items() if not it.subset.is_reg}
    assert len(train) == 8 and not held & train
    assert all(it.repeats == 1 for it in one.validation_items())
    assert all(not it.subset.is_reg for it in one.validation_items())  # reg folders are never split
    assert one.plan(1, 10, None).validation_images == 2


def test_validation_loss_is_fixed_noise_logged_and_plotted(tiny_files, tmp_path):
    from loratrain.training.demo import make_concept_images

    make_concept_images(tmp_path / "d" / "2_dot", "dot", 6, 64, 0)

    def train(**kw) -> tuple[RecordingReporter, object]:
        rec = RecordingReporter()
        cfg = quick_config(tiny_files["sd1_file"], tmp_path / "d", tmp_path / "o", validation_split=0.34, max_train_steps=4,
                           validate_every_n_steps=2, overwrite=True, **kw)
        return rec, run_train(cfg, rec)

    rec, res = train()
    vals = [(m["step"], m["val_loss"]) for m in rec.metrics if "val_loss" in m]
    # every 2 steps, and at the end of each epoch (4 images x 2 repeats / batch 2 = 4 steps: one epoch)
    assert [s for s, _ in vals] == [2.0, 4.0, 4.0]
    assert vals[1][1] == vals[2][1]  # the same network, the same fixed noise: the same number
    assert vals[0][1] != vals[1][1]  # it moves as the network trains
    rec2, _ = train()
    assert [v for _, v in vals] == [m["val_loss"] for m in rec2.metrics if "val_loss" in m]  # repeatable
    rec3, _ = train(validation_seed=7)
    assert [m["val_loss"] for m in rec3.metrics if "val_loss" in m][0] != vals[0][1]  # other held-out images and noise
    meta = read_safetensors_metadata(res.lora_path)
    assert meta["ss_validation_split"] == "0.34" and meta["ss_num_validation_images"] == "2"
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tmp_path / "o" / "logs" / "t"))
    events.Reload()
    assert {"loss/validation/step_average", "loss/validation/epoch_average"} <= set(events.Tags()["scalars"])
    from loratrain.ui.events import Snapshot
    from loratrain.ui.panel import _frame

    snap = Snapshot()
    snap.metrics = rec.metrics
    assert "val_loss" in set(_frame(snap.metrics, lambda k: not k.startswith("lr"))["series"])


# -- masked loss ----------------------------------------------------------------------------------------------------
def _rgba_images(folder: Path, n: int, alpha) -> None:
    from loratrain.training.demo import make_concept_images

    make_concept_images(folder, "dot", n, 64, 0)
    for p in sorted(folder.glob("*.png")):
        im = Image.open(p).convert("RGBA")
        im.putalpha(alpha(im.size))
        im.save(p)


def test_a_transparent_image_teaches_nothing_with_alpha_mask(tiny_files, tmp_path):
    _rgba_images(tmp_path / "d" / "1_dot", 2, lambda size: Image.new("L", size, 0))
    cfg = quick_config(tiny_files["sd1_file"], tmp_path / "d", tmp_path / "o", alpha_mask=True, max_train_steps=2)
    res = run_train(cfg, RecordingReporter())
    assert res.losses == [0.0, 0.0]
    from safetensors.torch import load_file

    ups = [v for k, v in load_file(res.lora_path).items() if "lora_up" in k]
    assert ups and all(not v.any() for v in ups)  # zero gradients: the up weights keep their zero init
    plain = run_train(quick_config(tiny_files["sd1_file"], tmp_path / "d", tmp_path / "p", max_train_steps=2), RecordingReporter())
    assert all(loss > 0 for loss in plain.losses)  # the same images without the mask do teach


def test_mask_images_weight_the_loss_and_a_missing_one_is_named_first(tiny_files, tmp_path):
    from loratrain.training.demo import make_concept_images

    data = tmp_path / "d"
    make_concept_images(data / "1_dot", "dot", 2, 64, 0)
    masks = tmp_path / "masks"
    (masks / "1_dot").mkdir(parents=True)
    for p in sorted((data / "1_dot").glob("*.png")):
        Image.new("RGB", (64, 64), (255, 0, 0)).save(masks / "1_dot" / p.name)  # red = 1 everywhere
    kw = dict(max_train_steps=2, masked_loss=True, conditioning_data_dir=str(masks))
    masked = run_train(quick_config(tiny_files["sd1_file"], data, tmp_path / "o", **kw), RecordingReporter())
    plain = run_train(quick_config(tiny_files["sd1_file"], data, tmp_path / "p", max_train_steps=2), RecordingReporter())
    assert masked.losses == plain.losses  # an all-white mask changes nothing
    half = Image.new("RGB", (64, 64), (0, 0, 0))
    half.paste((255, 255, 255), (0, 0, 32, 64))
    for p in sorted((masks / "1_dot").glob("*.png")):
        half.save(p)
    halved = run_train(quick_config(tiny_files["sd1_file"], data, tmp_path / "h", **kw), RecordingReporter())
    assert 0.2 < halved.losses[0] / plain.losses[0] < 0.8  # half the pixels weigh nothing
    next(iter(sorted((masks / "1_dot").glob("*.png")))).unlink()
    rec = RecordingReporter()
    with pytest.raises(Exception, match="no mask image"):
        run_train(quick_config(tiny_files["sd1_file"], data, tmp_path / "m", **kw), rec)
    assert not any(line.startswith("model:") for line in rec.lines)  # named before the model loads
    with pytest.raises(Exception, match="no mask source"):
        run_train(quick_config(tiny_files["sd1_file"], data, tmp_path / "n", masked_loss=True), RecordingReporter())


def test_the_loss_mask_is_averaged_to_latent_size_and_flips_with_the_view():
    mask = torch.zeros(64, 64)
    mask[:, :32] = 1.0
    plain, flipped = TrainData._mask_views(mask, (8, 8), 2)
    assert plain.shape == (1, 8, 8) and plain[0, :, :4].eq(1).all() and plain[0, :, 4:].eq(0).all()
    assert torch.equal(flipped, plain.flip(-1))


# -- fp8 base weights -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("unet_only", [False, True])
def test_fp8_base_stores_the_frozen_weights_in_float8_and_still_trains(tiny_files, dataset, tmp_path, unet_only):
    flag = "fp8_base_unet" if unet_only else "fp8_base"
    cfg = quick_config(tiny_files["sd1_file"], dataset, tmp_path / "o", max_train_steps=3, mixed_precision="bf16", **{flag: True})
    trainer = LoRATrainer(cfg, RecordingReporter(), StopFlag())
    trainer.setup()
    unet_linear = trainer.model.unet.down_blocks[0].attentions[0].transformer_blocks[0].attn1.to_q
    assert unet_linear.base_layer.weight.dtype == torch.float8_e4m3fn
    assert unet_linear.lora_A["loratrain"].weight.dtype == torch.float32  # the adapters train in full precision
    te_q = next(m for name, m in trainer.model.text_encoders[0].named_modules() if name.endswith("q_proj"))
    te_q = getattr(te_q, "base_layer", te_q)
    assert te_q.weight.dtype == (torch.bfloat16 if unet_only else torch.float8_e4m3fn)
    res = trainer.run()
    plain = run_train(quick_config(tiny_files["sd1_file"], dataset, tmp_path / "p", max_train_steps=3, mixed_precision="bf16"),
                      RecordingReporter())
    assert res.losses[0] == pytest.approx(plain.losses[0], rel=0.1)  # the same model, rounded to fp8
    assert res.losses != plain.losses
    assert read_safetensors_metadata(res.lora_path)[f"ss_{flag}"] == "True"


def test_fp8_base_is_refused_where_the_base_weights_are_trained_or_read(tiny_files, dataset, tmp_path):
    from loratrain.core.errors import ConfigError

    with pytest.raises(ConfigError, match="fp8_base"):
        quick_config(tiny_files["sd1_file"], dataset, tmp_path / "o", fp8_base=True, network_module="dora").check()


# -- the kohya_ss GUI's saved JSON ----------------------------------------------------------------------------------
def gui_json(model: Path, data: Path, out: Path, **changes) -> dict:
    """A config as the kohya_ss GUI's "Save config" writes it (its presets/lora/*.json layout): GUI field names,
    numbers as strings, "" for unset."""
    cfg = {
        "LoRA_type": "Standard", "adaptive_noise_scale": 0, "additional_parameters": "", "block_alphas": "", "block_dims": "",
        "block_lr_zero_threshold": "", "bucket_no_upscale": False, "bucket_reso_steps": 64, "cache_latents": True,
        "cache_latents_to_disk": False, "caption_dropout_every_n_epochs": 0.0, "caption_dropout_rate": 0, "caption_extension": ".txt",
        "clip_skip": "1", "color_aug": False, "conv_alpha": 1, "conv_block_alphas": "", "conv_block_dims": "", "conv_dim": 1,
        "decompose_both": False, "dim_from_weights": False, "down_lr_weight": "", "enable_bucket": True, "epoch": 2, "factor": -1,
        "flip_aug": False, "full_bf16": False, "full_fp16": False, "gradient_accumulation_steps": "1",
        "gradient_checkpointing": False, "keep_tokens": "0", "learning_rate": 0.001, "lora_network_weights": "",
        "lr_scheduler": "cosine", "lr_scheduler_args": "", "lr_scheduler_num_cycles": "", "lr_scheduler_power": "", "lr_warmup": 10,
        "max_bucket_reso": 128, "max_data_loader_n_workers": "0", "max_resolution": "64,64", "max_timestep": 1000,
        "max_token_length": "75", "max_train_epochs": "", "max_train_steps": "", "mem_eff_attn": False, "mid_lr_weight": "",
        "min_bucket_reso": 64, "min_snr_gamma": 5, "min_timestep": 0, "mixed_precision": "no", "model_list": "custom",
        "module_dropout": 0, "multires_noise_discount": 0.3, "multires_noise_iterations": 6, "network_alpha": 2, "network_dim": 4,
        "network_dropout": 0, "no_token_padding": False, "noise_offset": 0.05, "noise_offset_type": "Original",
        "num_cpu_threads_per_process": 2, "optimizer": "AdamW", "optimizer_args": "", "output_dir": str(out), "output_name": "gui",
        "persistent_data_loader_workers": False, "pretrained_model_name_or_path": str(model), "prior_loss_weight": 1.0,
        "random_crop": False, "rank_dropout": 0, "reg_data_dir": "", "sample_every_n_epochs": 0, "sample_every_n_steps": 0,
        "sample_prompts": "", "sample_sampler": "euler_a", "save_every_n_epochs": 0, "save_every_n_steps": 0, "save_last_n_steps": 0,
        "save_last_n_steps_state": 0, "save_model_as": "safetensors", "save_precision": "fp16", "save_state": False,
        "scale_v_pred_loss_like_noise_pred": False, "scale_weight_norms": 0, "sdxl": False, "sdxl_cache_text_encoder_outputs": False,
        "sdxl_no_half_vae": True, "seed": "", "shuffle_caption": False, "stop_text_encoder_training_pct": 0, "text_encoder_lr": 0.0005,
        "train_batch_size": 2, "train_data_dir": str(data), "train_on_input": True, "training_comment": "from the GUI",
        "unet_lr": 0.001, "unit": 1, "up_lr_weight": "", "use_cp": False, "use_wandb": False, "v2": False,
        "v_parameterization": False, "v_pred_like_loss": 0, "vae_batch_size": 0, "weighted_captions": False, "xformers": "sdpa",
    }
    cfg.update(changes)
    return cfg


def test_a_gui_json_means_what_the_guis_start_button_runs(tiny_files, dataset, tmp_path):
    from loratrain.training.config import TrainConfig

    cfg = TrainConfig.build(gui_json(tiny_files["sd1_file"], dataset, tmp_path / "o"), check=False)
    assert (cfg.network_module, cfg.resolution, cfg.optimizer_type, cfg.clip_skip) == ("lora", "64,64", "AdamW", 1)
    assert cfg.lr_warmup_steps == 0.1  # lr_warmup is a percentage in the GUI
    assert cfg.max_train_epochs == 2 and cfg.lr_scheduler_num_cycles == 2  # from "epoch", as the GUI fills them
    assert cfg.noise_offset == 0.05 and cfg.multires_noise_iterations == 0  # noise_offset_type Original: multires off
    assert cfg.text_encoder_lr == [0.0005] and cfg.unet_lr == 0.001 and cfg.seed == 42
    unet_only = TrainConfig.build(gui_json(tiny_files["sd1_file"], dataset, tmp_path / "o", text_encoder_lr=0), check=False)
    assert unet_only.network_train_unet_only  # the GUI's rule: a text encoder lr of 0 trains the UNet only
    loha = TrainConfig.build(gui_json(tiny_files["sd1_file"], dataset, tmp_path / "o", LoRA_type="LyCORIS/LoHa", conv_dim=2,
                                      conv_alpha=1, noise_offset_type="Multires"), check=False)
    assert (loha.network_module, loha.conv_dim, loha.noise_offset, loha.multires_noise_iterations) == ("loha", 2, 0.0, 6)
    from loratrain.core.errors import ConfigError

    with pytest.raises(ConfigError, match="LoRA_type.*Diag-OFT"):
        TrainConfig.build(gui_json(tiny_files["sd1_file"], dataset, tmp_path / "o", LoRA_type="LyCORIS/Diag-OFT"), check=False)
    args = TrainConfig.build(gui_json(tiny_files["sd1_file"], dataset, tmp_path / "o", rank_dropout=0.1, loraplus_lr_ratio=16,
                                      down_lr_weight="sine"), check=False)  # networks.lora's arguments, as the GUI passes them
    assert (args.rank_dropout, args.loraplus_lr_ratio, args.down_lr_weight, args.block_dims) == (0.1, 16, "sine", "")
    with pytest.raises(ConfigError, match="networks.lora argument"):
        TrainConfig.build(gui_json(tiny_files["sd1_file"], dataset, tmp_path / "o", LoRA_type="LyCORIS/LoHa", rank_dropout=0.1))


def test_a_gui_json_trains_through_the_cli(tiny_files, dataset, tmp_path):
    from safetensors.torch import load_file

    from .test_kohya_compat import cli

    preset = tmp_path / "SD15 - my preset.json"
    preset.write_text(json.dumps(gui_json(tiny_files["sd1_file"], dataset, tmp_path / "o", LoRA_type="LyCORIS/LoHa",
                                          text_encoder_lr=0), indent=4))
    res = cli("--config_file", str(preset), "--max_train_steps", "2")
    assert res.returncode == 0, res.stderr
    assert "LoRA_type 'LyCORIS/LoHa' -> network_module loha" in res.stdout
    sd = load_file(tmp_path / "o" / "gui.safetensors")
    assert any(k.endswith("hada_w1_a") for k in sd) and not any(k.startswith("lora_te") for k in sd)
    assert read_safetensors_metadata(tmp_path / "o" / "gui.safetensors")["ss_training_comment"] == "from the GUI"


# -- torch.compile ----------------------------------------------------------------------------------------------------
def test_torch_compile_runs_the_same_training(tiny_files, dataset, tmp_path):
    import torch._dynamo
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    kw = dict(max_train_steps=2)
    rec = RecordingReporter()
    compiled = run_train(quick_config(tiny_files["sd1_file"], dataset, tmp_path / "c", torch_compile=True,
                                      dynamo_backend="aot_eager", **kw), rec)
    assert any("torch.compile" in line for line in rec.lines)
    assert counters["stats"]["unique_graphs"] > 0  # the UNet really went through dynamo
    plain = run_train(quick_config(tiny_files["sd1_file"], dataset, tmp_path / "p", **kw), RecordingReporter())
    assert compiled.losses == pytest.approx(plain.losses, rel=1e-4)
    torch._dynamo.reset()


# -- color_aug and random_crop --------------------------------------------------------------------------------------
def test_random_crop_windows_and_colour_jitter_are_drawn_per_step():
    import random

    import numpy as np

    from loratrain.training.data.augment import augmented_pixels, color_aug
    from loratrain.training.data.buckets import fit_to_bucket

    rgb = np.random.default_rng(0).integers(0, 255, (64, 96, 3), dtype=np.uint8)
    image = Image.fromarray(rgb)
    crops = set()
    for seed in range(20):
        pixels, (top, left) = augmented_pixels(image, (64, 64), None, True, False, random.Random(seed))
        assert top == 0 and 0 <= left <= 32 and np.array_equal(pixels, rgb[:, left:left + 64])  # a window of the image
        crops.add(left)
    assert len(crops) > 5
    centre, where = augmented_pixels(image, (64, 64), None, False, False, random.Random(0))
    assert np.array_equal(centre, fit_to_bucket(image, (64, 64))) and where == (-1, -1)
    red = np.zeros((8, 8, 3), np.uint8)
    red[..., 0] = 200
    outs = [color_aug(red, random.Random(s)) for s in range(300)]
    changed = [o for o in outs if not np.array_equal(o, red)]
    assert 0.2 < len(changed) / len(outs) < 0.45  # a third of the time, as sd-scripts
    hues = [int(np.array(Image.fromarray(o).convert("HSV"))[0, 0, 0]) for o in changed]
    assert all(min(h, 256 - h) <= 13 for h in hues)  # at most 16 degrees (11.4 of PIL's 256 hue units, + rounding)


def test_color_aug_and_random_crop_train_repeatably_with_live_latents(tiny_files, tmp_path):
    from loratrain.training.demo import make_concept_images

    data = tmp_path / "d" / "2_wide"
    make_concept_images(data, "wide", 3, 64, 0)
    for p in data.glob("*.png"):
        Image.open(p).resize((96, 64)).save(p)  # wider than the 64 px bucket: room to crop

    def train(out: str, **kw):  # noqa: ANN202
        rec = RecordingReporter()
        return rec, run_train(quick_config(tiny_files["sd1_file"], tmp_path / "d", tmp_path / out, max_train_steps=3, **kw), rec)

    rec, aug = train("a", random_crop=True, color_aug=True)
    assert any("VAE-encoded every step" in line for line in rec.lines)
    _, again = train("b", random_crop=True, color_aug=True)
    _, plain = train("c")
    assert aug.losses == again.losses and aug.losses != plain.losses
    meta = read_safetensors_metadata(aug.lora_path)
    assert meta["ss_random_crop"] == "True" and meta["ss_color_aug"] == "True"


# -- text encoder outputs on disk -----------------------------------------------------------------------------------
@pytest.mark.parametrize("fam", ["sd1", "sdxl"])
def test_text_encoder_outputs_cached_on_disk_train_the_same_and_are_reused(tiny_files, dataset, tmp_path, fam):
    from safetensors.torch import load_file

    kw = dict(max_train_steps=3, network_train_unet_only=True)
    run_train(quick_config(tiny_files[f"{fam}_file"], dataset, tmp_path / "mem", cache_text_encoder_outputs=True, **kw))

    def disk_run(out: str) -> RecordingReporter:
        rec = RecordingReporter()
        run_train(quick_config(tiny_files[f"{fam}_file"], dataset, tmp_path / out, cache_text_encoder_outputs_to_disk=True, **kw), rec)
        return rec

    first = disk_run("disk")
    captions = {p.read_text().strip() for p in dataset.rglob("*.txt")}
    assert len(list(dataset.rglob(".loratrain_cache/*.te.safetensors"))) == len(captions)  # one per caption, beside an image
    a, b = load_file(tmp_path / "mem" / "t.safetensors"), load_file(tmp_path / "disk" / "t.safetensors")
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
    assert ("caching text encoder outputs", len(captions)) in first.phases  # each caption encoded ...
    assert ("caching text encoder outputs", 0) in disk_run("again").phases  # ... read back by the next run
    next(iter(sorted(dataset.rglob("*.txt")))).write_text("a new caption")
    assert ("caching text encoder outputs", 1) in disk_run("changed").phases  # only what changed is encoded


# -- weighted captions ----------------------------------------------------------------------------------------------
def test_the_attention_syntax_parses_as_a1111():
    from loratrain.core.prompt_weights import parse_weights

    assert parse_weights("normal text") == [("normal text", 1.0)]
    assert parse_weights("an (important) word") == [("an ", 1.0), ("important", pytest.approx(1.1)), (" word", 1.0)]
    assert parse_weights(r"\(literal\]") == [("(literal]", 1.0)]
    got = parse_weights("a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).")
    expected = [("a ", 1.0), ("house", 1.573), (" ", 1.1), ("on", 1.0), (" a ", 1.1), ("hill", 0.55), (", sun, ", 1.1),
                ("sky", 1.4641), (".", 1.1)]
    assert [t for t, _ in got] == [t for t, _ in expected]
    assert [w for _, w in got] == pytest.approx([w for _, w in expected])
    assert parse_weights("(unbalanced") == [("unbalanced", pytest.approx(1.1))]


@pytest.mark.parametrize("fam,tokens", [("sd1", None), ("sdxl", None), ("sd1", 150)])
def test_weighted_captions_scale_the_weighted_tokens_outputs(tiny_files, fam, tokens):
    from loratrain.core.models.loading import load_model
    from loratrain.training.conditioning import encode_prompts

    model = load_model(tiny_files[f"{fam}_file"])
    with torch.no_grad():
        plain = encode_prompts(model, ["a red dog"], 1, tokens)
        weighted = encode_prompts(model, ["a (red:1.5) dog"], 1, tokens, weighted=True)
    ids = model.tokenizers[0]("a red dog").input_ids
    red = ids.index(model.tokenizers[0]("red").input_ids[1])
    ratio = weighted.hidden[0] / plain.hidden[0]
    assert torch.allclose(ratio[red], torch.full_like(ratio[red], 1.5), atol=1e-4)
    others = [i for i in range(plain.hidden.shape[1]) if i != red]
    assert torch.allclose(weighted.hidden[0, others], plain.hidden[0, others], atol=1e-5)
    if plain.pooled is not None:
        assert torch.allclose(weighted.pooled, plain.pooled)


def test_weighted_captions_train(tiny_files, tmp_path):
    from loratrain.training.demo import make_concept_images

    make_concept_images(tmp_path / "d" / "1_dot", "dot", 2, 64, 0)
    for p in (tmp_path / "d" / "1_dot").glob("*.txt"):
        p.write_text("a (dot:1.4), [plain] background")
    res = run_train(quick_config(tiny_files["sd1_file"], tmp_path / "d", tmp_path / "o", weighted_captions=True, max_train_steps=2),
                    RecordingReporter())
    plain = run_train(quick_config(tiny_files["sd1_file"], tmp_path / "d", tmp_path / "p", max_train_steps=2), RecordingReporter())
    assert res.losses != plain.losses


# -- caption features -----------------------------------------------------------------------------------------------
def test_wildcards_warmup_secondary_separator_and_fixed_suffix_as_sd_scripts():
    import random

    from loratrain.training.data.captions import process_caption
    from loratrain.training.data.subsets import Subset

    wild = Subset(image_dir="x", enable_wildcard=True)
    seen = {process_caption("a {red|blue|green} {{dog}}\nsecond line", wild, random.Random(s)) for s in range(60)}
    assert seen == {"a red {dog}", "a blue {dog}", "a green {dog}", "second line"}
    assert process_caption("first\nsecond", Subset(image_dir="x"), random.Random(0)) == "first"  # without wildcards: the first line
    warm = Subset(image_dir="x", keep_tokens=1, token_warmup_min=1, token_warmup_step=0.5)
    tags = "sks, a, b, c, d"
    lengths = [len(process_caption(tags, warm, random.Random(0), 0, step, 8).split(", ")) for step in range(6)]
    assert lengths == [2, 2, 3, 4, 5, 5]  # 1 fixed + floor(step * (4 - 1) / 4) + 1 free; all 4 from step 4 (0.5 of 8)
    group = Subset(image_dir="x", shuffle_caption=True, secondary_separator=";;;")
    for s in range(20):
        out = process_caption("1girl, red hair;;;blue eyes, smile", group, random.Random(s)).split(", ")
        assert "red hair,blue eyes" in out and len(out) == 3  # the group moved as one tag (joined by "," as sd-scripts)
    suffix = Subset(image_dir="x", shuffle_caption=True, keep_tokens_separator="|||")
    for s in range(10):
        out = process_caption("sks ||| a, b, c ||| masterpiece, best", suffix, random.Random(s)).split(", ")
        assert out[0] == "sks" and out[-2:] == ["masterpiece", "best"] and sorted(out[1:4]) == ["a", "b", "c"]


# -- small sd-scripts options ---------------------------------------------------------------------------------------
def test_modelspec_metadata_thumbnail_epoch_ratio_and_v_pred_loss_weights(tiny_files, dataset, tmp_path):
    import base64

    thumb = tmp_path / "thumb.png"
    Image.new("RGB", (8, 8), (10, 200, 30)).save(thumb)
    cfg = quick_config(tiny_files["sd1_file"], dataset, tmp_path / "o", max_train_epochs=4, train_batch_size=8,
                       save_n_epoch_ratio=2, metadata_usage_hint="use sks", metadata_trigger_phrase="sks shape",
                       metadata_thumbnail=str(thumb), v_pred_like_loss=0.5)
    res = run_train(cfg, RecordingReporter())
    saves = sorted(p.name for p in (tmp_path / "o").glob("t*.safetensors"))
    assert saves == ["t-000002.safetensors", "t.safetensors"]  # 4 epochs / ratio 2: every 2nd epoch, and the last
    meta = read_safetensors_metadata(res.lora_path)
    assert meta["modelspec.usage_hint"] == "use sks" and meta["modelspec.trigger_phrase"] == "sks shape"
    head, _, data = meta["modelspec.thumbnail"].partition(",")
    assert head == "data:image/png;base64" and base64.b64decode(data) == thumb.read_bytes()
    assert "modelspec.merged_from" not in meta  # unset ones are left out, as sd-scripts
    plain = run_train(quick_config(tiny_files["sd1_file"], dataset, tmp_path / "p", max_train_epochs=1,
                                   train_batch_size=8), RecordingReporter())
    assert res.losses[0] > plain.losses[0]  # + 0.5 x loss x (SNR+1)/SNR: always more


def test_snr_scale_is_snr_over_snr_plus_one():
    from diffusers import DDPMScheduler
    from diffusers.training_utils import compute_snr

    from loratrain.training.noise import snr_scale

    sched = DDPMScheduler()
    t = torch.tensor([0, 10, 500, 999])
    s = compute_snr(sched, t).clamp(max=1000)
    assert torch.allclose(snr_scale(sched, t), s / (s + 1))


def test_scale_v_pred_loss_like_noise_pred_weighs_the_loss_down(tiny_files, dataset, tmp_path):
    kw = dict(max_train_steps=2, v_parameterization=True)
    scaled = run_train(quick_config(tiny_files["sd1_file"], dataset, tmp_path / "s", scale_v_pred_loss_like_noise_pred=True, **kw))
    plain = run_train(quick_config(tiny_files["sd1_file"], dataset, tmp_path / "p", **kw))
    assert scaled.losses[0] < plain.losses[0]  # x SNR/(SNR+1) < 1 at every timestep


def test_resize_interpolation_chooses_the_filter_and_keys_the_latent_cache(tiny_files, tmp_path):
    import numpy as np

    from loratrain.training.data.buckets import fit_to_bucket

    rgb = np.random.default_rng(1).integers(0, 255, (100, 150, 3), dtype=np.uint8)
    image = Image.fromarray(rgb)
    nearest = fit_to_bucket(image, (64, 64), interpolation="nearest")
    expected = np.array(image.resize((96, 64), Image.Resampling.NEAREST).crop((16, 0, 80, 64)))
    assert np.array_equal(nearest, expected) and not np.array_equal(nearest, fit_to_bucket(image, (64, 64)))
    from loratrain.training.demo import make_concept_images

    data = tmp_path / "d" / "1_x"
    make_concept_images(data, "x", 2, 96, 0)

    def run(out: str, **kw) -> RecordingReporter:
        rec = RecordingReporter()
        run_train(quick_config(tiny_files["sd1_file"], tmp_path / "d", tmp_path / out, max_train_steps=1,
                               cache_latents_to_disk=True, **kw), rec)
        return rec

    first, lanczos = run("a"), run("b")
    assert lanczos.metrics[0]["loss"] == first.metrics[0]["loss"]  # the cache from run a, same filter
    near = run("c", resize_interpolation="nearest")
    assert near.metrics[0]["loss"] != first.metrics[0]["loss"]  # another filter: the cache was not reused


def test_wrong_paths_of_the_new_options_are_named_before_loading(tiny_files, dataset, tmp_path):
    from loratrain.core.errors import ConfigError

    def problem(**kw) -> str:
        with pytest.raises(ConfigError) as e:
            quick_config(tiny_files["sd1_file"], dataset, tmp_path / "o", **kw).check()
        return str(e.value)

    assert "metadata_thumbnail: not found" in problem(metadata_thumbnail=str(tmp_path / "nope.png"))
    assert "conditioning_data_dir: not found" in problem(masked_loss=True, conditioning_data_dir=str(tmp_path / "nowhere"))
    assert "is it a model checkpoint" in problem(base_weights=[str(tiny_files["sd1_file"])])
    assert "LoRA not found" in problem(base_weights=[str(tmp_path / "nope.safetensors")])
    assert not (tmp_path / "o").exists()
