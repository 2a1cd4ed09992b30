"""`loratrain train` options, with sd-scripts names so existing TOML files and habits carry over.

Importing this module is light (no torch): the CLI builds its flags and the UI its form from it.
Names that go through a registry (network module, optimizer, scheduler, sampler) are checked
against that registry when the config is validated, before any model loads.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import ConfigDict, PrivateAttr, field_validator

from loratrain.core.captions import CaptionExtension
from loratrain.core.config import ConfigError, JobConfig, Problem, opt, parse_resolution
from loratrain.core.precision import NAMES as PRECISION_NAMES

from .kohya import GUI_KEYS, SD_SCRIPTS_FLAGS, cli_value, translate

MODEL, DATA, NET, OPTIM, NOISE, SAVE, SAMPLE, LOGS = ("Model", "Dataset", "Network", "Optimizer and schedule", "Noise and loss",
                                                    "Saving and resume", "Sampling", "Logs")
MIXED_PRECISIONS = ("no", "fp32", "fp16", "bf16")


#: the tensor suffixes that mark a module of a network kind in a file (network_weights is checked against them;
#: every other kind is stored as LoRA pairs)
WEIGHT_MARKERS = {"loha": (".hada_w1_a",), "lokr": (".lokr_w1", ".lokr_w1_a"), "ia3": (".on_input",), "oft": (".oft_blocks",)}
#: the kinds built on PEFT's LoRA layer, which take networks.lora's arguments (block dims, LoRA+, rank/module dropout)
LORA_LAYER_KINDS = ("lora", "locon", "dora", "dylora")


def _plateau(scheduler_type: str) -> bool:
    """torch's ReduceLROnPlateau: stepped with a metric (a validation loss), which the training loop has not got."""
    return scheduler_type.removeprefix("torch.optim.lr_scheduler.").lower() == "reducelronplateau"


class TrainConfig(JobConfig):
    """`loratrain train`: sd-scripts' option names; its other options (kohya.py) are accepted or refused by name."""

    COMPAT_FLAGS = tuple(SD_SCRIPTS_FLAGS) + tuple(GUI_KEYS)
    #: inf and nan are no learning rate, weight, ratio or strength: every float option must be finite
    model_config = ConfigDict(allow_inf_nan=False)
    #: a kohya_ss GUI JSON's keys for our options and the file, so its problems are named as that file spells them
    _gui: Any = PrivateAttr(default=None)

    # model
    pretrained_model_name_or_path: str = opt("", "diffusers folder, HF cache folder or single-file .safetensors checkpoint",
                                             group=MODEL, path="any")
    vae: str = opt("", "a separate VAE file (.safetensors; LDM keys as A1111's VAE files, or diffusers keys) used instead of the "
                        "model's own", group=MODEL, path="file", advanced=True)
    v_parameterization: bool | None = opt(None, "v-prediction target (SD2 768-v); default: from the model", group=MODEL, advanced=True)
    allow_pickle: bool = opt(False, "allow a pickled .ckpt base model (loaded with weights_only=True)", group=MODEL, advanced=True)
    # data
    train_data_dir: str = opt("", "folder of <repeats>_<class tokens> subfolders", group=DATA, path="dir")
    reg_data_dir: str = opt("", "folder of regularization <repeats>_<class> subfolders", group=DATA, path="dir")
    dataset_config: str = opt("", "sd-scripts dataset TOML (replaces train/reg_data_dir)", group=DATA, path="file")
    caption_extension: CaptionExtension = opt(".txt", "caption file extension", group=DATA)
    resolution: str = opt("512", "training resolution: N or W,H (multiples of 8)", group=DATA)
    train_batch_size: int = opt(1, "images per batch", ge=1, group=DATA)
    enable_bucket: bool = opt(False, "aspect-ratio buckets", group=DATA)
    bucket_no_upscale: bool = opt(False, "an image smaller than the resolution keeps its size: its own bucket, never upscaled "
                                  "(min/max bucket reso ignored)", group=DATA, advanced=True)
    min_bucket_reso: int = opt(256, "smallest bucket side", ge=8, group=DATA, advanced=True)
    max_bucket_reso: int = opt(1024, "largest bucket side", ge=8, group=DATA, advanced=True)
    bucket_reso_steps: int = opt(64, "bucket side step (a multiple of 8)", ge=8, group=DATA, advanced=True)
    shuffle_caption: bool = opt(False, "shuffle comma-separated tags", group=DATA)
    keep_tokens: int = opt(0, "leading tags kept in place when shuffling", ge=0, group=DATA)
    keep_tokens_separator: str = opt("", "tags before this separator stay fixed (instead of keep_tokens)", group=DATA, advanced=True)
    caption_separator: str = opt(",", "separator between tags", group=DATA, advanced=True)
    secondary_separator: str = opt("", "a separator inside a tag group (e.g. ';;;'): the group shuffles and drops as one tag, "
                                       "then becomes ordinary tags", group=DATA, advanced=True)
    enable_wildcard: bool = opt(False, "captions with {a|b|c} take one choice per step, multi-line captions one random line",
                                group=DATA, advanced=True)
    token_warmup_min: int = opt(1, "token warm-up: tags seen at the first step", ge=1, group=DATA, advanced=True)
    token_warmup_step: float = opt(0.0, "token warm-up: step by which every tag is seen (< 1: a share of the total; 0 = off)",
                                   ge=0, group=DATA, advanced=True)
    resize_interpolation: str = opt("", "how images are resized into their bucket (default: lanczos down, bicubic up)",
                                    choices=["", "lanczos", "nearest", "bilinear", "linear", "bicubic", "cubic", "area", "box"],
                                    group=DATA, advanced=True)
    caption_prefix: str = opt("", "text put before every caption", group=DATA, advanced=True)
    caption_suffix: str = opt("", "text put after every caption", group=DATA, advanced=True)
    caption_dropout_every_n_epochs: int = opt(0, "train every N-th epoch with empty captions (0 = off)", ge=0, group=DATA,
                                              advanced=True)
    caption_dropout_rate: float = opt(0.0, "probability of training a sample with an empty caption", ge=0, le=1, group=DATA, advanced=True)
    caption_tag_dropout_rate: float = opt(0.0, "probability of dropping each tag", ge=0, le=1, group=DATA, advanced=True)
    flip_aug: bool = opt(False, "random horizontal flips", group=DATA)
    prior_loss_weight: float = opt(1.0, "loss weight of regularization images", ge=0, group=DATA)
    color_aug: bool = opt(False, "sd-scripts' colour jitter (hue shift or gamma, a third of the steps); those images are "
                                 "VAE-encoded every step instead of cached", group=DATA, advanced=True)
    random_crop: bool = opt(False, "a random crop of each image every step instead of the centre one (encoded every step)",
                            group=DATA, advanced=True)
    alpha_mask: bool = opt(False, "each image's alpha channel weights its loss (transparent parts are not learned)", group=DATA,
                           advanced=True)
    conditioning_data_dir: str = opt("", "masked_loss: folder of mask images named like the training images (white = learned, "
                                         "black = ignored; directly or in folders named like the image folders)", group=DATA,
                                     path="dir", advanced=True)
    validation_split: float = opt(0.0, "share of each training folder's images held out to measure a validation loss "
                                       "(0 = none; reg folders are never split)", ge=0, lt=1, group=DATA, advanced=True)
    validation_seed: int | None = opt(None, "seed of which images are held out and of the validation noise (default: seed)",
                                      group=DATA, advanced=True)
    validate_every_n_steps: int | None = opt(None, "validation loss every N steps too (default: only at the end of epochs)",
                                             ge=1, group=DATA, advanced=True)
    validate_every_n_epochs: int | None = opt(None, "validation loss every N epochs (default: every epoch)", ge=1, group=DATA,
                                              advanced=True)
    max_validation_steps: int | None = opt(None, "at most this many held-out batches per validation (default: all)", ge=1,
                                           group=DATA, advanced=True)
    cache_text_encoder_outputs: bool = opt(False, "encode every caption once before training and move the text encoders off the "
                                                  "GPU (needs network_train_unet_only and fixed captions)", group=DATA, advanced=True)
    cache_text_encoder_outputs_to_disk: bool = opt(False, "cache_text_encoder_outputs, kept in files beside the images instead "
                                                          "of memory; later runs read them back", group=DATA, advanced=True)
    cache_latents_to_disk: bool = opt(False, "keep encoded latents beside the images (invalidated when an image changes)",
                                      group=DATA, advanced=True)
    on_bad_image: str = opt("skip", "corrupt image: skip it (named in the log) or error", choices=["skip", "error"], group=DATA,
                            advanced=True)
    # network
    network_module: str = opt("lora", "network kind: lora, locon, loha, lokr, ia3, dora, dylora, oft (sd-scripts' networks.lora and "
                              "lycoris.kohya with --network_args algo=... work too)",
                              registry="loratrain.training.networks:NETWORKS", group=NET)
    network_dim: int = opt(4, "LoRA rank", ge=1, group=NET)
    network_alpha: float = opt(1.0, "LoRA alpha; effective scale is alpha/dim (sd-scripts default 1)", gt=0, group=NET)
    network_dropout: float = opt(0.0, "dropout inside the adapters", ge=0, lt=1, group=NET, advanced=True)
    dylora_unit: int = opt(1, "DyLoRA: the rank step (network_args unit=N); ranks unit, 2*unit, ... network_dim are trained",
                           ge=1, group=NET, advanced=True)
    conv_dim: int | None = opt(None, "rank for 3x3 convolutions (LoCon); unset = no conv adapters", ge=1, group=NET)
    conv_alpha: float | None = opt(None, "alpha for 3x3 convolutions", gt=0, group=NET)
    block_dims: str = opt("", "rank per UNet block, comma-separated: 25 values IN00..IN11,MID,OUT00..OUT11 (SDXL: 23, "
                              "sd-scripts' order); 0 = no module", group=NET, advanced=True)
    block_alphas: str = opt("", "alpha per UNet block (as block_dims)", group=NET, advanced=True)
    conv_block_dims: str = opt("", "3x3 conv rank per UNet block (as block_dims; LoCon)", group=NET, advanced=True)
    conv_block_alphas: str = opt("", "3x3 conv alpha per UNet block", group=NET, advanced=True)
    down_lr_weight: str = opt("", "learning-rate weight of the 12 (SDXL: 9) input blocks: numbers, or cosine, sine, linear, "
                                  "reverse_linear, zeros (+offset)", group=NET, advanced=True)
    mid_lr_weight: str = opt("", "learning-rate weight of the middle block (SDXL: 3 values)", group=NET, advanced=True)
    up_lr_weight: str = opt("", "learning-rate weight of the 12 (SDXL: 9) output blocks (as down_lr_weight)", group=NET,
                            advanced=True)
    block_lr_zero_threshold: float = opt(0.0, "blocks whose lr weight is at most this are not trained (no module)", ge=0,
                                         group=NET, advanced=True)
    rank_dropout: float = opt(0.0, "drop each rank of a module's down output with this probability (per sample)", ge=0, lt=1,
                              group=NET, advanced=True)
    module_dropout: float = opt(0.0, "skip a module's whole adapter with this probability (per forward)", ge=0, lt=1, group=NET,
                                advanced=True)
    loraplus_lr_ratio: float | None = opt(None, "LoRA+: the up matrices learn this many times faster (16 in the paper)", gt=0,
                                          group=NET, advanced=True)
    loraplus_unet_lr_ratio: float | None = opt(None, "LoRA+ ratio for the UNet only (overrides loraplus_lr_ratio)", gt=0,
                                               group=NET, advanced=True)
    loraplus_text_encoder_lr_ratio: float | None = opt(None, "LoRA+ ratio for the text encoders only", gt=0, group=NET,
                                                       advanced=True)
    enable_all_linear: bool = opt(False, "OFT: every linear layer of the transformer blocks, not only attention (network_args)",
                                  group=NET, advanced=True)
    enable_conv: bool = opt(False, "OFT: the ResNet convolutions too (network_args)", group=NET, advanced=True)
    network_train_unet_only: bool = opt(False, "train only the UNet adapters", group=NET)
    network_train_text_encoder_only: bool = opt(False, "train only the text encoder adapters", group=NET, advanced=True)
    dim_from_weights: bool = opt(False, "each module's rank and alpha from the network_weights file (modules the file lacks are "
                                        "not trained)", group=NET, advanced=True)
    base_weights: list[str] = opt([], "LoRA / LyCORIS files merged into the base model before training (sd-scripts' "
                                      "base_weights)", group=MODEL, advanced=True, path="file")
    base_weights_multiplier: list[float] = opt([], "the weight of each base_weights file (default 1)", group=MODEL, advanced=True)
    network_weights: str = opt("", "start from an existing LoRA: any kohya-layout .safetensors (sd-scripts', ours, ...) "
                                   "or a training state folder", group=NET,
                               advanced=True, path="any")
    # optimisation
    learning_rate: float = opt(1e-4, "learning rate (default for UNet and text encoder)", gt=0, group=OPTIM)
    unet_lr: float | None = opt(None, "UNet learning rate", gt=0, group=OPTIM)
    text_encoder_lr: list[float] = opt([], "text encoder learning rate: one value, or one per encoder (SDXL: two) as sd-scripts",
                                       group=OPTIM)
    optimizer_type: str = opt("AdamW", "AdamW, AdamW8bit, PagedAdamW8bit, Lion, Lion8bit, Prodigy, DAdaptation, Adafactor, "
                                       "AdamWScheduleFree, CAME, SGDNesterov, ... (sd-scripts' names)",
                              registry="loratrain.training.optim:OPTIMIZERS", group=OPTIM)
    optimizer_args: list[str] = opt([], "extra optimizer arguments as key=value", group=OPTIM, advanced=True)
    lr_scheduler: str = opt("constant", "constant, constant_with_warmup, linear, cosine, cosine_with_restarts, polynomial, "
                                        "cosine_with_min_lr, inverse_sqrt, warmup_stable_decay, piecewise_constant, adafactor",
                            registry="loratrain.training.optim:SCHEDULERS", group=OPTIM)
    lr_scheduler_type: str = opt("", "a torch.optim.lr_scheduler class (e.g. CosineAnnealingLR) built with lr_scheduler_args, "
                                     "instead of lr_scheduler (sd-scripts' option; other modules are not imported)",
                                 group=OPTIM, advanced=True)
    lr_warmup_steps: float = opt(0.0, "warmup steps, or a ratio of the total when < 1", ge=0, group=OPTIM)
    lr_scheduler_num_cycles: int = opt(1, "restarts for cosine_with_restarts", ge=1, group=OPTIM, advanced=True)
    lr_scheduler_power: float = opt(1.0, "power for polynomial", gt=0, group=OPTIM, advanced=True)
    lr_scheduler_args: list[str] = opt([], "extra scheduler arguments as key=value (piecewise_constant: step_rules=1:100,0.1)",
                                       group=OPTIM, advanced=True)
    lr_decay_steps: float = opt(0.0, "warmup_stable_decay: decay steps, or a ratio of the total when < 1", ge=0, group=OPTIM,
                                advanced=True)
    lr_scheduler_timescale: int | None = opt(None, "inverse_sqrt: timescale (default: the warmup steps)", ge=1, group=OPTIM,
                                             advanced=True)
    lr_scheduler_min_lr_ratio: float | None = opt(None, "cosine_with_min_lr / warmup_stable_decay: final lr as a ratio of lr",
                                                  ge=0, le=1, group=OPTIM, advanced=True)
    max_train_steps: int = opt(1600, "total optimizer steps (unless max_train_epochs)", ge=1, group=OPTIM)
    max_train_epochs: int | None = opt(None, "total epochs (overrides max_train_steps)", ge=1, group=OPTIM)
    gradient_accumulation_steps: int = opt(1, "micro-batches per optimizer step", ge=1, group=OPTIM)
    scale_weight_norms: float = opt(0.0, "max-norm regularisation: each module's delta is scaled back to this Frobenius norm "
                                         "after every step (0 = off; sd-scripts suggests 1)", ge=0, group=OPTIM, advanced=True)
    max_grad_norm: float = opt(1.0, "gradient clipping (0 = off)", ge=0, group=OPTIM, advanced=True)
    mixed_precision: str = opt("no", "no, fp16, bf16", choices=MIXED_PRECISIONS, group=OPTIM)
    full_fp16: bool = opt(False, "train the adapters themselves in fp16 (weights, gradients, optimizer state), with the loss "
                                 "scaler allowed to unscale fp16 gradients as sd-scripts does; needs mixed_precision fp16",
                          group=OPTIM, advanced=True)
    full_bf16: bool = opt(False, "train the adapters themselves in bf16 (weights, gradients, optimizer state): less memory, "
                                 "less precision; needs mixed_precision bf16", group=OPTIM, advanced=True)
    gradient_checkpointing: bool = opt(False, "trade compute for memory", group=OPTIM, advanced=True)
    fused_backward_pass: bool = opt(False, "update each weight as soon as its gradient is ready and free the gradient (memory "
                                           "for full fine-tunes; per-parameter optimizers only, no accumulation, one process)",
                                    group=OPTIM, advanced=True)
    fp8_base: bool = opt(False, "store the frozen base weights (UNet and text encoders) in float8 and cast each layer up only "
                                "for its forward: about half the memory of bf16 weights, slightly less exact", group=OPTIM,
                         advanced=True)
    fp8_base_unet: bool = opt(False, "fp8_base for the UNet only (the text encoders keep the training dtype)", group=OPTIM,
                              advanced=True)
    xformers: bool = opt(False, "use xformers attention (if installed)", group=OPTIM, advanced=True)
    torch_compile: bool = opt(False, "compile the UNet with torch.compile (slow first steps, faster after; needs a C++ "
                                     "compiler for inductor on CPU)", group=OPTIM, advanced=True)
    dynamo_backend: str = opt("inductor", "torch.compile backend (sd-scripts' names; 'no' = torch_compile off)",
                              choices=["no", "eager", "aot_eager", "inductor", "cudagraphs", "onnxrt", "tvm", "ipex"],
                              group=OPTIM, advanced=True)
    weighted_captions: bool = opt(False, "read (word:1.3), (word) and [word] in captions as A1111 does and weight those tokens' "
                                         "text encoder outputs (no commas inside brackets when tags are shuffled)", group=DATA,
                                  advanced=True)
    max_token_length: int | None = opt(None, "caption tokens: 75 (unset), 150 or 225 (2 or 3 windows of 75, as sd-scripts)",
                                       group=DATA, advanced=True)
    clip_skip: int = opt(1, "use the n-th text encoder layer from the end (SD1/SD2)", ge=1, group=OPTIM)
    seed: int = opt(42, "seed; a run with the same seed and data is repeatable", group=OPTIM)
    noise_offset: float = opt(0.0, "noise offset strength", ge=0, group=NOISE)
    noise_offset_random_strength: bool = opt(False, "draw the offset strength from U(0, noise_offset)", group=NOISE, advanced=True)
    adaptive_noise_scale: float = opt(0.0, "add |mean latent| * this to the offset", group=NOISE, advanced=True)
    multires_noise_iterations: int = opt(0, "pyramid noise iterations (0 = off)", ge=0, group=NOISE)
    multires_noise_discount: float = opt(0.3, "pyramid noise discount", ge=0, le=1, group=NOISE, advanced=True)
    min_snr_gamma: float = opt(0.0, "min-SNR weighting gamma (0 = off, 5 recommended)", ge=0, group=NOISE)
    loss_type: str = opt("l2", "loss: l2, l1, huber, smooth_l1 (sd-scripts' meanings)", choices=["l2", "l1", "huber", "smooth_l1"],
                         group=NOISE, advanced=True)
    huber_schedule: str = opt("snr", "how the huber/smooth_l1 parameter c varies with the timestep",
                              choices=["constant", "exponential", "snr"], group=NOISE, advanced=True)
    huber_c: float = opt(0.1, "huber/smooth_l1 parameter c (its value at t=0 for the schedules)", gt=0, le=1, group=NOISE,
                         advanced=True)
    huber_scale: float = opt(1.0, "multiplies c", gt=0, group=NOISE, advanced=True)
    ip_noise_gamma: float = opt(0.0, "input perturbation: the noisy latent gets extra noise * gamma, the target does not "
                                     "(0 = off, 0.1 typical)", ge=0, group=NOISE, advanced=True)
    ip_noise_gamma_random_strength: bool = opt(False, "draw the input perturbation from U(0, ip_noise_gamma)", group=NOISE,
                                               advanced=True)
    scale_v_pred_loss_like_noise_pred: bool = opt(False, "v-prediction: weight the loss by SNR/(SNR+1), so it weighs the "
                                                         "timesteps as an epsilon loss does", group=NOISE, advanced=True)
    v_pred_like_loss: float = opt(0.0, "epsilon models: add this share of a v-prediction-like loss (loss x (SNR+1)/SNR)", ge=0,
                                  group=NOISE, advanced=True)
    debiased_estimation_loss: bool = opt(False, "weight the loss by 1/sqrt(SNR) (eps) or 1/(SNR+1) (v)", group=NOISE, advanced=True)
    masked_loss: bool = opt(False, "weight the loss by a mask: conditioning_data_dir's images (red channel) or the alpha channel "
                                   "(alpha_mask)", group=NOISE, advanced=True)
    zero_terminal_snr: bool = opt(False, "rescale the noise schedule so the last timestep is pure noise (SNR 0, Lin et al. 2023): "
                                         "lets a v-prediction model learn very dark or bright images", group=NOISE, advanced=True)
    min_timestep: int = opt(0, "lowest timestep sampled", ge=0, le=999, group=NOISE, advanced=True)
    max_timestep: int = opt(1000, "highest timestep sampled (exclusive)", ge=1, le=1000, group=NOISE, advanced=True)
    # output
    output_dir: str = opt("output", "where LoRA files, state and samples go", group=SAVE, path="output")
    output_name: str = opt("last", "base file name (one name, no folder)", group=SAVE, path="name")
    save_precision: str = opt("fp16", "dtype of saved LoRA files: fp16, bf16, fp32 (sd-scripts: float)",
                              choices=PRECISION_NAMES[:4], group=SAVE)
    save_every_n_epochs: int = opt(0, "save a LoRA every N epochs", ge=0, group=SAVE)
    save_n_epoch_ratio: int = opt(0, "save about N files over the run: every max(1, epochs // N) epochs (overrides "
                                     "save_every_n_epochs)", ge=0, group=SAVE, advanced=True)
    save_every_n_steps: int = opt(0, "save a LoRA every N steps", ge=0, group=SAVE)
    save_last_n_epochs: int = opt(0, "keep only the last N epoch saves (0 = all)", ge=0, group=SAVE, advanced=True)
    save_last_n_steps: int = opt(0, "keep only the last N step saves (0 = all)", ge=0, group=SAVE, advanced=True)
    save_peft_format: bool = opt(False, "also write diffusers/PEFT pytorch_lora_weights.safetensors", group=SAVE, advanced=True)
    resume: str = opt("", "training state folder to continue from, or 'latest'", group=SAVE, path="state")
    overwrite: bool = opt(False, "replace an earlier run's LoRA files and resumable state with the same output_name", group=SAVE)
    training_comment: str = opt("", "free text stored in the LoRA metadata", group=SAVE, advanced=True)
    metadata_title: str = opt("", "modelspec title (default: output_name)", group=SAVE, advanced=True)
    metadata_author: str = opt("", "modelspec author", group=SAVE, advanced=True)
    metadata_description: str = opt("", "modelspec description", group=SAVE, advanced=True)
    metadata_license: str = opt("", "modelspec license", group=SAVE, advanced=True)
    metadata_tags: str = opt("", "modelspec tags, comma-separated", group=SAVE, advanced=True)
    metadata_usage_hint: str = opt("", "modelspec usage hint (e.g. \"use the word 'sks'\")", group=SAVE, advanced=True)
    metadata_trigger_phrase: str = opt("", "modelspec trigger phrase", group=SAVE, advanced=True)
    metadata_merged_from: str = opt("", "modelspec merged_from (what this model was made from)", group=SAVE, advanced=True)
    metadata_preprocessor: str = opt("", "modelspec preprocessor", group=SAVE, advanced=True)
    metadata_is_negative_embedding: str = opt("", "modelspec is_negative_embedding", group=SAVE, advanced=True)
    metadata_thumbnail: str = opt("", "modelspec thumbnail: an image file, stored in the metadata as a data URL", group=SAVE,
                                  advanced=True, path="file")
    # sampling and logs
    sample_prompts: str = opt("", "prompt file (.txt with --n --w --h --s --l --d --ss options)", group=SAMPLE, path="file")
    sample_every_n_steps: int = opt(0, "sample every N steps", ge=0, group=SAMPLE)
    sample_every_n_epochs: int = opt(0, "sample every N epochs", ge=0, group=SAMPLE)
    sample_sampler: str = opt("ddim", "sampler for samples", registry="loratrain.core.samplers:SAMPLERS", group=SAMPLE)
    sample_at_first: bool = opt(False, "sample before training", group=SAMPLE)
    logging_dir: str = opt("", "TensorBoard folder (default <output_dir>/logs)", group=LOGS, advanced=True, path="output")

    @field_validator("resolution")
    @classmethod
    def _resolution(cls, value: str) -> str:
        try:
            parse_resolution(value, "")
        except ConfigError as e:
            raise ValueError(str(e).strip()) from None
        return value

    @field_validator("text_encoder_lr", mode="before")
    @classmethod
    def _one_or_per_encoder(cls, value: object) -> object:
        """sd-scripts and the GUI write a number or a list (one per text encoder); a list either way."""
        if isinstance(value, str):
            return value.replace(",", " ").split()
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return [value]
        return value

    @classmethod
    def build(cls, data: dict[str, Any], source: str = "config", check: bool = True) -> Any:
        """JobConfig.build; a kohya_ss GUI JSON's problems (now and at check) name its own keys and the file."""
        from .kohya_gui import GuiNames

        gui = GuiNames.of(data, source)
        try:
            cfg = super().build(data, source, check=False)
        except ConfigError as e:
            raise (gui.renamed(e) if gui else e) from None
        cfg._gui = gui
        return cfg.check(ready=False) if check else cfg

    def check(self, ready: bool = True) -> Any:
        try:
            return super().check(ready)
        except ConfigError as e:
            raise (self._gui.renamed(e) if self._gui else e) from None

    @classmethod
    def compat(cls, flat: dict) -> tuple[dict, list[str], list[Problem]]:
        from .kohya import is_off
        from .kohya_gui import from_gui_json, is_gui_json

        notes: list[str] = []
        problems: list[Problem] = []
        lora_type = flat.get("LoRA_type") if is_gui_json(flat) else None
        if lora_type is not None:  # the kohya_ss GUI's saved JSON: its form fields first become sd-scripts options
            flat, notes, problems = from_gui_json(flat)
            known = set(cls.model_fields) | set(SD_SCRIPTS_FLAGS) | set(GUI_KEYS)
            unused = sorted(k for k, v in flat.items() if k not in known and is_off(k, v))
            flat = {k: v for k, v in flat.items() if k not in unused}
            if unused:
                notes.append(f"ignored GUI field(s) left off: {', '.join(unused)}")
        flat, more_notes, more_problems = translate(flat, set(cls.model_fields))
        if lora_type is not None:
            notes.insert(0, f"kohya_ss GUI config: LoRA_type {lora_type!r} -> network_module {flat.get('network_module')}")
        return flat, notes + more_notes, problems + more_problems

    @classmethod
    def read_config_file(cls, path: str | Path) -> dict[str, Any]:
        """A TOML, or the kohya_ss GUI's saved .json (recognised by content: compat translates it)."""
        from .kohya_gui import read_json_config

        return read_json_config(path) if Path(path).suffix.lower() == ".json" else super().read_config_file(path)

    @classmethod
    def compat_value(cls, values: list[str]) -> object:
        return cli_value(values)

    def text_encoder_lrs(self, n_encoders: int) -> list[float]:
        """The learning rate of each text encoder: one value for all, or one each; learning_rate when unset."""
        if not self.text_encoder_lr:
            return [self.learning_rate] * n_encoders
        if len(self.text_encoder_lr) == 1:
            return list(self.text_encoder_lr) * n_encoders
        return list(self.text_encoder_lr[:n_encoders])

    @field_validator("max_token_length")
    @classmethod
    def _token_windows(cls, value: int | None) -> int | None:
        if value not in (None, 75, 150, 225):
            raise ValueError(f"{value} must be 75, 150 or 225 (windows of 75 tokens)")
        return None if value == 75 else value

    @field_validator("dynamo_backend", mode="before")
    @classmethod
    def _backend_name(cls, value: object) -> object:
        return value.lower() if isinstance(value, str) else value  # accelerate's config and the GUI write "NO"

    @field_validator("bucket_reso_steps")
    @classmethod
    def _bucket_step(cls, value: int) -> int:
        if value % 8:
            raise ValueError(f"{value} must be a multiple of 8")
        return value

    @field_validator("optimizer_args", "lr_scheduler_args")
    @classmethod
    def _key_values(cls, value: list[str]) -> list[str]:
        bad = [a for a in value if "=" not in a]
        if bad:
            raise ValueError(f"{bad[0]!r} is not key=value")
        return value

    def resolution_wh(self) -> tuple[int, int]:
        return parse_resolution(self.resolution)

    @property
    def network_kind(self) -> str:
        """network_module without its spelling: `networks.dylora` -> dylora, `lycoris.kohya` -> lora, `finetune` -> full
        (lycoris.kohya's algo= has already been turned into the kind)."""
        kind = self.network_module.lower().rsplit(".", 1)[-1]
        return {"kohya": "lora", "finetune": "full"}.get(kind, kind)

    def block_spec(self) -> Any:
        from .networks.blocks import BlockSpec

        return BlockSpec(self.block_dims, self.block_alphas, self.conv_block_dims, self.conv_block_alphas, self.down_lr_weight,
                         self.mid_lr_weight, self.up_lr_weight, self.block_lr_zero_threshold)

    def network_options(self) -> dict[str, Any]:
        """What the network needs beyond the LoRA options (NetworkSpec's other fields)."""
        return {"unit": self.dylora_unit, "blocks": self.block_spec(), "rank_dropout": self.rank_dropout,
                "oft_all_linear": self.enable_all_linear, "oft_conv": self.enable_conv,
                "module_dropout": self.module_dropout,
                "loraplus_unet": self.loraplus_unet_lr_ratio or self.loraplus_lr_ratio,
                "loraplus_text_encoder": self.loraplus_text_encoder_lr_ratio or self.loraplus_lr_ratio}

    def problems(self) -> list[Problem]:
        out: list[Problem] = []
        if self.network_train_unet_only and self.network_train_text_encoder_only:
            out.append(("network_train_text_encoder_only", "network_train_unet_only and network_train_text_encoder_only exclude each other"))
        if self.network_kind == "dylora":
            for name in ("network_dim", "conv_dim"):
                value = getattr(self, name)
                if value and value % self.dylora_unit:
                    out.append((name, f"{value} must be a multiple of the DyLoRA unit {self.dylora_unit}"))
        elif self.dylora_unit != 1:
            out.append(("dylora_unit", "only with network_module dylora"))
        if self.min_timestep >= self.max_timestep:
            out.append(("min_timestep", f"min_timestep {self.min_timestep} must be below max_timestep {self.max_timestep}"))
        if self.enable_bucket:
            for name in ("min_bucket_reso", "max_bucket_reso"):
                if getattr(self, name) % self.bucket_reso_steps:
                    out.append((name, f"{getattr(self, name)} must be a multiple of bucket_reso_steps {self.bucket_reso_steps}"))
            if self.min_bucket_reso > self.max_bucket_reso:
                out.append(("min_bucket_reso", "min_bucket_reso is above max_bucket_reso"))
        if self.cache_text_encoder_outputs or self.cache_text_encoder_outputs_to_disk:
            if not self.network_train_unet_only:
                out.append(("cache_text_encoder_outputs", "needs network_train_unet_only: a text encoder being trained "
                                                          "changes its outputs every step"))
            random_captions = [n for n in ("shuffle_caption", "caption_dropout_rate", "caption_tag_dropout_rate",
                                           "caption_dropout_every_n_epochs", "enable_wildcard", "token_warmup_step")
                               if getattr(self, n)]
            if random_captions:
                out.append(("cache_text_encoder_outputs", f"captions change from step to step with {', '.join(random_captions)}; "
                                                          "turn those off or the cache"))
        sched = self.lr_scheduler.lower()
        if sched == "piecewise_constant" and not any(a.startswith("step_rules=") for a in self.lr_scheduler_args):
            out.append(("lr_scheduler_args", "piecewise_constant needs step_rules=..., e.g. step_rules=1:100,0.5:200,0.1"))
        if sched == "warmup_stable_decay" and not self.lr_decay_steps:
            out.append(("lr_decay_steps", "warmup_stable_decay needs lr_decay_steps (steps, or a ratio of the total)"))
        if _plateau(self.lr_scheduler_type):
            out.append(("lr_scheduler_type", "ReduceLROnPlateau lowers the lr when a metric stops improving and needs that "
                                             "metric at every step; training gives it none. Choose a schedule by steps "
                                             "(e.g. CosineAnnealingLR, StepLR) or an lr_scheduler"))
        if sched == "adafactor" and self.optimizer_type.lower() != "adafactor":
            out.append(("lr_scheduler", "the adafactor schedule is Adafactor's own: use optimizer_type Adafactor "
                                        "with optimizer_args relative_step=True"))
        from .networks.blocks import check_text

        out += check_text(self.block_spec())
        lora_only = [n for n in ("block_dims", "conv_block_dims", "down_lr_weight", "mid_lr_weight", "up_lr_weight", "rank_dropout",
                                 "module_dropout", "loraplus_lr_ratio", "loraplus_unet_lr_ratio", "loraplus_text_encoder_lr_ratio")
                     if getattr(self, n)]
        if lora_only and self.network_kind not in LORA_LAYER_KINDS:
            out.append((lora_only[0], f"a networks.lora argument; not for network_module {self.network_kind}"))
        if (self.color_aug or self.random_crop) and (self.masked_loss or self.alpha_mask):
            out.append(("random_crop" if self.random_crop else "color_aug", "not implemented together with masked_loss / alpha_mask"))
        if (self.enable_all_linear or self.enable_conv) and self.network_kind != "oft":
            out.append(("enable_all_linear" if self.enable_all_linear else "enable_conv", "an OFT argument (network_module oft)"))
        if self.network_kind == "oft":
            if self.scale_weight_norms:
                out.append(("scale_weight_norms", "not for OFT: its constraint (network_alpha) bounds the rotation"))
            if self.save_peft_format:
                out.append(("save_peft_format", "OFT has no PEFT copy (PEFT's OFT rotates the input side)"))
            if self.network_train_text_encoder_only:
                out.append(("network_train_text_encoder_only", "OFT trains the UNet only, as sd-scripts' networks.oft"))
        if self.torch_compile and self.dynamo_backend == "no":
            out.append(("dynamo_backend", "'no' turns torch.compile off, but torch_compile is on; choose a backend (inductor)"))
        if (self.fp8_base or self.fp8_base_unet) and self.network_kind in ("full", "dora", "ia3"):
            out.append(("fp8_base", f"not with {self.network_kind}: it needs the base weights themselves in full precision"))
        if self.metadata_thumbnail and Path(self.metadata_thumbnail).suffix.lower() not in (".png", ".jpg", ".jpeg", ".webp"):
            out.append(("metadata_thumbnail", f"{self.metadata_thumbnail}: a .png, .jpg or .webp image"))
        if self.base_weights_multiplier and len(self.base_weights_multiplier) != len(self.base_weights):
            out.append(("base_weights_multiplier", f"{len(self.base_weights_multiplier)} values for {len(self.base_weights)} "
                                                   "base_weights files"))
        if self.dim_from_weights and not self.network_weights:
            out.append(("dim_from_weights", "needs network_weights (the file the ranks are read from)"))
        elif self.dim_from_weights and self.network_kind not in ("lora", "locon"):
            out.append(("dim_from_weights", f"reads LoRA files; not for network_module {self.network_kind}"))
        if self.fused_backward_pass:
            if self.gradient_accumulation_steps > 1:
                out.append(("fused_backward_pass", "updates inside backward: gradient_accumulation_steps must be 1"))
            if self.mixed_precision == "fp16":
                out.append(("fused_backward_pass", "not with fp16 loss scaling; use bf16 or no mixed precision"))
        if self.full_bf16 and self.mixed_precision != "bf16":
            out.append(("full_bf16", "needs mixed_precision bf16 (as in sd-scripts)"))
        if self.full_fp16 and self.mixed_precision != "fp16":
            out.append(("full_fp16", "needs mixed_precision fp16 (as in sd-scripts)"))
        if self.full_fp16 and self.optimizer_type.lower() in ("adamw", "adam", "torch.optim.adamw") and not any(
                a.replace(" ", "").startswith("eps=") for a in self.optimizer_args):
            out.append(("full_fp16", f"{self.optimizer_type}'s eps (1e-8) is 0 in fp16, so the first zero gradient makes NaN; use "
                                     "AdamW8bit (sd-scripts' advice for full_fp16) or optimizer_args eps=1e-4"))
        if self.full_fp16 and self.full_bf16:
            out.append(("full_fp16", "full_fp16 and full_bf16 exclude each other"))
        if len(self.text_encoder_lr) > 2:
            out.append(("text_encoder_lr", f"{self.text_encoder_lr}: one value, or one per text encoder (at most two)"))
        if any(v <= 0 for v in self.text_encoder_lr):
            out.append(("text_encoder_lr", f"{self.text_encoder_lr}: learning rates must be > 0"))
        if self.lr_scheduler.lower() == "constant" and self.lr_warmup_steps:
            out.append(("lr_warmup_steps", "the constant scheduler has no warmup (as in sd-scripts); "
                                           "use --lr_scheduler constant_with_warmup"))
        return out

    def requirements(self) -> list[Problem]:
        """What must exist before a model is loaded: inputs, the prompt file and each sampler it names."""
        from . import config_checks as checks
        from .config_checks import base_weights_problems, lora_file_problems, prompt_problems, schedule_problems, vae_problems

        out: list[Problem] = []
        if not self.pretrained_model_name_or_path:
            out.append(("pretrained_model_name_or_path", "is required"))
        elif not Path(self.pretrained_model_name_or_path).expanduser().exists():
            out.append(("pretrained_model_name_or_path", f"model not found: {self.pretrained_model_name_or_path}"))
        if not (self.train_data_dir or self.dataset_config):
            out.append(("train_data_dir", "give train_data_dir or dataset_config"))
        for name in ("train_data_dir", "reg_data_dir"):
            value = getattr(self, name)
            if value and not Path(value).is_dir():
                out.append((name, f"folder not found: {value}"))
        if self.vae:
            out += vae_problems(Path(self.vae))
        if self.dataset_config and not Path(self.dataset_config).is_file():
            out.append(("dataset_config", f"file not found: {self.dataset_config}"))
        if self.network_weights and not Path(self.network_weights).exists():
            out.append(("network_weights", f"not found: {self.network_weights}"))
        elif self.network_weights and Path(self.network_weights).suffix.lower() == ".safetensors":
            out += lora_file_problems(self, Path(self.network_weights))
        out += base_weights_problems(self)
        for name in ("metadata_thumbnail", "conditioning_data_dir"):
            value = getattr(self, name)
            if value and not Path(value).exists():
                out.append((name, f"not found: {value}"))
        if self.resume and self.resume != "latest" and not Path(self.resume).is_dir():
            out.append(("resume", f"state folder not found: {self.resume}"))
        elif self.resume and self.resume != "latest":
            out += checks.resume_problems(Path(self.resume))
        out += checks.block_count_problems(self)
        if Path(self.output_dir).exists() and not Path(self.output_dir).is_dir():
            out.append(("output_dir", f"{self.output_dir} is a file, not a folder"))
        if self.resume == "latest":
            from .saving import STATE_SUFFIX, find_state

            state = Path(self.output_dir) / f"{self.output_name}{STATE_SUFFIX}"
            if find_state(state) is None:
                out.append(("resume", f"nothing to resume: no complete training state {state} (or .tmp/.old beside it); "
                                      "run without --resume"))
        from .config_checks import earlier_run_problems

        out += earlier_run_problems(self)
        if self.sample_prompts:
            out += prompt_problems(self)
        if (self.lr_scheduler_args or self.lr_scheduler_type) and not _plateau(self.lr_scheduler_type):
            out += schedule_problems(self)
        out += checks.optimizer_problems(self)
        from .optim import OPTIMIZERS

        if self.optimizer_type in OPTIMIZERS and (hint := OPTIMIZERS.get(self.optimizer_type).missing()):
            out.append(("optimizer_type", hint))
        if self.fused_backward_pass and self.optimizer_type in OPTIMIZERS and not OPTIMIZERS.get(self.optimizer_type).per_parameter:
            out.append(("fused_backward_pass", f"not with {self.optimizer_type}: its state spans parameters; use AdamW, "
                                               "AdamW8bit, Adafactor, Lion or SGD"))
        return out
