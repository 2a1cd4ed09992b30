"""The `ss_*` and `modelspec.*` metadata sd-scripts writes, so other tools recognise our LoRAs."""
from __future__ import annotations

import datetime as dt
import json
import time
from collections import Counter
from pathlib import Path
from typing import Any

from loratrain.core.models.loading import SDModel

from .config import TrainConfig


def dataset_metadata(data: Any) -> dict:
    """Folder counts, tag frequencies and buckets for the ss_* metadata: fixed for the run, so computed once.

    Keyed by folder name (`10_sks dog`) as sd-scripts: never the path of this machine.
    """
    items = data.items()
    dirs: dict[str, dict] = {}
    reg_dirs: dict[str, dict] = {}
    for spec in data.specs:
        for sub in spec.subsets:
            target = reg_dirs if sub.is_reg else dirs
            target[Path(sub.image_dir).name] = {"n_repeats": sub.num_repeats, "img_count": sum(it.subset is sub for it in items)}
    freq: dict[str, Counter] = {}
    for it in items:
        sep = it.subset.caption_separator
        freq.setdefault(Path(it.subset.image_dir).name, Counter()).update(t.strip() for t in it.caption.split(sep) if t.strip())
    buckets: dict[tuple[int, int], int] = {}
    errors = []
    for it in items:
        buckets[it.bucket] = buckets.get(it.bucket, 0) + it.repeats
        if it.original_size[1]:
            errors.append(abs(it.bucket[0] / it.bucket[1] - it.original_size[0] / it.original_size[1]))
    info = {"buckets": {str(i): {"resolution": list(b), "count": n} for i, (b, n) in enumerate(sorted(buckets.items()))},
            "mean_img_ar_error": sum(errors) / len(errors) if errors else 0.0}
    return {"dirs": dirs, "reg_dirs": reg_dirs, "tag_frequency": {k: dict(v) for k, v in freq.items()}, "bucket_info": info}


# keys sd-scripts only writes when they have a value; every other unset key is written as "None", as it does
WRITTEN_ONLY_WHEN_SET = {"ss_vae_name", "ss_network_args", "ss_sd_model_hash", "ss_new_sd_model_hash", "ss_reg_dataset_dirs", "modelspec.author",
                         "modelspec.description", "modelspec.license", "modelspec.tags", "modelspec.usage_hint",
                         "modelspec.trigger_phrase", "modelspec.merged_from", "modelspec.preprocessor",
                         "modelspec.is_negative_embedding", "modelspec.thumbnail"}


def _metadata_module(network_kind: str) -> str:
    """ss_network_module as sd-scripts writes it for this kind (networks.lora, networks.oft, lycoris.kohya, ...)."""
    from .networks import NETWORKS

    return NETWORKS.get(network_kind).metadata_module


def lora_metadata(cfg: TrainConfig, model: SDModel, network_kind: str, network_args: dict[str, Any], plan: Any,
                  session: dict[str, Any], epoch: int, step: int, dataset: dict[str, Any], num_processes: int = 1) -> dict[str, str]:
    """Every key sd-scripts' train_network.py writes (legacy folder layout); folders by name only.

    `dataset` holds `dirs`, `reg_dirs`, `tag_frequency` and `bucket_info`, keyed by folder *name*
    (`10_sks dog`), never by path: a LoRA is shared, and the path of the trainer's machine (a user
    name, a client's project) must not travel with it.
    """
    v_pred = model.prediction_type == "v_prediction"
    fam = model.family
    version = fam.base_model_version + ("_v" if fam.name == "sd2" and v_pred else "")
    arch = fam.modelspec_arch
    if fam.name == "sd2":
        arch = "stable-diffusion-v2-768-v" if v_pred else "stable-diffusion-v2-512"
    res = cfg.resolution_wh()
    meta: dict[str, Any] = {
        "ss_session_id": session["id"],
        "ss_training_started_at": session["started"],
        "ss_training_finished_at": time.time(),
        "ss_output_name": cfg.output_name,
        "ss_learning_rate": cfg.learning_rate,
        "ss_unet_lr": cfg.unet_lr if cfg.unet_lr is not None else cfg.learning_rate,
        "ss_text_encoder_lr": (cfg.text_encoder_lr[0] if len(cfg.text_encoder_lr) == 1 else cfg.text_encoder_lr) or cfg.learning_rate,
        "ss_num_train_images": plan.train_samples,
        "ss_num_reg_images": plan.reg_samples,
        "ss_num_batches_per_epoch": plan.batches_per_epoch,
        "ss_num_epochs": plan.epochs,
        "ss_max_train_steps": plan.max_train_steps,
        "ss_epoch": epoch,  # 1 for a file saved during the first epoch, as sd-scripts
        "ss_steps": step,
        "ss_gradient_checkpointing": cfg.gradient_checkpointing,
        "ss_gradient_accumulation_steps": cfg.gradient_accumulation_steps,
        "ss_lr_warmup_steps": cfg.lr_warmup_steps,
        "ss_lr_scheduler": cfg.lr_scheduler,
        "ss_network_module": _metadata_module(network_kind),
        "ss_network_dim": cfg.network_dim,
        "ss_network_alpha": cfg.network_alpha,
        "ss_network_dropout": cfg.network_dropout,
        "ss_network_args": json.dumps(network_args) if network_args else None,
        "ss_mixed_precision": cfg.mixed_precision,
        "ss_full_fp16": cfg.full_fp16,
        "ss_fp8_base": cfg.fp8_base,
        "ss_fp8_base_unet": cfg.fp8_base_unet,
        "ss_v2": fam.name == "sd2",
        "ss_base_model_version": version,
        "ss_clip_skip": cfg.clip_skip,
        "ss_vae_name": Path(cfg.vae).name if cfg.vae else None,
        "ss_max_token_length": cfg.max_token_length,
        "ss_cache_latents": True,
        "ss_seed": cfg.seed,
        "ss_noise_offset": cfg.noise_offset or None,
        "ss_noise_offset_random_strength": cfg.noise_offset_random_strength,
        "ss_adaptive_noise_scale": cfg.adaptive_noise_scale or None,
        "ss_multires_noise_iterations": cfg.multires_noise_iterations or None,
        "ss_multires_noise_discount": cfg.multires_noise_discount,
        "ss_min_snr_gamma": cfg.min_snr_gamma or None,
        "ss_ip_noise_gamma": cfg.ip_noise_gamma or None,
        "ss_ip_noise_gamma_random_strength": cfg.ip_noise_gamma_random_strength,
        "ss_debiased_estimation": cfg.debiased_estimation_loss,
        "ss_zero_terminal_snr": cfg.zero_terminal_snr,
        "ss_num_validation_images": plan.validation_images,
        "ss_validation_seed": cfg.validation_seed,
        "ss_validation_split": cfg.validation_split,
        "ss_max_validation_steps": cfg.max_validation_steps,
        "ss_validate_every_n_epochs": cfg.validate_every_n_epochs,
        "ss_validate_every_n_steps": cfg.validate_every_n_steps,
        "ss_loss_type": cfg.loss_type,
        "ss_huber_schedule": cfg.huber_schedule,
        "ss_huber_c": cfg.huber_c,
        "ss_huber_scale": cfg.huber_scale,
        "ss_caption_dropout_every_n_epochs": cfg.caption_dropout_every_n_epochs,
        "ss_prior_loss_weight": cfg.prior_loss_weight,
        "ss_max_grad_norm": cfg.max_grad_norm,
        "ss_scale_weight_norms": cfg.scale_weight_norms or None,
        "ss_optimizer": f"{cfg.optimizer_type}({','.join(cfg.optimizer_args)})" if cfg.optimizer_args else cfg.optimizer_type,
        "ss_caption_dropout_rate": cfg.caption_dropout_rate,
        "ss_caption_tag_dropout_rate": cfg.caption_tag_dropout_rate,
        "ss_training_comment": cfg.training_comment or None,
        "ss_sd_model_name": session["model_name"],
        "ss_resolution": f"({res[0]}, {res[1]})",
        "ss_batch_size_per_device": cfg.train_batch_size,
        "ss_total_batch_size": cfg.train_batch_size * num_processes * cfg.gradient_accumulation_steps,
        "ss_bucket_no_upscale": cfg.bucket_no_upscale,
        "ss_bucket_info": json.dumps(dataset["bucket_info"]),
        "ss_color_aug": cfg.color_aug,
        "ss_random_crop": cfg.random_crop,
        "ss_enable_bucket": cfg.enable_bucket,
        "ss_min_bucket_reso": cfg.min_bucket_reso,
        "ss_max_bucket_reso": cfg.max_bucket_reso,
        "ss_flip_aug": cfg.flip_aug,
        "ss_shuffle_caption": cfg.shuffle_caption,
        "ss_keep_tokens": cfg.keep_tokens,
        "ss_dataset_dirs": json.dumps(dataset["dirs"]),
        "ss_reg_dataset_dirs": json.dumps(dataset["reg_dirs"]) if dataset["reg_dirs"] else None,
        "ss_tag_frequency": json.dumps(dataset["tag_frequency"]),
        **session.get("model_hashes", {}),
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.architecture": arch + "/lora",
        "modelspec.implementation": "https://github.com/Stability-AI/generative-models" if fam.is_sdxl else "diffusers",
        "modelspec.title": cfg.metadata_title or cfg.output_name,
        "modelspec.author": cfg.metadata_author or None,
        "modelspec.description": cfg.metadata_description or None,
        "modelspec.license": cfg.metadata_license or None,
        "modelspec.tags": cfg.metadata_tags or None,
        "modelspec.usage_hint": cfg.metadata_usage_hint or None,
        "modelspec.trigger_phrase": cfg.metadata_trigger_phrase or None,
        "modelspec.merged_from": cfg.metadata_merged_from or None,
        "modelspec.preprocessor": cfg.metadata_preprocessor or None,
        "modelspec.is_negative_embedding": cfg.metadata_is_negative_embedding or None,
        "modelspec.thumbnail": session.get("thumbnail"),
        "modelspec.resolution": f"{res[0]}x{res[1]}",
        "modelspec.date": dt.datetime.fromtimestamp(session["started"]).isoformat(timespec="seconds"),
        "modelspec.prediction_type": "v" if v_pred else "epsilon",
    }
    return {k: str(v) for k, v in meta.items() if v is not None or k not in WRITTEN_ONLY_WHEN_SET}
