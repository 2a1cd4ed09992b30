"""sd-scripts and kohya_ss GUI compatibility: what every sd-scripts option means here.

A kohya user's `config_lora-*.toml` (written by the kohya_ss GUI since v24, flat keys named after
sd-scripts' arguments) and their command line must run unchanged. Every one of sd-scripts'
`train_network.py` / `sdxl_train_network.py` options is therefore in exactly one place:

- a `TrainConfig` field of the same name (implemented, with sd-scripts' meaning);
- `TRANSLATED`: spelled differently here (`network_args` -> conv_dim/conv_alpha, `save_model_as`);
- `SAME`: what loratrain always does anyway (SDPA attention, latents cached, fp32 VAE): accepted;
- `IGNORED`: no effect here (GUI bookkeeping, data-loader workers, console logging): accepted
  and named in one log line, where sd-scripts would keep them silently;
- `REFUSED`: not implemented; a config that turns one *on* fails before any model loads with
  the reason, and one that leaves it off (the GUI writes `false`/0 for everything) is accepted.

Unknown keys that are none of these (a typo) stay errors.
"""
from __future__ import annotations

from typing import Any

# sd-scripts 48d368fa: every argument of train_network.py and sdxl_train_network.py
SD_SCRIPTS_FLAGS = """
console_log_level console_log_file console_log_simple v2 v_parameterization pretrained_model_name_or_path
tokenizer_cache_dir metadata_title metadata_author metadata_description metadata_license metadata_tags
metadata_usage_hint metadata_thumbnail metadata_merged_from metadata_trigger_phrase metadata_preprocessor
metadata_is_negative_embedding train_data_dir cache_info shuffle_caption caption_separator caption_extension
caption_extention keep_tokens keep_tokens_separator secondary_separator enable_wildcard caption_prefix
caption_suffix color_aug flip_aug face_crop_aug_range random_crop debug_dataset resolution cache_latents
vae_batch_size cache_latents_to_disk skip_cache_check enable_bucket min_bucket_reso max_bucket_reso
bucket_reso_steps bucket_no_upscale resize_interpolation token_warmup_min token_warmup_step alpha_mask
dataset_class caption_dropout_rate caption_dropout_every_n_epochs caption_tag_dropout_rate reg_data_dir
in_json dataset_repeats output_dir output_name huggingface_repo_id huggingface_repo_type
huggingface_path_in_repo huggingface_token huggingface_repo_visibility save_state_to_huggingface
resume_from_huggingface async_upload save_precision save_every_n_epochs save_every_n_steps save_n_epoch_ratio
save_last_n_epochs save_last_n_epochs_state save_last_n_steps save_last_n_steps_state save_state
save_state_on_train_end resume train_batch_size max_token_length mem_eff_attn torch_compile dynamo_backend
xformers sdpa vae max_train_steps max_train_epochs max_data_loader_n_workers persistent_data_loader_workers
seed gradient_checkpointing gradient_accumulation_steps mixed_precision full_fp16 full_bf16 fp8_base
ddp_timeout ddp_gradient_as_bucket_view ddp_static_graph clip_skip logging_dir log_with log_prefix
log_tracker_name wandb_run_name log_tracker_config wandb_api_key log_config noise_offset
noise_offset_random_strength multires_noise_iterations ip_noise_gamma ip_noise_gamma_random_strength
multires_noise_discount adaptive_noise_scale zero_terminal_snr min_timestep max_timestep loss_type
huber_schedule huber_c huber_scale lowram highvram sample_every_n_steps sample_at_first sample_every_n_epochs
sample_prompts sample_sampler config_file output_config conditioning_data_dir prior_loss_weight masked_loss
deepspeed zero_stage offload_optimizer_device offload_optimizer_nvme_path offload_param_device
offload_param_nvme_path zero3_init_flag zero3_save_16bit_model fp16_master_weights_and_gradients
optimizer_type use_8bit_adam use_lion_optimizer learning_rate max_grad_norm optimizer_args lr_scheduler_type
lr_scheduler_args lr_scheduler lr_warmup_steps lr_decay_steps lr_scheduler_num_cycles lr_scheduler_power
fused_backward_pass lr_scheduler_timescale lr_scheduler_min_lr_ratio dataset_config min_snr_gamma
scale_v_pred_loss_like_noise_pred v_pred_like_loss debiased_estimation_loss weighted_captions
cpu_offload_checkpointing no_metadata save_model_as unet_lr text_encoder_lr fp8_base_unet network_weights
network_module network_dim network_alpha network_dropout network_args network_train_unet_only
network_train_text_encoder_only training_comment dim_from_weights scale_weight_norms base_weights
base_weights_multiplier no_half_vae skip_until_initial_step initial_epoch initial_step validation_seed
validation_split validate_every_n_steps validate_every_n_epochs max_validation_steps
disable_mmap_load_safetensors cache_text_encoder_outputs cache_text_encoder_outputs_to_disk
""".split()

# keys the kohya_ss GUI writes into its TOML that sd-scripts does not define (and ignores)
GUI_KEYS = {
    "epoch": "the GUI has already turned it into max_train_steps",
    "noise_offset_type": "the GUI's choice between noise_offset and multires noise; both are read directly",
    "LoRA_type": "the GUI's network choice; network_module and network_args say it",
    "additional_parameters": "the GUI's free-form extra flags; put them in the TOML as keys",
}

SAME = {
    "sdpa": "diffusers' attention already runs on PyTorch SDPA",
    "mem_eff_attn": "diffusers' attention already runs on PyTorch SDPA (memory-efficient kernels)",
    "cache_latents": "latents are always cached before training",
    "no_half_vae": "the VAE always encodes in fp32",
    "save_state": "a resumable state is written with every save",
    "save_state_on_train_end": "a resumable state is written with the final save",
    "v2": "the model family (SD1/SD2/SDXL) is read from the checkpoint",
    "caption_extention": "old spelling of caption_extension",
    "disable_mmap_load_safetensors": "checkpoints are read lazily either way",
}

IGNORED = {
    "max_data_loader_n_workers": "no data loader workers: latents are cached in memory before the first step",
    "persistent_data_loader_workers": "no data loader workers: latents are cached in memory before the first step",
    "vae_batch_size": "latents are cached one image at a time",
    "skip_cache_check": "cached latents are checked by image hash, which is cheap",
    "console_log_level": "console output is loratrain's own",
    "console_log_file": "console output is loratrain's own",
    "console_log_simple": "console output is loratrain's own",
    "highvram": "no effect: latents stay in RAM and batches move to the device as needed",
    "lowram": "no effect: the base model is read lazily from its file",
    "log_config": "the full config is saved in each training state (state.json)",
    "log_prefix": "TensorBoard runs are named after output_name",
    "wandb_run_name": "only wandb uses it, and log_with wandb is not supported",
    "wandb_api_key": "only wandb uses it, and log_with wandb is not supported",
    "log_tracker_name": "TensorBoard runs are named after output_name",
    "log_tracker_config": "only for wandb",
    "ddp_timeout": "multi-process settings come from accelerate's own config",
    "ddp_gradient_as_bucket_view": "gradients are all-reduced by loratrain itself, not by DDP",
    "ddp_static_graph": "gradients are all-reduced by loratrain itself, not by DDP",
    "debug_dataset": "use `loratrain check` to inspect a dataset",
    "output_config": "use `loratrain train --print_config`",
    "tokenizer_cache_dir": "tokenizers are read from the model itself, never downloaded",
    "save_last_n_epochs_state": "one resumable state is kept (the newest), written atomically",
    "save_last_n_steps_state": "one resumable state is kept (the newest), written atomically",
    "config_file": "already read",
    "cache_info": "image sizes are read while the latents are cached (and kept with them on disk)",
}

# off-values are accepted; any other value fails with this reason
REFUSED = {
    "face_crop_aug_range": "not implemented yet",
    "in_json": "fine-tuning metadata JSON is not supported; use folders or a dataset TOML",
    "dataset_class": "custom dataset classes are not supported",
    "dataset_repeats": "only for in_json datasets, which are not supported",
    "log_with": "only TensorBoard is supported (always on; see logging_dir)",
    "no_metadata": "the metadata is always written (it carries no paths)",
    "huggingface_repo_id": "uploading is not supported: loratrain works offline",
    "huggingface_repo_type": "uploading is not supported: loratrain works offline",
    "huggingface_path_in_repo": "uploading is not supported: loratrain works offline",
    "huggingface_token": "uploading is not supported: loratrain works offline",
    "huggingface_repo_visibility": "uploading is not supported: loratrain works offline",
    "save_state_to_huggingface": "uploading is not supported: loratrain works offline",
    "resume_from_huggingface": "downloading is not supported: loratrain works offline",
    "async_upload": "uploading is not supported: loratrain works offline",
    "skip_until_initial_step": "use resume (it continues exactly where a run stopped)",
    "initial_epoch": "use resume (it continues exactly where a run stopped)",
    "initial_step": "use resume (it continues exactly where a run stopped)",
    "deepspeed": "DeepSpeed is not supported",
    "zero_stage": "DeepSpeed is not supported",
    "offload_optimizer_device": "DeepSpeed is not supported",
    "offload_optimizer_nvme_path": "DeepSpeed is not supported",
    "offload_param_device": "DeepSpeed is not supported",
    "offload_param_nvme_path": "DeepSpeed is not supported",
    "zero3_init_flag": "DeepSpeed is not supported",
    "zero3_save_16bit_model": "DeepSpeed is not supported",
    "fp16_master_weights_and_gradients": "DeepSpeed is not supported",
}

# values that mean "off" for a refused option (besides false, 0, "", [] and None)
OFF_VALUES: dict[str, tuple[Any, ...]] = {
    "log_with": ("tensorboard",),
    "huggingface_repo_visibility": ("private", "public"),
    "zero_stage": (2,),
}

NETWORK_ARGS = {"conv_dim": "conv_dim", "conv_alpha": "conv_alpha", "unit": "dylora_unit", "block_size": "dylora_unit",
                "enable_all_linear": "enable_all_linear", "enable_conv": "enable_conv",
                "train_blocks": "train_blocks", "split_qkv": "split_qkv", "in_dims": "in_dims", "train_t5xxl": "train_t5xxl",
                "train_block_indices": "train_block_indices", "emb_dims": "emb_dims",  # sd-scripts' lora_sd3
                **{k: k for k in ("block_dims", "block_alphas", "conv_block_dims", "conv_block_alphas", "down_lr_weight",
                                  "mid_lr_weight", "up_lr_weight", "block_lr_zero_threshold", "rank_dropout", "module_dropout",
                                  "loraplus_lr_ratio", "loraplus_unet_lr_ratio", "loraplus_text_encoder_lr_ratio")}}


def lycoris_algos() -> dict[str, str]:
    """LyCORIS' `algo=` values and the network kind each one is here (each kind declares its own)."""
    from .networks import network_kinds

    return {k.lycoris_algo: k.name for k in network_kinds() if k.lycoris_algo}


#: network_module spellings that leave the kind to network_args (algo=, dora_wd=)
GENERIC_MODULES = {"", "lora", "networks.lora", "lycoris.kohya"}
#: LyCORIS arguments (the kohya_ss GUI writes most of them for every LyCORIS run): accepted at the values that
#: are what loratrain does anyway, refused with the reason at any other value
NETWORK_ARGS_AS_HERE: dict[str, tuple[tuple[str, ...], str]] = {
    "factor": (("-1",), "LoKr's factor is LyCORIS' default (-1, most balanced) here; not settable yet"),
    "train_on_input": (("true", "1"), "(IA)^3 here always trains the input side (the output side would scale the bias too)"),
    "wd_on_output": (("true", "1"), "DoRA here is per output channel"),
    "use_tucker": (("false", "0"), "not implemented yet"),
    "use_cp": (("false", "0"), "not implemented yet"),
    "decompose_both": (("false", "0"), "not implemented yet"),
    "bypass_mode": (("false", "0"), "not implemented yet"),
    "use_scalar": (("false", "0"), "not implemented yet"),
    "rank_dropout_scale": (("false", "0"), "not implemented yet"),
    "train_norm": (("false", "0"), "not implemented yet"),
    "preset": (("full", "attn-mlp"), "LyCORIS presets other than full / attn-mlp are not implemented"),
}
#: network_args that are switches, and the words they take (any case); any other value is refused, not read as false
SWITCH_WORDS = {"true": True, "1": True, "yes": True, "false": False, "0": False, "no": False}
SWITCH_NETWORK_ARGS = {"dora_wd", "enable_all_linear", "enable_conv"} | {
    k for k, (values, _) in NETWORK_ARGS_AS_HERE.items() if values[0] in ("true", "false")}
#: accepted values that still differ from LyCORIS in what they train: named in the log
NETWORK_ARGS_NOTES = {"preset": "loratrain targets sd-scripts' modules (transformer blocks; ResNet convolutions with "
                                "conv_dim), not LyCORIS' preset lists"}

TRANSLATED = {"network_args": "conv_dim/conv_alpha -> LoCon, algo=loha/lokr/locon/ia3/dylora -> that kind, dora_wd=True -> dora, "
                              "unit -> DyLoRA, block dims/alphas/lr weights, rank/module dropout, LoRA+ ratios, OFT's "
                              "enable_all_linear/enable_conv -> the options of the same names; others refused by name",
              "save_model_as": "safetensors only; ckpt/pt refused (pickles), diffusers -> save_peft_format",
              "use_8bit_adam": "optimizer_type AdamW8bit", "use_lion_optimizer": "optimizer_type Lion"}
OPTIMIZER_SWITCHES = {"use_8bit_adam": "AdamW8bit", "use_lion_optimizer": "Lion"}
SAVE_MODEL_AS = {"ckpt": "a pickle (unsafe to load); loratrain writes .safetensors only",
                 "pt": "a pickle (unsafe to load); loratrain writes .safetensors only",
                 "diffusers": "use save_peft_format = true for a diffusers/PEFT copy beside the .safetensors",
                 "diffusers_safetensors": "use save_peft_format = true for a diffusers/PEFT copy beside the .safetensors"}



def is_off(name: str, value: Any) -> bool:
    if value is None or value is False or value == "" or value == [] or value == {}:
        return True
    if isinstance(value, (int, float)) and not isinstance(value, bool) and value == 0:
        return True
    return value in OFF_VALUES.get(name, ())


def translate(flat: dict[str, Any], fields: set[str]) -> tuple[dict[str, Any], list[str], list[tuple[str, str]]]:
    """sd-scripts / GUI keys -> our fields: (data, log lines, problems). Unknown keys are left for the caller."""
    data, problems = dict(flat), []
    accepted: dict[tuple[str, str], list[str]] = {}

    def note(reason: str, key: str, verb: str = "ignored") -> None:
        accepted.setdefault((verb, reason), []).append(key)

    for key in sorted(set(data) - fields):
        value = data[key]
        if key == "network_args":
            more, arg_notes = _network_args(value, data)
            problems += more
            for text in arg_notes:
                note(text, "network_args", "accepted")
        elif key in OPTIMIZER_SWITCHES:  # sd-scripts' old switches: optimizer_type must then be unset
            if not is_off(key, value):
                chosen = str(data.get("optimizer_type") or "")
                if chosen and chosen.lower() != OPTIMIZER_SWITCHES[key].lower():
                    problems.append((key, f"sets optimizer_type {OPTIMIZER_SWITCHES[key]}, but optimizer_type is {chosen}"))
                data["optimizer_type"] = OPTIMIZER_SWITCHES[key]
        elif key == "save_model_as":
            if str(value).lower() not in ("safetensors", ""):
                problems.append(("save_model_as", f"{value!r}: {SAVE_MODEL_AS.get(str(value).lower(), 'unknown format')}"))
        elif key in GUI_KEYS:
            note(f"kohya_ss GUI key(s), {GUI_KEYS[key]}", key)
        elif key in SAME:
            note(SAME[key], key, "accepted")
        elif key in IGNORED:
            note(IGNORED[key], key)
        elif key in REFUSED:
            if is_off(key, value):
                note("off, as here", key, "accepted")
            else:
                problems.append((key, f"{value!r}: sd-scripts option {REFUSED[key]}"))
        else:
            continue  # not a known sd-scripts key: the caller reports it as unknown
        data.pop(key)
    logs = [f"{verb} {', '.join(keys)}: {reason}" for (verb, reason), keys in accepted.items()]
    return data, logs, problems


def _network_args(value: Any, data: dict[str, Any]) -> tuple[list[tuple[str, str]], list[str]]:
    """network_args -> our options: (problems, log notes). `algo=` is read first, so `dora_wd` and the rest apply to
    the kind it names whatever their order (the GUI writes algo last)."""
    items = [str(i) for i in (value if isinstance(value, list) else str(value).split())]
    items.sort(key=lambda item: item.partition("=")[0].strip() != "algo")
    problems: list[tuple[str, str]] = []
    notes: list[str] = []
    for item in items:
        key, sep, val = item.partition("=")
        key, val = key.strip(), val.strip()
        given = val  # as the user wrote it, for messages
        if key in SWITCH_NETWORK_ARGS and val.lower() in SWITCH_WORDS:
            val = str(SWITCH_WORDS[val.lower()]).lower()  # "true" / "false" from here on
        if not sep:
            problems.append(("network_args", f"{item!r} is not key=value"))
        elif key in SWITCH_NETWORK_ARGS and val not in ("true", "false"):
            problems.append(("network_args", f"{key}={val}: a switch; give true or false (1/0, yes/no)"))
        elif key == "algo":
            algos = lycoris_algos()
            if val.lower() not in algos:
                problems.append(("network_args", f"algo={val}: LyCORIS algorithms here are {', '.join(algos)} "
                                                 "(full, glora, diag-oft, boft are not implemented yet; sd-scripts' "
                                                 "networks.oft is network_module oft)"))
            elif str(data.get("network_module", "")) in GENERIC_MODULES:
                data["network_module"] = algos[val.lower()]
            else:
                problems.append(("network_args", f"algo={val} disagrees with network_module = {data['network_module']}"))
        elif key == "dora_wd":
            if str(val).lower() in ("true", "1"):
                if str(data.get("network_module", "")) in GENERIC_MODULES | {"locon"}:
                    data["network_module"] = "dora"
                else:
                    problems.append(("network_args", f"dora_wd with {data['network_module']}: DoRA is implemented on LoRA only"))
        elif key in NETWORK_ARGS:
            field = NETWORK_ARGS[key]
            if data.get(field) not in (None, "") and str(data[field]) != val:
                problems.append(("network_args", f"{key}={val} disagrees with {field} = {data[field]}"))
            else:
                data[field] = val
        elif key in NETWORK_ARGS_AS_HERE:
            accepted, reason = NETWORK_ARGS_AS_HERE[key]
            if val.lower() not in accepted:
                problems.append(("network_args", f"{key}={given}: {reason}"))
            elif key in NETWORK_ARGS_NOTES:
                notes.append(f"{key}={val}: {NETWORK_ARGS_NOTES[key]}")
        else:
            problems.append(("network_args", f"{key}: not a network argument of sd-scripts' networks.lora or LyCORIS"))
    return problems, notes


def cli_value(values: list[str]) -> Any:
    """A compat flag's values as the TOML would hold them: a switch is true, one value is typed, more a list."""
    def typed(text: str) -> Any:
        for parse in (int, float):
            try:
                return parse(text)
            except ValueError:
                pass
        return {"true": True, "false": False}.get(text.lower(), text)

    if not values:
        return True
    if len(values) == 1:
        return typed(values[0])
    return [typed(v) for v in values]


def flag_table(fields: set[str]) -> list[tuple[str, str, str]]:
    """(flag, implemented | same | ignored | refused | translated, reason) for each of sd-scripts' flags."""
    out = []
    for name in SD_SCRIPTS_FLAGS:
        if name in fields:
            out.append((name, "implemented", ""))
        elif name in TRANSLATED:
            out.append((name, "translated", TRANSLATED[name]))
        elif name in SAME:
            out.append((name, "same", SAME[name]))
        elif name in IGNORED:
            out.append((name, "ignored", IGNORED[name]))
        else:
            out.append((name, "refused", REFUSED.get(name, "not implemented yet")))
    return out


HEADER = """# sd-scripts' flags in loratrain

Generated from `loratrain/training/kohya.py` (`LORATRAIN_WRITE_DOCS=1 pytest tests/test_kohya_compat.py -k flag_document`)
(sd-scripts 48d368fa: the 196 flags of `train_network.py` and `sdxl_train_network.py`).

- implemented: a `loratrain train` option of the same name, with sd-scripts' meaning
- translated: spelled differently here
- same: what loratrain always does; accepted and named in the log
- ignored: no effect here; accepted and named in the log
- refused: not implemented; accepted when off (false, 0, empty), refused with this reason when on
"""


def flag_document() -> str:
    from .config import TrainConfig

    rows = flag_table(set(TrainConfig.model_fields))
    counts = ", ".join(f"{s}: {sum(r[1] == s for r in rows)}" for s in ("implemented", "translated", "same", "ignored", "refused"))
    lines = [HEADER, counts, "", "| flag | here | why |", "|---|---|---|"]
    lines += [f"| `--{name}` | {status} | {why} |" for name, status, why in rows]
    return "\n".join(lines) + "\n"


# dataset TOML keys sd-scripts accepts that are not implemented here (off values accepted)
DATASET_REFUSED = {
    "face_crop_aug_range": REFUSED["face_crop_aug_range"],
    "custom_attributes": "not implemented yet",
    "metadata_file": "fine-tuning metadata JSON is not supported; use image folders with caption files",
    "network_multiplier": "not implemented yet",
}


def dataset_key_problem(key: str, value: Any) -> str | None:
    """None when a dataset TOML key of sd-scripts can be dropped (off), else why it is refused."""
    if key not in DATASET_REFUSED or is_off(key, value):
        return None
    return f"{key} = {value!r}: {DATASET_REFUSED[key]}"
