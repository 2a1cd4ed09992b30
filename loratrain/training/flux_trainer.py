"""FLUX.1 LoRA training: `loratrain train` with a FLUX.1 base model, as sd-scripts' flux_train_network.py trains it.

Why a subclass of the SD trainer: the data (N_concept folders, dataset TOML, captions, buckets, latent caching), the
step loop, gradient accumulation, saving, pruning, validation, NaN stop and bit-exact resume are the same; what
differs is the model (transformer + CLIP-L + T5-XXL + 16-channel AE, core/models/flux_loading.py), the conditioning
(CLIP-L pooled + T5 sequence and mask, encoded once per caption and kept in memory, then the encoders are freed) and
the loss (flow matching, training/flow_matching.py, with sd-scripts' option names).

Text encoders train as sd-scripts' flux_train_network.py trains them: without --network_train_unet_only a CLIP-L LoRA
(`lora_te1_*`), with network_args train_t5xxl=True a T5-XXL LoRA too (`lora_te3_*`), saved in the one file beside
`lora_unet_*` (networks/flux.py FLOW_TEXT_ENCODERS: the SD trainer's PEFT network of the run's kind). Their captions are then encoded
every step with gradients (no caption cache), at text_encoder_lr per encoder (sd-scripts' [CLIP-L, T5] list).

Chroma (a FLUX.1 derivative, core/models/chroma.py) trains here too, as sd-scripts' `--model_type chroma` does: no
CLIP-L (its pooled input is a zero placeholder the model ignores), the T5 mask required, guidance_scale fed to its
approximator, and sd-scripts' chroma metadata (ss_base_model_version / modelspec architecture "chroma").

Determinism is the SD trainer's: every sample's noise and timestep come from a generator seeded by (seed, epoch,
batch, position), so a resumed run replays exactly the steps an unbroken one takes.
"""
from __future__ import annotations

import contextlib
import hashlib
import random
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch

from loratrain.core import flux_sampling
from loratrain.core.errors import ConfigError
from loratrain.core.flux_sampling import (
    FluxTextOptions,
    model_label,
    t5_length,
)
from loratrain.core.lora.flux_network import create_flux_lora
from loratrain.core.lora.hashes import model_file_hashes
from loratrain.core.models.flux_loading import flux_sources, load_flux
from loratrain.core.precision import dtype_of

from . import flow_matching as fm
from .data.captions import changes_per_step, process_caption
from .data.dataset import Item, TrainData
from .metadata import dataset_metadata, lora_metadata
from .networks.base import NetworkSpec
from .networks.flux import FLOW_TEXT_ENCODERS, FluxNetwork
from .noise import elementwise_loss
from .optim import create_optimizer, create_scheduler
from .trainer import LoRATrainer, _seed_for, build_specs, sample_latents, seeded

#: sd-scripts' FLUX metadata keys (flux_train_network.py update_metadata) and the options they record
FLUX_METADATA = ("apply_t5_attn_mask", "weighting_scheme", "logit_mean", "logit_std", "mode_scale", "guidance_scale",
                 "timestep_sampling", "sigmoid_scale", "model_prediction_type", "discrete_flow_shift")


class FluxLoRATrainer(LoRATrainer):
    #: the model's text encoders (attribute names): cached captions free them
    ENCODERS: tuple[str, ...] = ("clip_l", "t5xxl")
    #: the family's text encoding (encode_texts / encode_texts_grad / encode_text): core/flux_sampling.py here
    TEXT: Any = flux_sampling
    #: the options sd-scripts records as ss_<name> for this family
    METADATA_KEYS: tuple[str, ...] = FLUX_METADATA

    # -- setup ---------------------------------------------------------------------------------
    def setup(self) -> None:
        cfg, log = self.cfg, self.reporter.log
        for note in cfg.notes:
            log(note)
        for note in cfg.unused_settings():
            log(f"note: {note}")
        sources = self._sources()
        self.resume_from = self._resume_source()
        self.data = TrainData(build_specs(cfg, log), log=log, seed=cfg.seed)
        weight_dtype = dtype_of(self.precision)
        self._model_hashes = ThreadPoolExecutor(1, thread_name_prefix="loratrain-hash").submit(
            model_file_hashes, cfg.pretrained_model_name_or_path) if self.accelerator.is_main_process else None
        self._load_model(sources, weight_dtype)
        self.te_parts = self._trained_encoders()
        with self.accelerator.main_process_first() if cfg.cache_latents_to_disk else contextlib.nullcontext():
            self._cache_latents()  # on disk: encoded once, by the first process; the others read its files
        self._cache_captions()
        transformer = self.flux.transformer
        self.block_swap = self._place(transformer, weight_dtype)
        with seeded(cfg.seed, self.device):  # adapter init: same seed, same run
            self.network = self._build_network()
        from .flux_memory import adapter_dtype

        self.network.net.to(self.device, adapter_dtype(cfg)).apply_to(transformer)  # fp32 as sd-scripts' (bf16: full_bf16)
        self.train_te, self.cond_cache = self.network.te is not None, None
        if self.network.te is not None:
            for part in self.network.te.parts():
                for p in self.network.te.trainable_parameters(part):
                    p.data = p.data.to(self.device, adapter_dtype(cfg))
        if cfg.cpu_offload_checkpointing and not cfg.gradient_checkpointing:
            log("cpu_offload_checkpointing turns gradient checkpointing on for the transformer (as sd-scripts' flux_train.py)")
        if cfg.gradient_checkpointing or cfg.cpu_offload_checkpointing:
            transformer.enable_gradient_checkpointing(cpu_offload=cfg.cpu_offload_checkpointing)
            transformer.train()  # checkpointing runs in train mode only; FLUX has no dropout, so nothing else changes
        if cfg.gradient_checkpointing:
            for _, _, attr, _ in self.te_parts:  # sd-scripts: the trained encoders checkpoint too (their inputs get grads)
                te = getattr(self.flux, attr)
                (getattr(te, "activation_checkpointing_enable", None) or te.gradient_checkpointing_enable)()
        unet_lr = cfg.unet_lr if cfg.unet_lr is not None else cfg.learning_rate
        lrs = {"unet": unet_lr, **{component: self._text_encoder_lr(slot) for component, _, _, slot in self.te_parts}}
        self.optimizer = create_optimizer(cfg.optimizer_type, self.network.param_groups(lrs), cfg.learning_rate,
                                          cfg.optimizer_args)
        n_proc = self.accelerator.num_processes
        self.plan = self.data.plan(cfg.gradient_accumulation_steps, cfg.max_train_steps, cfg.max_train_epochs, processes=n_proc)
        log(self.plan.describe([s.batch_size * n_proc for s in self.data.specs])
            + (f" (batch {cfg.train_batch_size} per process x {n_proc} processes)" if n_proc > 1 else ""))
        self.dataset_meta = dataset_metadata(self.data)
        try:
            self.scheduler = create_scheduler(cfg.lr_scheduler_type or cfg.lr_scheduler, self.optimizer, self.plan.max_train_steps,
                                              cfg.lr_warmup_steps, cfg.lr_scheduler_num_cycles, cfg.lr_scheduler_power,
                                              cfg.lr_decay_steps, cfg.lr_scheduler_timescale, cfg.lr_scheduler_min_lr_ratio,
                                              cfg.learning_rate, cfg.lr_scheduler_args)
        except ValueError as e:
            raise ConfigError(str(e)) from None
        self.optimizer = self.accelerator.prepare(self.optimizer)
        self.global_step, self.epoch, self.micro = 0, 0, 0
        if self.resume_from is not None:
            self._resume(self.resume_from)
        elif cfg.network_weights:
            self._load_network_weights(Path(cfg.network_weights))
        self.writer = None
        if self.accelerator.is_main_process:
            from torch.utils.tensorboard import SummaryWriter

            log_dir = cfg.logging_dir or str(self.out_dir / "logs")
            self.writer = SummaryWriter(str(Path(log_dir) / cfg.output_name))

    # -- the family's parts (SD3's trainer overrides these) -------------------------------------------------------
    def _sources(self):
        cfg = self.cfg
        return flux_sources(cfg.pretrained_model_name_or_path, cfg.clip_l, cfg.t5xxl, cfg.ae, cfg.t5_tokenizer,
                            cfg.model_type)

    def _load_model(self, sources, weight_dtype: torch.dtype) -> None:
        cfg = self.cfg
        self.flux = load_flux(sources, weight_dtype)
        self.variant = self.flux.variant
        self.t5_len = t5_length(cfg, self.variant)  # Chroma: 512 unless set, as sd-scripts (not schnell)
        self.text_opts = FluxTextOptions(self.t5_len, cfg.apply_t5_attn_mask)
        chroma = self.flux.config.chroma
        self.extra_meta = {"ss_model_type": "chroma" if chroma else "flux"}  # sd-scripts' --model_type, resolved
        for note in sources.notes:
            self.reporter.log(f"note: {note}")
        if chroma and cfg.guidance_scale != 0:
            self.reporter.log(f"note: guidance_scale {cfg.guidance_scale:g} feeds Chroma's approximator as sd-scripts "
                              "does; its docs say Chroma needs --guidance_scale 0.0 (it is not guidance-distilled)")
        clip = f"CLIP-L {sources.clip_l.path.name}, " if sources.clip_l is not None else ""
        self.reporter.log(f"model: {model_label(self.flux)} from {sources.transformer.path.name} ({clip}T5-XXL "
                          f"{sources.t5xxl.path.name}, AE {sources.ae.path.name}); T5 tokens {self.t5_len}")

    def _place(self, transformer: torch.nn.Module, weight_dtype: torch.dtype):
        from .flux_memory import place_transformer  # fp8_base, blocks_to_swap

        return place_transformer(transformer, self.cfg, self.device, weight_dtype, self.reporter.log)

    def _trained_encoders(self) -> list[tuple[str, str, str, int]]:
        """(part, kohya prefix, model attribute, text_encoder_lr slot) of each text encoder whose LoRA trains, as
        sd-scripts' lora_flux picks them: CLIP-L unless network_train_unet_only, T5-XXL with train_t5xxl."""
        cfg, log = self.cfg, self.reporter.log
        if cfg.network_train_unet_only:
            return []
        out = [("text_encoder", "lora_te1", "clip_l", 0)] if self.flux.clip_l is not None else []
        if cfg.train_t5xxl:
            out.append(("text_encoder_3", "lora_te3", "t5xxl", 1))
        if not out:
            log("note: Chroma has no CLIP-L, so only the transformer trains (network_args train_t5xxl=True trains T5)")
        return out

    def _text_encoder_lr(self, slot: int) -> float:
        """sd-scripts' text_encoder_lr list: one value for every encoder, else one per slot, the last repeated."""
        lrs = list(self.cfg.text_encoder_lr) or [self.cfg.learning_rate]
        return lrs[min(slot, len(lrs) - 1)]

    def _te_network(self) -> Any:
        """The text-encoder LoRA on the encoders that train (None: the transformer only), logged per encoder."""
        if not self.te_parts:
            return None
        cfg = self.cfg
        te = FLOW_TEXT_ENCODERS[self.adapter_kind]([(part, prefix, getattr(self.flux, attr)) for part, prefix, attr, _ in self.te_parts],
                                                   NetworkSpec(cfg.network_dim, cfg.network_alpha, train_unet=False))
        for part, prefix, attr, slot in self.te_parts:
            n = sum(t.part == part for t in te.targets)
            self.reporter.log(f"network: {n} {prefix}_* modules on {attr} (text_encoder_lr {self._text_encoder_lr(slot):g})")
        return te

    @property
    def adapter_kind(self) -> str:
        """lora (sd-scripts' lora_flux / lora_sd3), or the LyCORIS kind (loha, lokr, dora) on the same modules."""
        from .options.flux import FLOW_LYCORIS

        kind = self.cfg.network_kind
        return kind if kind in FLOW_LYCORIS else "lora"

    def _network_args(self, args: dict[str, str]) -> dict[str, str]:
        """ss_network_args: the run's network_args as sd-scripts (or LyCORIS' kohya wrapper: algo=) records them."""
        kind = self.adapter_kind
        if kind != "lora":  # DoRA is LyCORIS' LoRA with dora_wd
            args = {**args, **({"algo": "lora", "dora_wd": "True"} if kind == "dora" else {"algo": kind})}
        return {**args, "train_t5xxl": "True"} if self.cfg.train_t5xxl else args

    def _network_label(self, net: Any) -> str:
        kind = self.adapter_kind
        if kind == "lora":
            return f"networks.{'lora_sd3' if net.label == 'SD3' else 'lora_flux'}"
        return "lycoris.kohya algo=lora dora_wd=True" if kind == "dora" else f"lycoris.kohya algo={kind}"

    def _build_network(self) -> FluxNetwork:
        cfg = self.cfg
        args = {"train_blocks": cfg.train_blocks} if cfg.train_blocks != "all" else {}
        if cfg.split_qkv:
            args["split_qkv"] = "True"
        if cfg.in_dims:
            args["in_dims"] = str(cfg.in_dims_list())
        net = create_flux_lora(self.flux.config, cfg.network_dim, cfg.network_alpha, cfg.train_blocks, cfg.split_qkv,
                               cfg.in_dims_list(), self.adapter_kind)
        network = FluxNetwork(net, NetworkSpec(cfg.network_dim, cfg.network_alpha, train_text_encoder=bool(self.te_parts)),
                              self._network_args(args), self._te_network())
        network.diffusers_copy = cfg.save_diffusers_layout
        self.reporter.log(f"network: {self._network_label(net)}, {len(net.lora)} modules (train_blocks {cfg.train_blocks}"
                          f"{', split_qkv' if cfg.split_qkv else ''}); dim {cfg.network_dim}, alpha {cfg.network_alpha} "
                          f"-> scale alpha/dim = {cfg.network_alpha / cfg.network_dim:.4g}")
        return network

    def _cache_latents(self) -> None:
        """The SD trainer's cache, through FLUX's AE: (z - shift_factor) * scaling_factor (sample_latents)."""
        torch.nn.Module.to(self.flux.ae, self.device, torch.float32)
        gen = torch.Generator(device="cpu").manual_seed(self.cfg.seed)
        w = self.flux.ae.encoder.conv_in.weight.detach().float().cpu().numpy().tobytes()
        ae_id = "flux-" + hashlib.sha256(w).hexdigest()[:16]
        total = len(self.data.items()) + len(self.data.validation_items())
        self.reporter.start(total, "caching latents", unit="img")
        self.data.cache_latents(lambda px: sample_latents(self.flux.ae, px, gen), ae_id, self.cfg.cache_latents_to_disk, self.cfg.on_bad_image,
                                progress=lambda n: self.reporter.advance(n))
        self.reporter.done("")
        live = sum(not it.latents for it in self.data.items())
        if live:
            self.reporter.log(f"{live} image(s) with color_aug / random_crop are encoded every step (their pixels change)")
        elif not self.cfg.sample_prompts:  # sample images decode with it
            self.flux.ae = None  # not needed again: its memory goes back before training starts

    # -- conditioning (core/flux_sampling.py's encode_texts: the captions and the sample prompts alike) ----------------
    def _cache_captions(self) -> None:
        """Every caption encoded once and kept in memory; the encoders are then freed. Captions that change per step
        (shuffle, dropout, wildcards) keep the encoders and are encoded as they come."""
        for name in self.ENCODERS:
            if getattr(self.flux, name) is not None:  # Chroma has no CLIP-L
                torch.nn.Module.to(getattr(self.flux, name), self.device)
        from .flow_text_cache import FlowTextCache, encoder_id

        self.text_cache = FlowTextCache()
        self.sample_cache: dict = {}  # sample prompts, encoded before the encoders go (empty: they stay)
        self.live_captions = any(changes_per_step(s) for spec in self.data.specs for s in spec.subsets) or bool(self.te_parts)
        files = {process_caption(it.caption, it.subset, random.Random(0), 0): it.image
                 for it in sorted(self.data.items() + self.data.validation_items(), key=lambda it: str(it.image))}
        if not self.live_captions:
            to_disk = bool(self.cfg.cache_text_encoder_outputs_to_disk)
            encoder = encoder_id(type(self).__name__ + self.variant, self.text_opts,
                                 [getattr(self.flux, n) for n in self.ENCODERS]) if to_disk else ""
            with self.accelerator.main_process_first() if to_disk else contextlib.nullcontext():  # one process writes
                self.text_cache.fill(files, lambda c: self._encode([c]), self.reporter, encoder, to_disk)
            self._encode_sample_prompts()
            for name in self.ENCODERS:
                setattr(self.flux, name, None)
        elif self.te_parts:
            self.reporter.log("text encoders train: they stay loaded and encode the captions every step, with gradients")
        else:
            self.reporter.log("captions change from step to step: the text encoders stay loaded and encode every step")

    def _encode(self, texts: list[str]) -> tuple[torch.Tensor, ...]:
        if self.te_parts and torch.is_grad_enabled():  # a training step: backward reaches the text-encoder LoRA
            return self.TEXT.encode_texts_grad(self.flux, texts, self.text_opts)
        return self.TEXT.encode_texts(self.flux, texts, self.text_opts)

    def _encode_one(self, text: str) -> tuple[torch.Tensor, ...]:
        return self.TEXT.encode_text(self.flux, text, self.text_opts)

    def _conditioning(self, captions: list[str]) -> tuple[torch.Tensor, ...]:
        if self.live_captions:
            return self._encode(captions)
        missing = [c for c in captions if c not in self.text_cache]
        if missing:
            raise ConfigError(f"caption {missing[0]!r} was not cached (a caption that changes between steps)")
        outs = [self.text_cache[c] for c in captions]
        return tuple(torch.stack([o[k] for o in outs]).to(self.device) for k in range(len(outs[0])))

    # -- one micro-batch -----------------------------------------------------------------------
    def _loss(self, batch: list[tuple[Item, bool]], epoch: int, micro: int, first: int, global_size: int,
              seed: int | None = None, timestep: int | None = None) -> torch.Tensor:
        """This process's per-sample flow-matching losses summed and divided by the global batch size; each sample's
        noise and sigma from its own generator (seed, epoch, batch, position). Validation passes a fixed timestep."""
        cfg = self.cfg
        seed = cfg.seed if seed is None else seed
        views = [it.latents[1 if flip else 0] if it.latents else self._live_latent(it, flip, (seed, epoch, micro, first + i))[0]
                 for i, (it, flip) in enumerate(batch)]
        latents = torch.stack([v.to(self.device) for v in views]).float()
        gens = [torch.Generator(device="cpu").manual_seed(_seed_for(seed, epoch, micro, 2, first + i)) for i in range(len(batch))]
        captions = [process_caption(it.caption, it.subset, random.Random(_seed_for(seed, epoch, micro, 1, first + i)), epoch,
                                    self.global_step, self.plan.max_train_steps) for i, (it, _) in enumerate(batch)]
        noise = torch.stack([torch.randn(latents.shape[1:], generator=g) for g in gens]).to(self.device)
        with self.accelerator.autocast():
            pred, target, weighting = self._forward(latents, noise, self._conditioning(captions), gens, timestep)
        loss = elementwise_loss(pred.float(), target.float(), cfg.loss_type)
        if weighting is not None:
            loss = loss * weighting
        if any(it.mask for it, _ in batch):  # masked loss: per-pixel weights at latent size (1 where an item has none)
            loss = loss * torch.stack([it.mask[1 if flip else 0].to(loss.device) if it.mask else torch.ones_like(loss[0, :1])
                                       for it, flip in batch])
        loss = loss.mean(dim=(1, 2, 3))
        weights = torch.tensor([cfg.prior_loss_weight if it.subset.is_reg else 1.0 for it, _ in batch], device=self.device)
        return (loss * weights).sum() / global_size

    def _forward(self, latents: torch.Tensor, noise: torch.Tensor, cond: tuple[torch.Tensor, ...], gens: list,
                 timestep: int | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """(prediction, target, loss weighting or None): a drawn sigma per sample from its generator, or validation's
        fixed timestep. The family's own step (SD3's trainer overrides this)."""
        cfg, model = self.cfg, self.flux.transformer
        pooled, t5, mask = cond
        if timestep is not None:
            return self._fixed_sigma(model, latents, noise, t5, pooled, mask, timestep)
        pred, target, _, weighting = fm.flux_prediction(
            model, latents, noise, t5, pooled, cfg, gens, t5_mask=mask, ip_noise_gamma=cfg.ip_noise_gamma,
            ip_noise_gamma_random_strength=cfg.ip_noise_gamma_random_strength)
        return pred, target, weighting

    def _fixed_sigma(self, model, latents, noise, t5, pooled, mask, timestep: int):
        """Validation's forward at sigma = timestep / 1000 for every sample (flux_prediction without the draw)."""
        sigmas = torch.full((latents.shape[0], 1, 1, 1), timestep / fm.NUM_TRAIN_TIMESTEPS, device=latents.device)
        noisy = (1.0 - sigmas) * latents + sigmas * noise
        pred, weighting = fm.flux_predict(model, noisy, sigmas, sigmas.flatten(), t5, pooled, self.cfg, mask)
        return pred, fm.flux_target(latents, noise), weighting

    @torch.no_grad()
    def _live_latent(self, it: Item, flip: bool, where: tuple[int, ...]) -> tuple[torch.Tensor, tuple[int, int]]:
        pixels, crop = TrainData.live_pixels(it, flip, random.Random(_seed_for(*where, 6)))
        gen = torch.Generator().manual_seed(_seed_for(*where, 7))
        return sample_latents(self.flux.ae, pixels[None], gen)[0].cpu(), crop

    # -- saving --------------------------------------------------------------------------------
    def _metadata(self) -> dict[str, str]:
        """The SD trainer's ss_* keys, with FLUX.1's base model version and architecture and sd-scripts' FLUX keys."""
        if "model_hashes" not in self.session:
            self.session["model_hashes"] = self._model_hashes.result()
        epoch = self.epoch + 1 if self.micro else max(self.epoch, 1)
        version, arch, implementation = self._model_spec()
        shim = SimpleNamespace(prediction_type="flow", family=SimpleNamespace(
            base_model_version=version, modelspec_arch=arch, name=version, is_sdxl=False))
        meta = lora_metadata(self.cfg, shim, self.network.kind, self.network.args(), self.plan, self.session, epoch,
                             self.global_step, self.dataset_meta, self.accelerator.num_processes)
        meta.pop("modelspec.prediction_type", None)
        meta.update({f"ss_{k}": str(getattr(self.cfg, k)) for k in self.METADATA_KEYS})
        meta["ss_t5xxl_max_token_length"] = str(self.t5_len)
        meta["modelspec.implementation"] = implementation
        meta["modelspec.architecture"] = arch + "/lora"
        meta["ss_network_train_unet_only"] = str(not self.te_parts)
        meta.update(getattr(self, "extra_meta", {}))
        return meta

    def _model_spec(self) -> tuple[str, str, str]:
        """(ss_base_model_version, modelspec architecture, modelspec implementation) as sd-scripts writes them."""
        if self.flux.config.chroma:  # flux_utils.MODEL_VERSION_CHROMA, sai_model_spec's ARCH / IMPL for chroma
            return "chroma", "chroma", "https://huggingface.co/lodestones/Chroma"
        return "flux1", f"flux-1-{self.variant}", "https://github.com/black-forest-labs/flux"

    def _sample_prompts(self) -> list:
        from loratrain.core.flux_sampling import DEFAULT_STEPS
        from loratrain.core.sampling import SamplePrompt, load_prompts

        res = self.cfg.resolution_wh()
        return load_prompts(self.cfg.sample_prompts, SamplePrompt("", width=res[0], height=res[1], steps=DEFAULT_STEPS,
                                                                  cfg_scale=1.0))

    def _every_process_forwards(self) -> bool:
        """Whether samples and validation run on every process (a sharded transformer needs all of them for each
        forward; flux_full.py) rather than on the first one alone."""
        return False

    def _shared_prompts(self) -> list:
        """The sample prompts as the first process reads them; with samples on every process, sent to the others, so
        each runs the same forwards even if the file changes between their reads (a sharded forward needs them all).
        A prompt file that cannot be read now is logged and skipped, never left to stop one process alone."""
        prompts: list | None = None
        if self.accelerator.is_main_process:
            try:
                prompts = self._sample_prompts()
            except (ConfigError, OSError) as e:
                self.reporter.log(f"samples skipped: {e}")
                prompts = []
        if self._every_process_forwards():
            import torch.distributed as dist

            box = [prompts]
            dist.broadcast_object_list(box, src=0)
            prompts = box[0]
        return prompts or []

    def _encode_sample_prompts(self) -> None:
        """The sample prompts (and negatives) encoded before the text encoders are freed, as sd-scripts does."""
        if not self.cfg.sample_prompts or not (self.accelerator.is_main_process or self._every_process_forwards()):
            return
        for p in self._shared_prompts():
            for text in {p.prompt, p.negative_prompt}:
                self.sample_cache.setdefault(text, self._encode_one(text))

    def _generate(self, prompt: Any, path: Path, extra_info: dict[str, str]) -> Any:
        from loratrain.core.flux_sampling import flux_generate

        return flux_generate(self.flux, prompt, path, self.text_opts, encoded=self.sample_cache, extra_info=extra_info)

    def _sample(self, epoch: int | None) -> None:
        """Sample images with the adapters active (core/flux_sampling.py), written and logged as the SD trainer does."""
        from loratrain.core.sampling import sample_file_name

        cfg, main = self.cfg, self.accelerator.is_main_process
        if not cfg.sample_prompts or not (main or self._every_process_forwards()):
            return
        transformer = self.flux.transformer
        modes = {m: m.training for m in (transformer, *(getattr(self.flux, attr) for _, _, attr, _ in self.te_parts))}
        for m in modes:  # the trained encoders (with their LoRA) encode the prompts, in eval mode
            m.eval()
        self._optimizer_mode("eval")
        sample_dir = self.out_dir / "sample"
        paths, captions = [], []
        with self.accelerator.autocast():
            for i, p in enumerate(self._shared_prompts()):
                if p.seed is None:
                    p.seed = cfg.seed + i
                target = sample_dir / sample_file_name(cfg.output_name, epoch, self.global_step, i, p.seed) if main else None
                try:
                    path = self._generate(p, target, {"loratrain_step": str(self.global_step)}).path
                except (ConfigError, OSError) as e:  # a prompt added mid-run, after the encoders were freed; a full disk
                    self.reporter.log(f"sample {i} skipped: {e}")
                    continue
                if not main:
                    continue
                paths.append(path)
                captions.append(f"step {self.global_step}: {p.prompt}")
                if self.writer:
                    import numpy as np
                    from PIL import Image

                    self.writer.add_image(f"sample/{i:02d}", np.asarray(Image.open(path).convert("RGB")), self.global_step,
                                          dataformats="HWC")
        for m, training in modes.items():
            m.train(training)
        self._optimizer_mode("train")
        self.samples.extend(paths)
        self.reporter.sample([str(p) for p in paths], captions)
