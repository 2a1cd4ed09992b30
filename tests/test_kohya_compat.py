"""A kohya_ss user's config and command line, run unchanged through the real CLI on the tiny model.

The GUI TOML below follows what the kohya_ss GUI (v24+) writes for a default SD1.5 "Standard" LoRA
(flat keys named after sd-scripts' arguments, `text_encoder_lr` always a list, GUI-only keys like
`epoch` and `noise_offset_type`, `network_args` and `lr_scheduler_args` as lists of "k=v").
"""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from loratrain.core.errors import ConfigError
from loratrain.core.progress import RecordingReporter, StopFlag
from loratrain.core.weights import read_safetensors_metadata
from loratrain.training.config import TrainConfig
from loratrain.training.data.buckets import no_upscale_bucket
from loratrain.training.kohya import GUI_KEYS, IGNORED, REFUSED, SAME, SD_SCRIPTS_FLAGS, TRANSLATED, flag_table
from loratrain.training.trainer import run_train

from .conftest import quick_config

GUI_TOML = """\
adaptive_noise_scale = 0
bucket_no_upscale = true
bucket_reso_steps = 64
cache_latents = true
caption_dropout_every_n_epochs = 0
caption_dropout_rate = 0
caption_extension = ".txt"
clip_skip = 1
dynamo_backend = "no"
enable_bucket = true
epoch = 1
gradient_accumulation_steps = 1
huber_c = 0.1
huber_scale = 1
huber_schedule = "snr"
keep_tokens = 0
learning_rate = 0.001
logging_dir = "{out}/log"
loss_type = "l2"
lr_scheduler = "cosine"
lr_scheduler_args = []
lr_scheduler_num_cycles = 1
lr_scheduler_power = 1
lr_warmup_steps = 0
max_bucket_reso = 128
max_data_loader_n_workers = 0
max_grad_norm = 1
max_timestep = 1000
max_token_length = 75
max_train_steps = 3
min_bucket_reso = 64
min_snr_gamma = 0
min_timestep = 0
mixed_precision = "no"
multires_noise_discount = 0.3
multires_noise_iterations = 0
network_alpha = 2
network_args = [ "conv_dim=4", "conv_alpha=1",]
network_dim = 4
network_module = "networks.lora"
noise_offset = 0
noise_offset_type = "Original"
optimizer_args = []
optimizer_type = "AdamW"
output_dir = "{out}"
output_name = "gui_lora"
persistent_data_loader_workers = false
pretrained_model_name_or_path = "{model}"
prior_loss_weight = 1
resolution = "64,64"
sample_prompts = ""
sample_sampler = "euler_a"
save_every_n_epochs = 1
save_model_as = "safetensors"
save_precision = "float"
scale_weight_norms = 0
sdpa = true
seed = 1234
shuffle_caption = false
text_encoder_lr = [ 0.0005, 0.0005,]
train_batch_size = 1
train_data_dir = "{data}"
training_comment = "made with the GUI"
unet_lr = 0.001
wandb_run_name = ""
xformers = false
"""


def cli(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "loratrain", "train", *args], capture_output=True, text=True, timeout=timeout)


def test_every_sd_scripts_flag_has_a_meaning_here():
    fields = set(TrainConfig.model_fields)
    rows = flag_table(fields)
    assert len(rows) == len(SD_SCRIPTS_FLAGS) == 196
    for name, status, why in rows:
        assert status in ("implemented", "translated", "same", "ignored", "refused"), name
        assert status == "implemented" or why, name
    classified = fields | set(SAME) | set(IGNORED) | set(REFUSED) | set(TRANSLATED)
    assert set(SD_SCRIPTS_FLAGS) <= classified
    assert not (set(SAME) | set(IGNORED) | set(REFUSED)) & fields  # one place each
    assert not set(GUI_KEYS) & set(SD_SCRIPTS_FLAGS)


def test_the_gui_toml_runs_unchanged_and_the_metadata_carries_no_path(tiny_files, dataset, tmp_path):
    out = tmp_path / "out"
    toml = tmp_path / "config_lora-20261202.toml"
    toml.write_text(GUI_TOML.format(out=out, model=tiny_files["sd1_file"], data=dataset))
    res = cli("--config_file", str(toml))
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    log = res.stdout + res.stderr
    # GUI-only and no-effect keys are named once, with the reason; nothing else is said about them
    assert "ignored epoch: kohya_ss GUI key" in log and "ignored max_data_loader_n_workers, persistent_data_loader_workers: no data loader" in log
    assert "accepted sdpa: " in log and "torch.compile" not in log  # the GUI's dynamo_backend = "no": compile stays off
    lora = out / "gui_lora.safetensors"
    sd = load_file(lora)
    assert any("conv" in k or "resnets" in k for k in sd if k.endswith("lora_down.weight")), "network_args conv_dim gave no LoCon"
    meta = read_safetensors_metadata(lora)
    text = json.dumps(meta)
    assert str(tmp_path) not in text and "/tmp" not in text  # no path of this machine in a file people share
    assert json.loads(meta["ss_dataset_dirs"]) == {"2_square": {"n_repeats": 2, "img_count": 3},
                                                  "3_circle": {"n_repeats": 3, "img_count": 4}}
    assert set(json.loads(meta["ss_tag_frequency"])) == {"2_square", "3_circle"}
    assert meta["ss_network_args"] == json.dumps({"conv_dim": "4", "conv_alpha": "1.0"})
    assert meta["ss_training_comment"] == "made with the GUI" and meta["ss_epoch"] == "1"
    assert meta["ss_total_batch_size"] == "1" and meta["ss_bucket_no_upscale"] == "True"
    assert meta["ss_noise_offset"] == "None" and meta["ss_max_token_length"] == "None"  # unset as sd-scripts writes it
    assert json.loads(meta["ss_bucket_info"])["buckets"]["0"] == {"resolution": [64, 64], "count": 18}
    # the hashes A1111 shows: the webui's legacy short hash and SHA-256 of the model file; SHA-256 of the LoRA's tensor bytes
    model_bytes = Path(tiny_files["sd1_file"]).read_bytes()
    assert meta["ss_new_sd_model_hash"] == hashlib.sha256(model_bytes).hexdigest()
    assert meta["ss_sd_model_hash"] == hashlib.sha256(model_bytes[0x100000:0x110000]).hexdigest()[:8]
    raw = lora.read_bytes()
    header = int.from_bytes(raw[:8], "little")
    assert meta["sshs_model_hash"] == hashlib.sha256(raw[8 + header:]).hexdigest()
    assert len(meta["sshs_legacy_hash"]) == 8


def test_a_gui_command_line_runs(tiny_files, dataset, tmp_path):
    out = tmp_path / "cmd"
    res = cli("--pretrained_model_name_or_path", str(tiny_files["sd1_file"]), "--train_data_dir", str(dataset),
              "--resolution=64,64", "--output_dir", str(out), "--output_name", "cmd", "--save_model_as=safetensors",
              "--network_module=networks.lora", "--network_dim", "4", "--network_alpha", "2", "--network_args", "conv_dim=2",
              "conv_alpha=1", "--text_encoder_lr", "0.0005", "--unet_lr", "0.001", "--learning_rate", "0.001",
              "--lr_scheduler", "constant", "--train_batch_size", "1", "--max_train_steps", "2", "--mixed_precision", "no",
              "--save_precision", "float", "--seed", "1", "--cache_latents", "--sdpa", "--max_data_loader_n_workers", "0",
              "--persistent_data_loader_workers", "--bucket_no_upscale", "--enable_bucket", "--min_bucket_reso=64",
              "--max_bucket_reso=128", "--loss_type", "smooth_l1", "--huber_schedule", "exponential", "--huber_c", "0.2",
              "--no_half_vae", "--caption_extension=.txt", "--max_grad_norm", "1", "--max_token_length", "75",
              "--scale_weight_norms", "0", "--noise_offset", "0.0")
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    meta = read_safetensors_metadata(out / "cmd.safetensors")
    assert meta["ss_loss_type"] == "smooth_l1" and meta["ss_huber_schedule"] == "exponential"
    assert json.loads(meta["ss_network_args"]) == {"conv_dim": "2", "conv_alpha": "1.0"}


@pytest.mark.parametrize("args,named", [
    (["--full_fp16"], "needs mixed_precision fp16"),
    (["--full_bf16"], "needs mixed_precision bf16"),
    (["--network_args", "algo=glora"], "algo"),
    (["--save_model_as", "ckpt"], "pickle"),
    (["--max_token_length", "300"], "max_token_length"),
    (["--log_with", "wandb"], "log_with"),
    (["--network_args", "conv_dim=8", "--conv_dim", "4"], "disagrees"),
])
def test_what_is_not_implemented_is_refused_by_name_before_loading(tiny_files, dataset, tmp_path, args, named):
    res = cli("--pretrained_model_name_or_path", str(tiny_files["sd1_file"]), "--train_data_dir", str(dataset),
              "--output_dir", str(tmp_path / "o"), *args, timeout=60)
    assert res.returncode != 0 and named in res.stderr and "Traceback" not in res.stderr, res.stderr
    assert "model:" not in res.stdout  # nothing loaded
    assert not (tmp_path / "o").exists()


def test_a_typo_is_still_an_unknown_option(tmp_path):
    with pytest.raises(ConfigError, match="unknown option 'netwrok_dim'"):
        TrainConfig.build({"netwrok_dim": 4, "epoch": 3})


def test_text_encoder_lr_list_sets_each_encoder(tiny_files, tmp_path):
    from loratrain.training.demo import make_concept_images

    data = tmp_path / "d"
    make_concept_images(data / "1_dot", "dot", 2, 64, 0)
    rec = RecordingReporter()
    cfg = quick_config(tiny_files["sdxl_file"], data, tmp_path / "o", max_train_steps=1, text_encoder_lr=[2e-4, 3e-4],
                       unet_lr=1e-3, lr_scheduler="constant", train_batch_size=1)
    run_train(cfg, rec)
    lrs = {k: v for k, v in rec.metrics[-1].items() if k.startswith("lr_")}
    assert lrs == {"lr_unet": 1e-3, "lr_text_encoder": 2e-4, "lr_text_encoder_2": 3e-4}
    assert TrainConfig.build({"text_encoder_lr": 5e-5}).text_encoder_lrs(2) == [5e-5, 5e-5]


def test_loss_options_change_what_is_learned(tiny_files, dataset, tmp_path):
    def trained(name, **kw):
        run_train(quick_config(tiny_files["sd1_file"], dataset, tmp_path / name, max_train_steps=2, **kw))
        return load_file(tmp_path / name / "t.safetensors")

    base = trained("l2")
    again = trained("l2b")
    assert all(torch.equal(base[k], again[k]) for k in base)  # the comparison is not noise
    for name, kw in {"l1": dict(loss_type="l1"), "huber": dict(loss_type="huber", huber_schedule="constant", huber_c=0.05),
                     "ip": dict(ip_noise_gamma=0.1), "debiased": dict(debiased_estimation_loss=True)}.items():
        other = trained(name, **kw)
        assert any(not torch.allclose(base[k], other[k]) for k in base), name


def test_bucket_no_upscale_keeps_small_images_as_they_are(tiny_files, tmp_path):
    assert no_upscale_bucket((100, 70), 128 * 128, 8) == ((100, 70), (96, 64))  # small: trimmed only
    resized, bucket = no_upscale_bucket((400, 200), 128 * 128, 8)
    assert resized[0] * resized[1] <= 128 * 128 * 1.05 and bucket[0] % 8 == 0 and abs(bucket[0] / bucket[1] - 2) < 0.15
    data = tmp_path / "d" / "1_x"
    data.mkdir(parents=True)
    Image.new("RGB", (72, 40), (200, 30, 30)).save(data / "a.png")
    Image.new("RGB", (300, 300), (30, 200, 30)).save(data / "b.png")
    for p in data.glob("*.png"):
        p.with_suffix(".txt").write_text("x")
    rec = RecordingReporter()
    run_train(quick_config(tiny_files["sd1_file"], tmp_path / "d", tmp_path / "o", resolution="128", enable_bucket=True,
                           bucket_no_upscale=True, bucket_reso_steps=8, min_bucket_reso=8, max_bucket_reso=256,
                           max_train_steps=1, train_batch_size=1), rec)
    info = json.loads(read_safetensors_metadata(tmp_path / "o" / "t.safetensors")["ss_bucket_info"])
    assert sorted(tuple(b["resolution"]) for b in info["buckets"].values()) == [(72, 40), (128, 128)]


def test_dataset_toml_keys_sd_scripts_knows(tiny_files, dataset, tmp_path):
    from loratrain.training.data.subsets import DatasetError, specs_from_toml

    toml = tmp_path / "ds.toml"
    toml.write_text(f'[general]\ncolor_aug = false\nrandom_crop = false\n[[datasets]]\nresolution = 64\n'
                    f'[[datasets.subsets]]\nimage_dir = "{dataset / "3_circle"}"\nalpha_mask = false\n')
    assert specs_from_toml(toml, {})[0].subsets[0].image_dir.endswith("3_circle")
    toml.write_text(toml.read_text().replace("color_aug = false", "color_aug = true").replace("resolution = 64",
                                                                                               "resolution = 64\nvalidation_split = 0.25"))
    spec = specs_from_toml(toml, {})[0]
    assert spec.subsets[0].color_aug and spec.validation_split == 0.25  # implemented now: kept, not dropped
    toml.write_text(toml.read_text().replace("random_crop = false", "face_crop_aug_range = '2.0,4.0'"))
    with pytest.raises(DatasetError, match="face_crop_aug_range = '2.0,4.0': not implemented"):
        specs_from_toml(toml, {})


def test_the_flag_document_is_current():
    from loratrain.training.kohya import flag_document

    doc = Path(__file__).resolve().parents[1] / "docs" / "sd-scripts-flags.md"
    if os.environ.get("LORATRAIN_WRITE_DOCS"):
        doc.write_text(flag_document())
    assert doc.read_text() == flag_document(), "regenerate: LORATRAIN_WRITE_DOCS=1 pytest tests/test_kohya_compat.py -k flag_document"


def test_network_weights_takes_any_kohya_lora_file(tiny_files, dataset, tmp_path):
    run_train(quick_config(tiny_files["sd1_file"], dataset, tmp_path / "a", max_train_steps=2, network_alpha=2.0))
    first = load_file(tmp_path / "a" / "t.safetensors")
    # continue with another alpha and a learning rate too small to move anything: the LoRA's effect is unchanged
    rec = RecordingReporter()
    run_train(quick_config(tiny_files["sd1_file"], dataset, tmp_path / "b", max_train_steps=1, network_alpha=4.0, learning_rate=1e-12,
                           network_weights=str(tmp_path / "a" / "t.safetensors")), rec)
    assert any("network weights from t.safetensors: " in line for line in rec.lines)
    second = load_file(tmp_path / "b" / "t.safetensors")
    for k in first:
        if k.endswith("lora_up.weight"):
            name = k.rsplit(".", 2)[0]
            d1 = first[k].flatten(1) @ first[f"{name}.lora_down.weight"].flatten(1) * (float(first[f"{name}.alpha"]) / 4)
            d2 = second[k].flatten(1) @ second[f"{name}.lora_down.weight"].flatten(1) * (float(second[f"{name}.alpha"]) / 4)
            assert torch.allclose(d1, d2, atol=1e-6), name
    with pytest.raises(ConfigError, match="set network_dim.* to 4"):
        run_train(quick_config(tiny_files["sd1_file"], dataset, tmp_path / "c", max_train_steps=1, network_dim=8,
                               network_weights=str(tmp_path / "a" / "t.safetensors")))


def test_a_schedule_free_optimizer_trains_and_saves_its_averaged_weights(tiny_files, dataset, tmp_path):
    rec = RecordingReporter()
    result = run_train(quick_config(tiny_files["sd1_file"], dataset, tmp_path / "sf", max_train_steps=3,
                                    optimizer_type="AdamWScheduleFree", learning_rate=1e-3), rec)
    assert result.global_step == 3 and all(m["loss"] > 0 for m in rec.metrics)
    sd = load_file(result.lora_path)
    assert any(sd[k].abs().max() > 0 for k in sd if k.endswith("lora_up.weight"))
    meta = read_safetensors_metadata(result.lora_path)
    assert meta["ss_optimizer"] == "AdamWScheduleFree"


def test_scale_weight_norms_caps_every_module(tiny_files, dataset, tmp_path):
    def deltas(sd):
        out = []
        for k in sd:
            if k.endswith("lora_up.weight"):
                name = k.rsplit(".", 2)[0]
                up, down = sd[k].float(), sd[f"{name}.lora_down.weight"].float()
                out.append(float((up.flatten(1) @ down.flatten(1)).norm() * float(sd[f"{name}.alpha"]) / down.shape[0]))
        return out

    run_train(quick_config(tiny_files["sd1_file"], dataset, tmp_path / "free", max_train_steps=3, learning_rate=1e-2))
    free = deltas(load_file(tmp_path / "free" / "t.safetensors"))
    cap = sorted(free)[len(free) // 2]  # the median: half the modules must be scaled
    rec = RecordingReporter()
    run_train(quick_config(tiny_files["sd1_file"], dataset, tmp_path / "cap", max_train_steps=3, learning_rate=1e-2,
                           scale_weight_norms=cap), rec)
    capped = deltas(load_file(tmp_path / "cap" / "t.safetensors"))
    assert max(capped) <= cap * 1.001 < max(free)
    assert rec.metrics[-1]["keys_scaled"] > 0 and rec.metrics[-1]["max_key_norm"] <= cap * 1.001
    assert read_safetensors_metadata(tmp_path / "cap" / "t.safetensors")["ss_scale_weight_norms"] == str(cap)


def test_cache_text_encoder_outputs_trains_the_same_without_the_encoders(tiny_files, dataset, tmp_path):
    kw = dict(max_train_steps=3, network_train_unet_only=True)
    run_train(quick_config(tiny_files["sd1_file"], dataset, tmp_path / "a", **kw))
    rec = RecordingReporter()
    run_train(quick_config(tiny_files["sd1_file"], dataset, tmp_path / "b", cache_text_encoder_outputs=True, **kw), rec)
    captions = {p.read_text().strip() for p in dataset.rglob("*.txt")}
    assert ("caching text encoder outputs", len(captions)) in rec.phases  # each distinct caption encoded once, up front
    a, b = load_file(tmp_path / "a" / "t.safetensors"), load_file(tmp_path / "b" / "t.safetensors")
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
    with pytest.raises(ConfigError, match="shuffle_caption"):
        quick_config(tiny_files["sd1_file"], dataset, tmp_path / "c", cache_text_encoder_outputs=True, shuffle_caption=True,
                     **kw).check(ready=False)
    with pytest.raises(ConfigError, match="network_train_unet_only"):
        quick_config(tiny_files["sd1_file"], dataset, tmp_path / "c", cache_text_encoder_outputs=True).check(ready=False)


@pytest.mark.parametrize("fam", ["sd1", "sdxl"])
def test_max_token_length_encodes_windows_of_75_tokens(tiny_files, fam):
    from loratrain.core.models.loading import load_model
    from loratrain.training.conditioning import encode_prompts

    model = load_model(tiny_files[f"{fam}_file"])
    short = ["a red circle on a white background"]
    with torch.no_grad():
        plain = encode_prompts(model, short)
        wide = encode_prompts(model, short, max_token_length=225)
    assert plain.hidden.shape[1] == 77 and wide.hidden.shape[1] == 227
    # a short caption's first window is exactly the plain 77-token encoding
    assert torch.allclose(wide.hidden[:, :76], plain.hidden[:, :76], atol=1e-6)
    if fam == "sdxl":
        assert torch.allclose(wide.pooled, plain.pooled, atol=1e-6)  # pooled from the first window, as sd-scripts
    words = ", ".join(f"tag{i}" for i in range(25))  # about 100 tokens: past the first window, inside the second
    with torch.no_grad():
        cut = encode_prompts(model, [words + ", tail words here"])
        a = encode_prompts(model, [words + ", tail words here"], max_token_length=150)
        b = encode_prompts(model, [words + ", other ending entirely"], max_token_length=150)
    assert a.hidden.shape[1] == 152 and not torch.allclose(a.hidden[:, 76:], b.hidden[:, 76:])  # the second window is read
    assert cut.hidden.shape[1] == 77  # without it, the caption is cut at 75 tokens as before


def test_training_with_225_tokens(tiny_files, dataset, tmp_path):
    result = run_train(quick_config(tiny_files["sdxl_file"], dataset, tmp_path / "o", max_train_steps=2, max_token_length=225))
    assert read_safetensors_metadata(result.lora_path)["ss_max_token_length"] == "225"


@pytest.mark.parametrize("precision,full", [("bf16", False), ("bf16", True), ("fp16", True)])
def test_full_bf16_trains_the_adapters_in_bf16(tiny_files, dataset, tmp_path, precision, full):
    from loratrain.core.progress import StopFlag
    from loratrain.training.trainer import LoRATrainer

    fp16_eps = {"optimizer_args": ["eps=1e-4"]} if precision == "fp16" else {}  # AdamW's 1e-8 is 0 in fp16
    cfg = quick_config(tiny_files["sd1_file"], dataset, tmp_path / "o", max_train_steps=2, mixed_precision=precision,
                       **{f"full_{precision}": full}, **fp16_eps)
    trainer = LoRATrainer(cfg.check(), RecordingReporter(), StopFlag())
    trainer.setup()
    result = trainer.run()
    dtypes = {p.dtype for g in trainer.optimizer.param_groups for p in g["params"]}
    assert dtypes == ({torch.bfloat16 if precision == "bf16" else torch.float16} if full else {torch.float32})
    assert result.global_step == 2 and all(torch.isfinite(torch.tensor(result.losses)))
    assert any(v.abs().max() > 0 for k, v in load_file(result.lora_path).items() if k.endswith("lora_up.weight"))


def test_a_wrong_network_weights_file_or_scheduler_argument_is_named_before_loading(tiny_files, dataset, tmp_path):
    for args, named in ((["--network_weights", str(tiny_files["sd1_file"])], "holds no kohya LoRA modules"),
                        (["--lr_scheduler", "piecewise_constant", "--lr_scheduler_args", "step_rules=abc"], "lr_scheduler_args")):
        res = cli("--pretrained_model_name_or_path", str(tiny_files["sd1_file"]), "--train_data_dir", str(dataset),
                  "--output_dir", str(tmp_path / "o"), *args, timeout=120)
        assert res.returncode == 2 and named in res.stderr and "Traceback" not in res.stderr, res.stderr
        assert "model:" not in res.stdout and not (tmp_path / "o").exists()


def test_a_separate_vae_file_replaces_the_models_own(tiny_files, dataset, tmp_path):
    """--vae with an A1111-style VAE file (LDM keys, no prefix): the latents are that VAE's; a wrong file is named."""
    from safetensors.torch import save_file

    from loratrain.core.models.families import VAE_PREFIX
    from loratrain.training.trainer import LoRATrainer

    ckpt = load_file(str(tiny_files["sd1_file"]))
    vae = {k[len(VAE_PREFIX):]: (v * 1.01 if v.is_floating_point() else v).contiguous() for k, v in ckpt.items()
           if k.startswith(VAE_PREFIX)}
    path = tmp_path / "other_vae.safetensors"
    save_file(vae, str(path))
    prompts = tmp_path / "p.txt"
    prompts.write_text("a circle --s 1\n")
    cfg = quick_config(tiny_files["sd1_file"], dataset, tmp_path / "o", vae=str(path), sample_prompts=str(prompts), max_train_steps=1)
    trainer = LoRATrainer(cfg, RecordingReporter(), StopFlag())
    trainer.setup()
    enc = trainer.model.vae.encoder.conv_in.weight.detach().float().cpu()
    assert torch.allclose(enc, vae["encoder.conv_in.weight"].float(), atol=1e-6)
    trainer.run()
    assert read_safetensors_metadata(tmp_path / "o" / "t.safetensors")["ss_vae_name"] == "other_vae.safetensors"
    not_vae = tmp_path / "not_vae.safetensors"
    save_file({"x": torch.zeros(2)}, str(not_vae))
    with pytest.raises(ConfigError, match="not_vae.safetensors: not a VAE file"):
        quick_config(tiny_files["sd1_file"], dataset, tmp_path / "o2", vae=str(not_vae)).check()


def test_the_old_optimizer_switches_choose_the_optimizer():
    assert TrainConfig.build({"use_8bit_adam": True}, check=False).optimizer_type == "AdamW8bit"
    assert TrainConfig.build({"use_lion_optimizer": True}, check=False).optimizer_type == "Lion"
    assert TrainConfig.build({"use_lion_optimizer": False}, check=False).optimizer_type == "AdamW"
    with pytest.raises(ConfigError, match="optimizer_type is Prodigy"):
        TrainConfig.build({"use_8bit_adam": True, "optimizer_type": "Prodigy"}, check=False)


def test_lr_scheduler_type_builds_a_torch_scheduler_class_and_nothing_else(tiny_files, dataset, tmp_path):
    rec = RecordingReporter()
    run_train(quick_config(tiny_files["sd1_file"], dataset, tmp_path / "o", max_train_steps=3, learning_rate=1e-3,
                           lr_scheduler_type="StepLR", lr_scheduler_args=["step_size=1", "gamma=0.5"]), rec)
    lrs = [m["lr_unet"] for m in rec.metrics if "lr_unet" in m]
    assert lrs == pytest.approx([5e-4, 2.5e-4, 1.25e-4])  # halved after every step, as StepLR(step_size=1, gamma=0.5)
    for bad in ("os.system", "torch.optim.lr_scheduler._LRScheduler.__init__", "mypackage.MyScheduler"):
        with pytest.raises(ConfigError, match="not a class of torch.optim.lr_scheduler"):
            quick_config(tiny_files["sd1_file"], dataset, tmp_path / "o", lr_scheduler_type=bad).check()
