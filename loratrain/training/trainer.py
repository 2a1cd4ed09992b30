"""run_train(cfg, reporter, stop): the LoRA training loop the CLI and the UI both call.

Determinism: noise, timesteps and caption shuffles come from generators seeded by (seed, epoch,
micro-batch index), and batch order by (seed, epoch), so a resumed run replays exactly the steps a
straight run would have taken. What must use torch's global generator (adapter init, dropout) runs
inside `torch.random.fork_rng`, so a job leaves the process's random state as it found it.
"""
from __future__ import annotations

import hashlib
import math
import random
import secrets
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import torch

from loratrain.core.devices import fresh_accelerator
from loratrain.core.errors import ConfigError
from loratrain.core.jobs import JobResult, job
from loratrain.core.lora.hashes import model_file_hashes
from loratrain.core.models.loading import SDModel, load_model, move
from loratrain.core.paths import confine
from loratrain.core.precision import canonical, dtype_of
from loratrain.core.progress import Reporter, StopFlag
from loratrain.core.sampling import SamplePrompt, generate, load_prompts, sample_file_name

from .conditioning import ConditioningCache, encode_prompts, sdxl_time_ids
from .config import TrainConfig
from .data.captions import changes_per_step, process_caption
from .data.dataset import Item, TrainData
from .data.subsets import DatasetSpec, specs_from_toml, subsets_from_folders
from .data_parallel import local_share, sum_across_processes
from .fsdp import hand_reduced
from .health import health_line
from .metadata import dataset_metadata, lora_metadata
from .model_prep import allow_fp16_unscale, dims_from_weights, merge_base_weights, store_in_fp8, training_schedule
from .networks import Network, NetworkSpec, build_network
from .noise import debiased_weight, elementwise_loss, huber_c, min_snr_weight, offset_noise, pyramid_noise, snr_scale
from .optim import create_optimizer, create_scheduler
from .options.data import dataset_defaults
from .randomness import _seed_for, sample_latents, seeded  # noqa: F401 - the flow trainers import them from here
from .saving import STATE_SUFFIX, find_state, load_state, prune_saves, save_state
from .validation import validate


class TrainingError(RuntimeError):
    """Training cannot go on (NaN loss, bad resume state); the message says what to do."""


@dataclass
class TrainResult(JobResult):
    lora_path: Path | None
    state_dir: Path
    global_step: int
    epoch: int
    losses: list[float] = field(default_factory=list)
    val_losses: list[tuple[int, float]] = field(default_factory=list)
    samples: list[Path] = field(default_factory=list)
    saved: str = "LoRA"  # what lora_path holds: a LoRA (any network kind) or a checkpoint (a full fine-tune)

    def summary(self) -> list[str]:
        if self.stopped:
            return [f"stopped at step {self.global_step}; resume with --resume {self.state_dir}"]
        return [self.health, f"done: {self.global_step} steps, {self.saved} at {self.lora_path}"]

    @property
    def health(self) -> str:
        """The rule-of-thumb verdict on the loss curve (training/health.py), shown by the CLI and the app."""
        return health_line(self.losses, self.val_losses)


def build_specs(cfg: TrainConfig, log=lambda text: None) -> list[DatasetSpec]:
    defaults = dataset_defaults(cfg)
    if cfg.dataset_config:
        specs = specs_from_toml(cfg.dataset_config, defaults)
    else:
        subsets = subsets_from_folders(cfg.train_data_dir, cfg.reg_data_dir or None, defaults, log)
        specs = [DatasetSpec(subsets=subsets, **{k: v for k, v in defaults.items() if k in DatasetSpec.model_fields})]
    subsets = [s for spec in specs for s in spec.subsets]
    for s in subsets:
        if s.live and (s.alpha_mask or (cfg.masked_loss and s.conditioning_data_dir)):
            raise ConfigError(f"{s.image_dir}: color_aug / random_crop are not implemented together with a loss mask")
    if cfg.masked_loss and not any(s.alpha_mask or s.conditioning_data_dir for s in subsets):
        raise ConfigError("masked_loss: no mask source; set conditioning_data_dir (mask images named like the training "
                          "images) or alpha_mask (the images' alpha channel)")
    if not cfg.masked_loss:  # as sd-scripts: mask images weight the loss only with masked_loss (an alpha mask always does)
        for s in subsets:
            s.conditioning_data_dir = ""
    return specs


def _vae_id(model: SDModel) -> str:
    w = model.vae.encoder.conv_in.weight.detach().float().cpu().numpy().tobytes()
    return hashlib.sha256(w).hexdigest()[:16] + f"-{model.vae.config.scaling_factor}"


class LoRATrainer:
    #: the model is sharded with FSDP (training/fsdp.py): every process runs every forward, FSDP sums those gradients
    sharded = False

    def __init__(self, cfg: TrainConfig, reporter: Reporter, stop: StopFlag) -> None:
        self.cfg, self.reporter, self.stop = cfg, reporter, stop
        self.precision = canonical(cfg.mixed_precision)
        self.accelerator = fresh_accelerator("no" if self.precision == "fp32" else self.precision)
        self.device = self.accelerator.device
        self.out_dir = Path(cfg.output_dir)
        self.state_dir = self.out_dir / f"{cfg.output_name}{STATE_SUFFIX}"
        self.session = {"id": secrets.randbelow(2**31 - 1), "started": time.time(),
                        "model_name": Path(cfg.pretrained_model_name_or_path).name}
        if cfg.metadata_thumbnail:  # sd-scripts stores the image itself, as a data URL
            import base64
            import mimetypes

            data = confine(cfg.metadata_thumbnail, "metadata_thumbnail").read_bytes()
            mime = mimetypes.guess_type(cfg.metadata_thumbnail)[0] or "image/png"
            self.session["thumbnail"] = f"data:{mime};base64,{base64.b64encode(data).decode()}"
        self.losses: list[float] = []
        self.val_losses: list[tuple[int, float]] = []  # (step, validation loss), for the health line
        self.samples: list[Path] = []
        self.last_save: Path | None = None

    # -- setup ---------------------------------------------------------------------------------
    def setup(self) -> None:
        cfg, log = self.cfg, self.reporter.log
        for note in cfg.notes:
            log(note)
        self.resume_from = self._resume_source()
        self.data = TrainData(build_specs(cfg, log), log=log, seed=cfg.seed)
        weight_dtype = dtype_of(self.precision)
        # the base model's hashes for the metadata: a multi-GB read, done beside the setup instead of at the first save
        self._model_hashes = ThreadPoolExecutor(1, thread_name_prefix="loratrain-hash").submit(
            model_file_hashes, cfg.pretrained_model_name_or_path) if self.accelerator.is_main_process else None
        self.model = load_model(cfg.pretrained_model_name_or_path, allow_pickle=cfg.allow_pickle,
                                v_parameterization=cfg.v_parameterization, dtype=weight_dtype)  # no fp32 copy for bf16/fp16 runs
        log(f"model: {self.model.family.name} ({self.model.prediction_type}) from {self.model.source}")
        self.noise_scheduler = training_schedule(self.model, cfg.zero_terminal_snr, log)
        if cfg.vae:
            from loratrain.core.models.loading import replace_vae

            try:
                replace_vae(self.model, cfg.vae)
            except ValueError as e:
                raise ConfigError(str(e)) from None
            log(f"VAE: {Path(cfg.vae).name} (instead of the model's own)")
        if cfg.base_weights:
            merge_base_weights(self.model, cfg.base_weights, cfg.base_weights_multiplier, log)
        if cfg.cache_latents_to_disk:
            with self.accelerator.main_process_first():  # encoded once, by the first process; the others read its files
                self._cache_latents()
        else:
            self._cache_latents()
        for m in (self.model.unet, *self.model.text_encoders):
            move(m, self.device, weight_dtype)
        if cfg.xformers:
            self.model.unet.enable_xformers_memory_efficient_attention()
        if cfg.fp8_base or cfg.fp8_base_unet:  # before the adapters exist, so only the frozen base layers are stored in fp8
            store_in_fp8(self.model, cfg.fp8_base_unet, weight_dtype, log)
        spec = NetworkSpec(cfg.network_dim, cfg.network_alpha, cfg.conv_dim, cfg.conv_alpha, cfg.network_dropout,
                           train_unet=not cfg.network_train_text_encoder_only, train_text_encoder=not cfg.network_train_unet_only,
                           module_dims=dims_from_weights(cfg.network_weights, log) if cfg.dim_from_weights else None, **cfg.network_options())
        with seeded(cfg.seed, self.device):  # adapter init: same seed, same run
            self.network: Network = build_network(cfg.network_module, self.model, spec)
        # PEFT creates adapters in the base layer's dtype: under fp16/bf16 mixed precision they would train in half
        # precision (and fp16 gradients cannot be unscaled). They train in fp32, as sd-scripts' networks do, unless
        # --full_bf16 asks for bf16 weights, gradients and optimizer state.
        adapter_dtype = torch.bfloat16 if cfg.full_bf16 else torch.float16 if cfg.full_fp16 else torch.float32
        if cfg.full_fp16:
            allow_fp16_unscale(self.accelerator)
        for part in self.network.parts():
            for p in self.network.trainable_parameters(part):
                p.data = p.data.to(adapter_dtype)
        if self.network.kind == "oft" and cfg.network_alpha >= 1:
            log(f"note: OFT's network_alpha is its constraint per output channel; {cfg.network_alpha:g} hardly constrains "
                "(sd-scripts advises about 1e-3)")
        self.train_te = any(t.part != "unet" for t in self.network.targets)
        n_unet = sum(t.part == "unet" for t in self.network.targets)
        log(f"network: {self.network.kind}, {n_unet} UNet modules, {len(self.network.targets) - n_unet} text encoder modules; "
            f"dim {cfg.network_dim}, alpha {cfg.network_alpha} -> scale alpha/dim = {cfg.network_alpha / cfg.network_dim:.4g}"
            + (f"; conv dim {self.network.spec.conv_dim}, alpha {self.network.spec.conv_alpha}" if self.network.spec.conv_dim else ""))
        if cfg.torch_compile:  # in place (nn.Module.compile): the model, the network and sampling keep the same object
            self.model.unet.compile(backend=cfg.dynamo_backend)
            log(f"torch.compile: UNet with the {cfg.dynamo_backend} backend (the first steps compile)")
        if cfg.gradient_checkpointing:
            self.model.unet.enable_gradient_checkpointing()
            for te in self.model.text_encoders:
                te.gradient_checkpointing_enable()
        unet_lr = cfg.unet_lr if cfg.unet_lr is not None else cfg.learning_rate
        te_lrs = dict(zip((s.component for s in self.model.family.text_encoders), cfg.text_encoder_lrs(len(self.model.text_encoders))))
        groups = self.network.param_groups({part: unet_lr if part == "unet" else te_lrs[part] for part in self.network.parts()})
        if cfg.fused_backward_pass:  # each parameter updated from its backward hook, its gradient freed at once
            from .fused import FusedBackward

            if self.accelerator.num_processes > 1:
                raise ConfigError("fused_backward_pass: one process only (gradients would have to be summed first)")
            self.optimizer = FusedBackward(lambda one: create_optimizer(cfg.optimizer_type, one, cfg.learning_rate, cfg.optimizer_args),
                                           groups, cfg.max_grad_norm)
        else:
            self.optimizer = create_optimizer(cfg.optimizer_type, groups, cfg.learning_rate, cfg.optimizer_args)
        n_proc = self.accelerator.num_processes
        self.plan = self.data.plan(cfg.gradient_accumulation_steps, cfg.max_train_steps, cfg.max_train_epochs, processes=n_proc)
        log(self.plan.describe([s.batch_size * n_proc for s in self.data.specs])
            + (f" (batch {cfg.train_batch_size} per process x {n_proc} processes)" if n_proc > 1 else ""))
        self.dataset_meta = dataset_metadata(self.data)
        try:
            self.scheduler = create_scheduler(cfg.lr_scheduler_type or cfg.lr_scheduler, self.optimizer, self.plan.max_train_steps, cfg.lr_warmup_steps,
                                              cfg.lr_scheduler_num_cycles, cfg.lr_scheduler_power, cfg.lr_decay_steps,
                                              cfg.lr_scheduler_timescale, cfg.lr_scheduler_min_lr_ratio, cfg.learning_rate,
                                              cfg.lr_scheduler_args)
        except ValueError as e:
            raise ConfigError(str(e)) from None
        random_captions = any(changes_per_step(s) for spec in self.data.specs for s in spec.subsets)
        self.cond_cache = (ConditioningCache(self.model, cfg.clip_skip, cfg.max_token_length, cfg.weighted_captions)
                           if not (self.train_te or random_captions) else None)
        if cfg.cache_text_encoder_outputs or cfg.cache_text_encoder_outputs_to_disk:
            self._cache_text_encoder_outputs()
        self.optimizer = self.accelerator.prepare(self.optimizer)  # gradients are summed across processes in the loop
        self.global_step, self.epoch, self.micro = 0, 0, 0
        if self.resume_from is not None:
            self._resume(self.resume_from)
        elif cfg.network_weights:
            self._load_network_weights(Path(cfg.network_weights))
        log_dir = Path(cfg.logging_dir) if cfg.logging_dir else self.out_dir / "logs"
        self.writer = None
        if self.accelerator.is_main_process:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(log_dir / cfg.output_name))

    def _cache_text_encoder_outputs(self) -> None:
        """sd-scripts' --cache_text_encoder_outputs(_to_disk): every caption (held-out ones too) encoded up front,
        then the encoders leave the GPU; on disk, beside each image, the next run reads them back."""
        if self.cond_cache is None:
            raise ConfigError("cache_text_encoder_outputs: a dataset subset changes its captions from step to step "
                              "(shuffle, dropout) or a text encoder is trained; turn those off or the cache")
        files = {process_caption(it.caption, it.subset, random.Random(0), 0): it.image
                 for it in self.data.items() + self.data.validation_items()}
        self.cond_cache.fill(files, self.reporter, self.accelerator.autocast, self.cfg.cache_text_encoder_outputs_to_disk)
        if not self.cfg.sample_prompts:  # samples still need them
            for te in self.model.text_encoders:
                move(te, "cpu")
            self.cond_cache.frozen = True

    def _load_network_weights(self, path: Path) -> None:
        """Start from a training state folder, or from any kohya-layout LoRA file."""
        if path.is_dir():
            net_sd, _, _ = load_state(path)
            self.network.load_state_dict(net_sd)
            self.reporter.log(f"network weights from the state {path}")
            return
        from loratrain.core.weights import load_state_dict

        sd, _ = load_state_dict(path, allow_pickle=self.cfg.allow_pickle)
        try:
            n = self.network.load_kohya(sd, str(path))
        except ValueError as e:
            raise ConfigError(str(e)) from None
        total = len(self.network.targets)
        self.reporter.log(f"network weights from {path.name}: {n} of {total} modules"
                          + ("" if n == total else f" (the other {total - n} start fresh)"))

    def _cache_latents(self) -> None:
        vae = move(self.model.vae, self.device, torch.float32)
        gen = torch.Generator(device="cpu").manual_seed(self.cfg.seed)

        def encode(pixels: torch.Tensor) -> torch.Tensor:
            return sample_latents(vae, pixels, gen)

        total = len(self.data.items()) + len(self.data.validation_items())
        self.reporter.start(total, "caching latents", unit="img")
        self.data.cache_latents(encode, _vae_id(self.model), self.cfg.cache_latents_to_disk, self.cfg.on_bad_image,
                                progress=lambda n: self.reporter.advance(n))
        self.reporter.done("")
        live = sum(not it.latents for it in self.data.items())
        if live:
            self.reporter.log(f"{live} image(s) with color_aug / random_crop are VAE-encoded every step "
                              "(their pixels change); the others' latents are cached")
        elif self.cfg.network_kind == "full":
            self.model.vae.to("cpu")  # a full fine-tune saves the whole model, VAE included
        elif not self.cfg.sample_prompts:
            self.model.vae = None  # not needed again: its memory goes back before training starts
            del vae

    def _resume_source(self) -> Path | None:
        """The state to continue from: the newest complete one for 'latest' (checked before any model loads)."""
        if not self.cfg.resume:
            return None
        if self.cfg.resume != "latest":
            return Path(self.cfg.resume)
        found = find_state(self.state_dir)
        if found is None:
            raise ConfigError(f"nothing to resume: no complete training state {self.state_dir} (or .tmp/.old beside it); "
                              "run without --resume")
        if found != self.state_dir:
            self.reporter.log(f"note: {self.state_dir} is missing (a save was interrupted); resuming from {found}, "
                              "the newest complete state")
        return found

    def _resume(self, path: Path) -> None:
        net_sd, opt_sd, info = load_state(path)
        self._check_state(path, info)
        self.network.load_state_dict(net_sd)
        self._load_optimizer(path, opt_sd["optimizer"])
        self.scheduler.load_state_dict(opt_sd["scheduler"])
        if info.get("max_train_steps") != self.plan.max_train_steps:
            self.reporter.log(f"WARNING: the saved run planned {info.get('max_train_steps')} steps, this one {self.plan.max_train_steps}")
        self.global_step, self.epoch, self.micro = info["global_step"], info["epoch"], info["micro"]
        self.losses = list(info.get("losses", []))
        self.val_losses = [(int(s), float(v)) for s, v in info.get("val_losses", [])]
        self.reporter.log(f"resumed from {path} at step {self.global_step} (epoch {self.epoch + 1}, batch {self.micro})")

    def _check_state(self, path: Path, info: dict) -> None:
        """A state folder this run cannot continue from is refused here (the full fine-tune checks its kind)."""

    def _load_optimizer(self, path: Path, state: dict) -> None:
        self.optimizer.load_state_dict(state)

    # -- one micro-batch -----------------------------------------------------------------------
    def _loss(self, batch: list[tuple[Item, bool]], epoch: int, micro: int, first: int, global_size: int,
              seed: int | None = None, timestep: int | None = None) -> torch.Tensor:
        """This process's per-sample losses summed and divided by the global batch size.

        Noise, timestep and caption randomness is drawn per sample, seeded by (seed, epoch, batch,
        position in the global batch): a sample gets the same draws whichever process trains it,
        which is what makes N processes equal one with N times the batch. Batch-level draws
        (offset noise strength, pyramid noise) are seeded by the share's first position.
        Validation passes its own seed and a fixed timestep.
        """
        cfg, model = self.cfg, self.model
        seed = cfg.seed if seed is None else seed
        sched = self.noise_scheduler
        crops, views = [it.crop_top_left for it, _ in batch], []
        for i, (it, flip) in enumerate(batch):
            if it.latents:
                views.append(it.latents[1 if flip else 0])
            else:  # color_aug / random_crop: this step's pixels, encoded now (seeded per sample and step)
                latent, crops[i] = self._live_latent(it, flip, (seed, epoch, micro, first + i))
                views.append(latent)
        latents = torch.stack([v.to(self.device) for v in views])
        gens = [torch.Generator(device="cpu").manual_seed(_seed_for(seed, epoch, micro, 2, first + i)) for i in range(len(batch))]
        captions = [process_caption(it.caption, it.subset, random.Random(_seed_for(seed, epoch, micro, 1, first + i)), epoch,
                                    self.global_step, self.plan.max_train_steps) for i, (it, _) in enumerate(batch)]
        shape = latents.shape[1:]
        noise = torch.stack([torch.randn(shape, generator=g) for g in gens]).to(self.device)
        t = torch.cat([torch.randint(cfg.min_timestep, cfg.max_timestep, (1,), generator=g) for g in gens]).to(self.device)
        if timestep is not None:
            t = torch.full_like(t, timestep)
        perturb = None
        if cfg.ip_noise_gamma:
            strength = [cfg.ip_noise_gamma * (torch.rand((), generator=g).item() if cfg.ip_noise_gamma_random_strength else 1.0)
                        for g in gens]
            perturb = torch.stack([torch.randn(shape, generator=g) * s for g, s in zip(gens, strength)]).to(self.device)
        gen = torch.Generator(device="cpu").manual_seed(_seed_for(seed, epoch, micro, 4, first))
        if cfg.noise_offset:
            noise = offset_noise(noise, latents, cfg.noise_offset, cfg.noise_offset_random_strength, cfg.adaptive_noise_scale, gen)
        if cfg.multires_noise_iterations:
            noise = pyramid_noise(noise, cfg.multires_noise_iterations, cfg.multires_noise_discount, gen)
        noisy = sched.add_noise(latents, noise if perturb is None else noise + perturb, t)  # the target keeps the plain noise
        with self.accelerator.autocast():
            cond = (self.cond_cache(captions) if self.cond_cache
                    else encode_prompts(model, captions, cfg.clip_skip, cfg.max_token_length, cfg.weighted_captions))
            time_ids = None
            if model.family.is_sdxl:
                time_ids = sdxl_time_ids([it.original_size for it, _ in batch], crops,
                                         [it.bucket for it, _ in batch], self.device, cond.hidden.dtype)
            pred = model.unet(noisy.to(cond.hidden.dtype), t, **cond.unet_kwargs(time_ids)).sample
        v_pred = model.prediction_type == "v_prediction"
        target = sched.get_velocity(latents, noise, t) if v_pred else noise
        c = huber_c(sched, t, cfg.huber_schedule, cfg.huber_c, cfg.huber_scale) if cfg.loss_type in ("huber", "smooth_l1") else None
        loss = elementwise_loss(pred.float(), target.float(), cfg.loss_type, c)
        if any(it.mask for it, _ in batch):  # masked loss: per-pixel weights at latent size (1 where an item has none)
            loss = loss * torch.stack([it.mask[1 if flip else 0].to(loss.device) if it.mask else torch.ones_like(loss[0, :1])
                                       for it, flip in batch])
        loss = loss.mean(dim=(1, 2, 3))
        weights = torch.tensor([cfg.prior_loss_weight if it.subset.is_reg else 1.0 for it, _ in batch], device=self.device)
        loss = loss * weights
        if cfg.min_snr_gamma:
            loss = loss * min_snr_weight(sched, t, cfg.min_snr_gamma, v_pred)
        if cfg.debiased_estimation_loss:
            loss = loss * debiased_weight(sched, t, v_pred)
        if cfg.scale_v_pred_loss_like_noise_pred or cfg.v_pred_like_loss:
            scale = snr_scale(sched, t)
            if cfg.scale_v_pred_loss_like_noise_pred:
                loss = loss * scale
            if cfg.v_pred_like_loss:
                loss = loss + loss / scale * cfg.v_pred_like_loss
        return loss.sum() / global_size

    @torch.no_grad()
    def _live_latent(self, it: Item, flip: bool, where: tuple[int, ...]) -> tuple[torch.Tensor, tuple[int, int]]:
        """One augmented view of a live item through the VAE: its crop and colour, and the posterior sample, drawn
        from seeds of (seed, epoch, batch, position), like the rest of the step's randomness."""
        pixels, crop = TrainData.live_pixels(it, flip, random.Random(_seed_for(*where, 6)))
        return sample_latents(self.model.vae, pixels[None], torch.Generator().manual_seed(_seed_for(*where, 7)))[0].cpu(), crop

    # -- the loop ------------------------------------------------------------------------------
    def run(self) -> TrainResult:
        cfg, plan, acc = self.cfg, self.plan, self.accelerator
        if cfg.sample_at_first and self.global_step == 0:
            self._sample(epoch=None)
        self.reporter.start(plan.max_train_steps, "training", initial=self.global_step)
        for m in self.network.parts().values():
            m.train()
        accum = cfg.gradient_accumulation_steps
        stopped = False
        params = [p for g in self.optimizer.param_groups for p in g["params"]]
        summed = hand_reduced(params)  # FSDP reduces (sums) its sharded parameters' gradients itself
        self._optimizer_mode("train")
        while self.global_step < plan.max_train_steps and self.epoch < plan.epochs and not stopped:
            batches = self.data.batches_for_epoch(self.epoch, cfg.seed, acc.num_processes)
            while self.micro < len(batches) and self.global_step < plan.max_train_steps:
                group = batches[self.micro: self.micro + accum]
                step_loss = 0.0
                self.network.begin_step(_seed_for(cfg.seed, self.epoch, self.micro, 5, 0))
                for offset, global_batch in enumerate(group):
                    batch, first = local_share(global_batch, acc.process_index, acc.num_processes)
                    idle = not batch
                    if idle and not self.sharded:
                        continue
                    if idle:  # FSDP: every process takes part in each forward / backward; this one adds nothing
                        batch, first = list(global_batch[:1]), 0
                    # dropout: per process, so shares of one batch do not get the same masks
                    with seeded(_seed_for(cfg.seed, self.epoch, self.micro + offset, 3, acc.process_index), self.device):
                        loss = self._loss(batch, self.epoch, self.micro + offset, first, len(global_batch))
                        loss = loss * 0.0 if idle else loss
                        acc.backward(loss / len(group))
                    step_loss += loss.item() / len(group)
                stop_asked = None
                if acc.num_processes > 1:  # one collective: gradients, the loss, and whether any process was asked to stop
                    step_loss, stops = sum_across_processes(summed, [step_loss, float(self.stop.is_set())], self.device)
                    stop_asked = stops > 0  # the same answer in every process, so all stop after the same step
                if not math.isfinite(step_loss):
                    self._nan(step_loss)
                if cfg.max_grad_norm > 0 and not cfg.fused_backward_pass:  # fused: clipped per tensor in its hook
                    acc.clip_grad_norm_(params, cfg.max_grad_norm)
                self.optimizer.step()
                self.network.end_step()
                self.scheduler.step()
                self.optimizer.zero_grad(set_to_none=True)
                norms = self.network.apply_max_norm(cfg.scale_weight_norms) if cfg.scale_weight_norms else None
                self.micro += len(group)
                self.global_step += 1
                self.losses.append(step_loss)
                self._log_step(step_loss, norms)
                if self.micro >= len(batches):
                    self.epoch, self.micro = self.epoch + 1, 0
                    self._after_epoch()
                self._after_step()
                if stop_asked if stop_asked is not None else self.stop.is_set():
                    stopped = True
                    break
            else:
                if self.micro >= len(batches):  # an epoch with nothing left (resumed at its end)
                    self.epoch, self.micro = self.epoch + 1, 0
        final = self._save_final()
        if self.writer:
            self.writer.close()
        self.reporter.done("")
        return TrainResult(lora_path=final, state_dir=self.state_dir, global_step=self.global_step, epoch=self.epoch,
                           losses=self.losses, val_losses=self.val_losses, samples=self.samples, stopped=stopped,
                           saved="checkpoint" if self.network.kind == "full" else "LoRA")

    def _nan(self, loss: float) -> None:
        where = f"step {self.global_step + 1} (epoch {self.epoch + 1})"
        last = f"the last good save is {self.last_save}" if self.last_save else "nothing was saved yet"
        raise TrainingError(f"loss became {loss} at {where}; training stopped and {last} (left intact). "
                            "Common causes: fp16 overflow (try bf16 or no mixed precision), a learning rate that is too high.")

    def _log_step(self, loss: float, norms: tuple[int, float, float] | None = None) -> None:
        recent = self.losses[-50:]
        lrs = {str(g.get("name", i)): g["lr"] for i, g in enumerate(self.optimizer.param_groups)}
        extra = {"keys_scaled": norms[0], "average_key_norm": norms[1], "max_key_norm": norms[2]} if norms else {}
        self.reporter.advance(1, loss=loss, avg=sum(recent) / len(recent), **{f"lr_{k}": v for k, v in lrs.items()}, **extra)
        if self.writer:
            self.writer.add_scalar("loss/current", loss, self.global_step)
            self.writer.add_scalar("loss/average", sum(recent) / len(recent), self.global_step)
            for k, v in lrs.items():
                self.writer.add_scalar(f"lr/{k}", v, self.global_step)
            for k, v in extra.items():
                self.writer.add_scalar(f"max_norm/{k}", v, self.global_step)

    def _after_epoch(self) -> None:
        cfg = self.cfg
        done = self.global_step >= self.plan.max_train_steps or self.epoch >= self.plan.epochs
        every = max(1, self.plan.epochs // cfg.save_n_epoch_ratio) if cfg.save_n_epoch_ratio else cfg.save_every_n_epochs
        if every and self.epoch % every == 0 and not done:
            self._save(self.out_dir / f"{cfg.output_name}-{self.epoch:06d}.safetensors")
            prune_saves(self.out_dir, cfg.output_name, "epoch", cfg.save_last_n_epochs, upto=self.epoch)
        if cfg.sample_every_n_epochs and self.epoch % cfg.sample_every_n_epochs == 0:
            self._sample(epoch=self.epoch)
        if self.epoch % (cfg.validate_every_n_epochs or 1) == 0:
            validate(self, "epoch")

    def _after_step(self) -> None:
        cfg = self.cfg
        done = self.global_step >= self.plan.max_train_steps
        if cfg.save_every_n_steps and self.global_step % cfg.save_every_n_steps == 0 and not done:
            self._save(self.out_dir / f"{cfg.output_name}-step{self.global_step:08d}.safetensors")
            prune_saves(self.out_dir, cfg.output_name, "step", cfg.save_last_n_steps, upto=self.global_step)
        if cfg.sample_every_n_steps and self.global_step % cfg.sample_every_n_steps == 0:
            self._sample(epoch=None)
        if cfg.validate_every_n_steps and self.global_step % cfg.validate_every_n_steps == 0:
            validate(self, "step")

    def _metadata(self) -> dict[str, str]:
        if "model_hashes" not in self.session:
            self.session["model_hashes"] = self._model_hashes.result()
        epoch = self.epoch + 1 if self.micro else max(self.epoch, 1)  # sd-scripts counts epochs from 1
        return lora_metadata(self.cfg, self.model, self.network.kind, self.network.args(), self.plan, self.session,
                             epoch, self.global_step, self.dataset_meta, self.accelerator.num_processes)

    def _state_info(self) -> dict:
        return {"global_step": self.global_step, "epoch": self.epoch, "micro": self.micro, "max_train_steps": self.plan.max_train_steps,
                "losses": self.losses, "val_losses": self.val_losses, "network_module": self.network.kind, "seed": self.cfg.seed,
                "schema_version": self.cfg.SCHEMA_VERSION, "config": self.cfg.model_dump()}

    def _optimizer_mode(self, mode: str) -> None:
        """Schedule-free optimizers keep two points; the averaged one ("eval") is the one to save and sample from."""
        inner = getattr(self.optimizer, "optimizer", self.optimizer)
        if callable(getattr(inner, "eval", None)) and callable(getattr(inner, "train", None)):
            getattr(inner, mode)()

    def _save(self, path: Path) -> None:
        if not self.accelerator.is_main_process:
            return
        self._optimizer_mode("eval")
        self.last_save = self.network.save(path, self.cfg.save_precision, self._metadata(), self.cfg.save_peft_format)
        save_state(self.state_dir, self.network, self.optimizer, self.scheduler, self._state_info())
        self._optimizer_mode("train")
        self.reporter.log(f"saved {path.name} and training state (step {self.global_step})")

    def _save_final(self) -> Path | None:
        path = self.out_dir / f"{self.cfg.output_name}.safetensors"
        self._save(path)
        return path

    def _sample(self, epoch: int | None) -> None:
        cfg = self.cfg
        if not cfg.sample_prompts or not self.accelerator.is_main_process:
            return
        res = cfg.resolution_wh()
        prompts = load_prompts(cfg.sample_prompts, SamplePrompt("", width=res[0], height=res[1]))
        self.model.vae.to(self.device)
        parts = list(self.network.parts().values())
        self._optimizer_mode("eval")
        for m in parts:
            m.eval()
        sample_dir = self.out_dir / "sample"
        paths, captions = [], []
        with self.accelerator.autocast():
            for i, p in enumerate(prompts):
                if p.seed is None:
                    p.seed = cfg.seed + i
                path = generate(self.model, p, sample_dir / sample_file_name(cfg.output_name, epoch, self.global_step, i, p.seed),
                                cfg.sample_sampler, cfg.clip_skip, {"loratrain_step": str(self.global_step)}).path
                paths.append(path)
                captions.append(f"step {self.global_step}: {p.prompt}")
                if self.writer:
                    import numpy as np
                    from PIL import Image

                    self.writer.add_image(f"sample/{i:02d}", np.asarray(Image.open(path).convert("RGB")), self.global_step, dataformats="HWC")
        for m in parts:
            m.train()
        self._optimizer_mode("train")
        self.samples.extend(paths)
        self.reporter.sample([str(p) for p in paths], captions)


@job
def run_train(cfg: TrainConfig, reporter: Reporter, stop: StopFlag) -> TrainResult:
    """Train a LoRA / LoCon.

    cfg: the TrainConfig (checked before anything loads). reporter: phases "caching latents" and
    "training" (metrics loss, avg per step), logs, sample images. stop: finishes the current step,
    saves a resumable state and returns with `stopped` set.
    Result: the LoRA file, the state folder, the step and epoch reached, the per-step losses, samples.
    """
    if cfg.is_flux() or cfg.is_sd3():  # FLUX.1, SD3 / SD3.5: the same data, loop, saving and resume on a flow-matching
        from .flux_full import flux_trainer_class  # transformer; the LoRA trainer or the full fine-tune's

        trainer: LoRATrainer = flux_trainer_class(cfg)(cfg, reporter, stop)
    else:
        trainer = LoRATrainer(cfg, reporter, stop)
    trainer.setup()
    return trainer.run()
