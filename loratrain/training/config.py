"""`loratrain train` options, with sd-scripts names so existing TOML files and habits carry over."""
from __future__ import annotations

from dataclasses import dataclass

from ..common.config import CommandConfig, ConfigError, opt

PRECISIONS = ("no", "fp16", "bf16")


@dataclass
class TrainConfig(CommandConfig):
    # model
    pretrained_model_name_or_path: str = opt("", "diffusers folder, HF cache folder or single-file .safetensors checkpoint")
    v_parameterization: bool | None = opt(None, "v-prediction target (SD2 768-v); default: from the model")
    allow_pickle: bool = opt(False, "allow a pickled .ckpt base model (loaded with weights_only=True)")
    # data
    train_data_dir: str = opt("", "folder of <repeats>_<class tokens> subfolders")
    reg_data_dir: str = opt("", "folder of regularization <repeats>_<class> subfolders")
    dataset_config: str = opt("", "sd-scripts dataset TOML (replaces train/reg_data_dir)")
    caption_extension: str = opt(".txt", "caption file extension")
    resolution: str = opt("512", "training resolution: N or W,H")
    train_batch_size: int = opt(1, "images per batch")
    enable_bucket: bool = opt(False, "aspect-ratio buckets")
    min_bucket_reso: int = opt(256, "smallest bucket side")
    max_bucket_reso: int = opt(1024, "largest bucket side")
    bucket_reso_steps: int = opt(64, "bucket side step")
    shuffle_caption: bool = opt(False, "shuffle comma-separated tags")
    keep_tokens: int = opt(0, "leading tags kept in place when shuffling")
    caption_dropout_rate: float = opt(0.0, "probability of training a sample with an empty caption")
    caption_tag_dropout_rate: float = opt(0.0, "probability of dropping each tag")
    flip_aug: bool = opt(False, "random horizontal flips")
    prior_loss_weight: float = opt(1.0, "loss weight of regularization images")
    cache_latents_to_disk: bool = opt(False, "keep encoded latents beside the images (invalidated when an image changes)")
    on_bad_image: str = opt("skip", "corrupt image: skip it (named in the log) or error", metadata={"choices": ["skip", "error"]})
    # network
    network_module: str = opt("lora", "network kind: lora, locon")
    network_dim: int = opt(4, "LoRA rank")
    network_alpha: float = opt(1.0, "LoRA alpha; effective scale is alpha/dim (sd-scripts default 1)")
    network_dropout: float = opt(0.0, "dropout inside the adapters")
    conv_dim: int | None = opt(None, "rank for 3x3 convolutions (LoCon); unset = no conv adapters")
    conv_alpha: float | None = opt(None, "alpha for 3x3 convolutions")
    network_train_unet_only: bool = opt(False, "train only the UNet adapters")
    network_train_text_encoder_only: bool = opt(False, "train only the text encoder adapters")
    network_weights: str = opt("", "start from an existing LoRA written by this trainer (state dir or kohya file)")
    # optimisation
    learning_rate: float = opt(1e-4, "learning rate (default for UNet and text encoder)")
    unet_lr: float | None = opt(None, "UNet learning rate")
    text_encoder_lr: float | None = opt(None, "text encoder learning rate")
    optimizer_type: str = opt("AdamW", "AdamW, AdamW8bit, Lion, Prodigy, DAdaptAdam, Adafactor, SGD")
    optimizer_args: list[str] = opt([], "extra optimizer arguments as key=value")
    lr_scheduler: str = opt("constant", "constant, constant_with_warmup, linear, cosine, cosine_with_restarts, polynomial")
    lr_warmup_steps: float = opt(0.0, "warmup steps, or a ratio of the total when < 1")
    lr_scheduler_num_cycles: int = opt(1, "restarts for cosine_with_restarts")
    lr_scheduler_power: float = opt(1.0, "power for polynomial")
    max_train_steps: int = opt(1600, "total optimizer steps (unless max_train_epochs)")
    max_train_epochs: int | None = opt(None, "total epochs (overrides max_train_steps)")
    gradient_accumulation_steps: int = opt(1, "micro-batches per optimizer step")
    max_grad_norm: float = opt(1.0, "gradient clipping (0 = off)")
    mixed_precision: str = opt("no", "no, fp16, bf16", metadata={"choices": list(PRECISIONS)})
    gradient_checkpointing: bool = opt(False, "trade compute for memory")
    xformers: bool = opt(False, "use xformers attention (if installed)")
    clip_skip: int = opt(1, "use the n-th text encoder layer from the end (SD1/SD2)")
    seed: int = opt(42, "seed; a run with the same seed and data is repeatable")
    noise_offset: float = opt(0.0, "noise offset strength")
    noise_offset_random_strength: bool = opt(False, "draw the offset strength from U(0, noise_offset)")
    adaptive_noise_scale: float = opt(0.0, "add |mean latent| * this to the offset")
    multires_noise_iterations: int = opt(0, "pyramid noise iterations (0 = off)")
    multires_noise_discount: float = opt(0.3, "pyramid noise discount")
    min_snr_gamma: float = opt(0.0, "min-SNR weighting gamma (0 = off, 5 recommended)")
    min_timestep: int = opt(0, "lowest timestep sampled")
    max_timestep: int = opt(1000, "highest timestep sampled (exclusive)")
    # output
    output_dir: str = opt("output", "where LoRA files, state and samples go")
    output_name: str = opt("last", "base file name")
    save_precision: str = opt("fp16", "dtype of saved LoRA files: float, fp16, bf16", metadata={"choices": ["float", "fp16", "bf16"]})
    save_every_n_epochs: int = opt(0, "save a LoRA every N epochs")
    save_every_n_steps: int = opt(0, "save a LoRA every N steps")
    save_last_n_epochs: int = opt(0, "keep only the last N epoch saves (0 = all)")
    save_last_n_steps: int = opt(0, "keep only the last N step saves (0 = all)")
    save_peft_format: bool = opt(False, "also write diffusers/PEFT pytorch_lora_weights.safetensors")
    resume: str = opt("", "training state folder to continue from, or 'latest'")
    training_comment: str = opt("", "free text stored in the LoRA metadata")
    # sampling and logs
    sample_prompts: str = opt("", "prompt file (.txt with --n --w --h --s --l --d options)")
    sample_every_n_steps: int = opt(0, "sample every N steps")
    sample_every_n_epochs: int = opt(0, "sample every N epochs")
    sample_sampler: str = opt("ddim", "sampler for samples")
    sample_at_first: bool = opt(False, "sample before training")
    logging_dir: str = opt("", "TensorBoard folder (default <output_dir>/logs)")

    def validate(self) -> None:
        if self.network_train_unet_only and self.network_train_text_encoder_only:
            raise ConfigError("network_train_unet_only and network_train_text_encoder_only exclude each other")
        for name in ("network_dim", "train_batch_size", "gradient_accumulation_steps", "max_train_steps"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be at least 1")
        if self.max_train_epochs is not None and self.max_train_epochs < 1:
            raise ConfigError("max_train_epochs must be at least 1")
        if self.clip_skip < 1:
            raise ConfigError("clip_skip must be at least 1")
        if not 0 <= self.min_timestep < self.max_timestep <= 1000:
            raise ConfigError("need 0 <= min_timestep < max_timestep <= 1000")

    def resolution_wh(self) -> tuple[int, int]:
        try:
            parts = [int(v) for v in self.resolution.replace("x", ",").split(",") if v.strip()]
        except ValueError:
            raise ConfigError(f"resolution {self.resolution!r} must be N or W,H") from None
        return (parts[0], parts[-1])

    def check_ready(self) -> None:
        """Checks that only matter when actually training (the UI may hold a half-filled config)."""
        if not self.pretrained_model_name_or_path:
            raise ConfigError("pretrained_model_name_or_path is required")
        if not (self.train_data_dir or self.dataset_config):
            raise ConfigError("give train_data_dir or dataset_config")
