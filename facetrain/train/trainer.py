"""The face training loop: DeepFaceLab's SAEHD recipe in PyTorch, resumable, atomic, NaN-guarded."""
from __future__ import annotations

import contextlib
import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from loratrain.core.devices import pick_device
from loratrain.core.errors import ConfigError
from loratrain.core.jobs import JobResult, job
from loratrain.core.precision import dtype_of
from loratrain.core.progress import Reporter, StopFlag
from loratrain.core.safe_io import atomic_write_json

from .. import CONSENT
from ..losses import soft_mask
from ..models.archi import FaceAutoencoder, build_model
from ..models.blocks import _init
from ..optim import OPTIMIZERS, LrDropout
from .config import FaceTrainConfig
from .data import AugmentOptions, FaceSamples, loader, xseg_coverage
from .discriminators import CodeDiscriminator, PatchDiscriminator
from .losses_step import discriminator_losses, generator_loss
from .model_file import check_model_file
from .parallel import NullWriter, Processes
from .preview import Likeness, preview_grid, write_preview
from .state import load_optimizer, optimizer_tensors, read_checkpoint, save_checkpoint
from .watchers import Watcher, watchers_for


@dataclass
class FaceTrainResult(JobResult):
    iteration: int = 0
    history: list[dict[str, float]] = field(default_factory=list)
    model_path: Path | None = None
    preview_path: Path | None = None
    notes: list[str] = field(default_factory=list)
    logs_dir: Path | None = None
    ended_by: str = ""  # the rule that ended the run before max_iters (a plan's end rule, early stopping)

    def summary(self) -> list[str]:
        last = self.history[-1] if self.history else {}
        return [CONSENT, f"iteration {self.iteration}: src loss {last.get('src_loss', float('nan')):.4f}, "
                f"dst loss {last.get('dst_loss', float('nan')):.4f}",
                f"model: {self.model_path}", f"preview: {self.preview_path}", f"TensorBoard: {self.logs_dir}"]


def trainable_parameters(model: FaceAutoencoder, cfg: FaceTrainConfig) -> list[tuple[str, torch.nn.Parameter]]:
    """Everything except what the freeze flags, `freeze_parts` (control.py) and LIAE's random_warp rule hold still."""
    from .control import frozen_part_params

    frozen: set[int] = frozen_part_params(model, cfg.freeze_parts)

    def freeze(module: torch.nn.Module) -> None:
        frozen.update(id(p) for p in module.parameters())

    if cfg.freeze_encoder:
        freeze(model.encoder)
    if cfg.freeze_inter:
        for name in model.inter_names:
            freeze(getattr(model, name))
    if not cfg.random_warp and hasattr(model, "inter_AB"):
        freeze(model.inter_AB)  # DeepFaceLab: LIAE trains inter_AB only while the input is warped
    for name in model.decoder_names:
        dec = getattr(model, name)
        if cfg.freeze_decoder:
            for part in (dec.ups, dec.res, dec.out):
                freeze(part)
        if cfg.freeze_decoder_mask:
            freeze(dec.upms)
            freeze(dec.out_mask)
    params = []
    for name, p in model.named_parameters():
        p.requires_grad_(id(p) not in frozen)
        if p.requires_grad:
            params.append((name, p))
    if not params:
        raise ConfigError("every part of the model is frozen; nothing to train")
    return params


class FaceTrainer:
    def __init__(self, cfg: FaceTrainConfig, reporter: Reporter) -> None:
        cfg, mode_notes = cfg.effective()
        self.cfg, self.reporter = cfg, reporter
        self.device = pick_device(cfg.device)
        self.dir = Path(cfg.model_dir)
        self.model_path = self.dir / f"{cfg.model_name}.safetensors"
        self.state_path = self.dir / f"{cfg.model_name}.state.safetensors"
        self.notes: list[str] = list(mode_notes)
        self.dist = Processes.from_env(self.device, self.notes, cfg.batch_size)  # data-parallel (parallel.py)
        self.iteration = 0
        self.reset_state = False  # set when pretraining ends: optimizer states no longer apply
        self.watchers: list[Watcher] = []
        self.watcher_states: dict[str, dict] = {}  # what the saved model's watchers counted (their `state()`)
        self.src: FaceSamples | None = None
        self.dst: FaceSamples | None = None
        self.held_out: dict[str, FaceSamples] = {}  # validation faces per side (validation_faces), never trained on
        self.model, saved = self._load_model()
        self.res = self.model.cfg.resolution
        fmt = torch.channels_last if cfg.channels_last else torch.contiguous_format
        self.model.to(self.device, memory_format=fmt)
        self.named = trainable_parameters(self.model, cfg)  # names key the saved optimizer state
        self.params = [p for _, p in self.named]
        self.opt = OPTIMIZERS.get(cfg.optimizer)(self.params, cfg.lr, weight_decay=cfg.weight_decay)
        self.lr_dropout = LrDropout(self.params) if cfg.lr_dropout else None
        self.code_d = self.gan_d = None
        self.d_opts: dict[str, torch.optim.Optimizer] = {}
        if cfg.true_face_power > 0:
            self.code_d = CodeDiscriminator(self.model.cfg.ae_dims).to(self.device)
            self.d_opts["code_d"] = OPTIMIZERS.get(cfg.optimizer)(self.code_d.parameters(), cfg.lr)
        if cfg.gan_power > 0:
            self.gan_d = PatchDiscriminator(cfg.gan_patch_size or self.res // 8, cfg.gan_dims).to(self.device)
            self.d_opts["gan_d"] = OPTIMIZERS.get(cfg.optimizer)(self.gan_d.parameters(), cfg.lr)
        if saved:
            self._load_state()
        amp = cfg.precision != "fp32" and self.device.type == "cuda"
        self.autocast_dtype = dtype_of(cfg.precision) if amp else None
        self.scaler = torch.amp.GradScaler("cuda") if self.autocast_dtype == torch.float16 else None
        #: extra loss terms: fn(src batch, dst batch, model outputs) -> (summed loss, logs)
        self.loss_terms: list = []
        self.last_faces: dict[str, torch.Tensor | None] = {}
        self.last_per_sample: dict[str, torch.Tensor] = {}
        if cfg.precision != "fp32" and not amp:
            self.notes.append(f"precision {cfg.precision} is a GPU setting; training in fp32 on {self.device.type}")

    # ------------------------------------------------------------ model files
    def _load_model(self) -> tuple[FaceAutoencoder, bool]:
        cfg = self.cfg
        wanted = cfg.arch_config()
        if not self.model_path.exists():
            return build_model(wanted), False
        _, saved_cfg = check_model_file(self.model_path)  # a planted header must not size the model (model_file.py)
        weights, info = read_checkpoint(self.model_path)
        if saved_cfg != wanted:
            self.notes.append(f"resuming the saved model's architecture {dataclasses.asdict(saved_cfg)} "
                              "(archi, resolution and dims are first-run options)")
        model = build_model(saved_cfg)
        try:
            model.load_state_dict(weights)
        except RuntimeError as e:
            raise ValueError(f"{self.model_path}: weights do not fit the saved architecture ({e})") from None
        self.iteration = int(info.get("iteration", 0))
        states = info.get("watchers")
        self.watcher_states = {k: v for k, v in states.items() if isinstance(v, dict)} if isinstance(states, dict) else {}
        saved_type = info.get("options", {}).get("face_type")
        if saved_type and saved_type != cfg.face_type:
            self.notes.append(f"the model was trained on face type {saved_type!r}; keeping it (face_type is a first-run option)")
            self.cfg = cfg = cfg.model_copy(update={"face_type": saved_type})
        if info.get("pretrain") and not cfg.pretrain:
            if not cfg.keep_inter:
                for name in model.inter_names:
                    _init(getattr(model, name))
            self.iteration = 0
            self.reset_state = True
            self.notes.append("pretraining finished: inter layer(s) re-initialised and the iteration count reset, "
                              "as DeepFaceLab does" if not cfg.keep_inter else
                              "pretraining finished: inter layer(s) kept (--keep_inter) and the iteration count reset")
        return model, True

    def _load_state(self) -> None:
        if self.reset_state or not self.state_path.exists():
            if not self.state_path.exists():
                self.notes.append(f"no optimizer state ({self.state_path.name}); optimizers start fresh")
            return
        tensors, meta = read_checkpoint(self.state_path)
        try:
            load_optimizer(self.opt, self.named, "opt", tensors, meta["opt"])
            for name, opt in self.d_opts.items():
                if name in meta:
                    critic = getattr(self, name)
                    critic.load_state_dict({k[len(name) + 3:]: v for k, v in tensors.items() if k.startswith(name + ".w.")})
                    load_optimizer(opt, list(critic.named_parameters()), name, tensors, meta[name])
        except (ValueError, KeyError, RuntimeError) as e:
            self.notes.append(f"optimizer state does not match the current options ({e}); optimizers start fresh")
            self.opt = OPTIMIZERS.get(self.cfg.optimizer)(self.params, self.cfg.lr, weight_decay=self.cfg.weight_decay)

    def save(self) -> Path:
        if not self.dist.is_main:  # data-parallel: the first process writes; the others wait until it has
            self.dist.barrier()
            return self.model_path
        weights = {k: v.detach().contiguous() for k, v in self.model.state_dict().items()}
        info = {"model": dataclasses.asdict(self.model.cfg), "iteration": self.iteration, "pretrain": self.cfg.pretrain,
                "options": {k: v for k, v in self.cfg.model_dump().items() if not isinstance(v, list)},
                "watchers": {w.name: w.state() for w in self.watchers if w.name}}
        tensors, meta = optimizer_tensors(self.opt, self.named, "opt")
        state_meta = {"opt": meta}
        for name, opt in self.d_opts.items():
            t, m = optimizer_tensors(opt, list(getattr(self, name).named_parameters()), name)
            tensors.update(t)
            tensors.update({f"{name}.w.{k}": v for k, v in getattr(self, name).state_dict().items()})
            state_meta[name] = m
        save_checkpoint(self.model_path, self.state_path, weights, info, tensors, state_meta, self.cfg.keep_backups)
        self.dist.barrier()
        return self.model_path

    # ------------------------------------------------------------ data
    def loader(self, samples: FaceSamples, seed: int) -> torch.utils.data.DataLoader:
        """The endless batch source of one side (a sampler can be swapped in here: the hard-sample one)."""
        from .diagnosis import hard_sampler

        return loader(samples, self.cfg.batch_size, self.cfg.uniform_yaw, self.cfg.workers, seed,
                      sampler=hard_sampler(self, samples, seed))  # None: the plain one

    def datasets(self) -> tuple[FaceSamples, FaceSamples]:
        cfg = self.cfg
        dst_dir = cfg.dst_faceset or cfg.src_faceset
        dst = FaceSamples(dst_dir, self.res, cfg.face_type, AugmentOptions(cfg.random_warp, cfg.random_dst_flip))
        src = FaceSamples(cfg.src_faceset, self.res, cfg.face_type,
                          AugmentOptions(cfg.random_warp, cfg.random_src_flip, cfg.random_hsv_power, cfg.ct_mode, cfg.ct_power),
                          ct_reference=dst)
        from .validation import hold_out

        src, dst, self.held_out = hold_out(cfg, src, dst)  # validation faces: split off here, so no sampler draws them
        return src, dst

    def _to_device(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The batch on the device, plus its blurred mask, which every loss term then shares."""
        fmt = torch.channels_last if self.cfg.channels_last else torch.contiguous_format
        out = {k: v.to(self.device, non_blocking=True).contiguous(memory_format=fmt) for k, v in batch.items() if k != "index"}
        if "index" in batch:
            out["index"] = batch["index"]  # stays on the CPU: bookkeeping, not maths
        out["mask_blur"] = soft_mask(out["mask"], self.res)
        return out

    def _autocast(self) -> contextlib.AbstractContextManager:
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    def lr_at(self, iteration: int) -> float:
        """The learning rate of the update after `iteration` steps (lr_dropout's cosine cycle when on)."""
        from .control import schedule_scale

        lr = self.cfg.lr * schedule_scale(iteration, self.cfg.lr_schedule, self.cfg.lr_warmup_iters, self.cfg.max_iters)
        if self.lr_dropout:
            lr *= self.lr_dropout.lr_scale(iteration)
        return lr

    # ------------------------------------------------------------ one iteration
    def step(self, src_iter, dst_iter) -> dict[str, float]:  # noqa: ANN001
        cfg = self.cfg
        logs: dict[str, float] = {}
        for _ in range(cfg.gradient_accumulation_steps):
            s, d = self._to_device(next(src_iter)), self._to_device(next(dst_iter))
            with self._autocast():
                out = self.model.train_forward(s["input"], d["input"])
                out = {k: v.float() for k, v in out.items()}
                loss, logs, per_sample = generator_loss(cfg, self.res, s, d, out, self.code_d, self.gan_d)
                for term in self.loss_terms:  # extra terms a feature adds (each returns its summed loss and logs)
                    extra, extra_logs = term(s, d, out)
                    loss = loss + extra
                    logs.update(extra_logs)
            self.last_faces = {"src": s.get("index"), "dst": d.get("index")}
            self.last_per_sample = per_sample
            if not torch.isfinite(loss):
                raise FloatingPointError(f"loss became {loss.item()} at iteration {self.iteration + 1}; stopping "
                                         f"without saving (the last save in {self.dir} is intact). Lower --lr or "
                                         "turn off fp16")
            loss = loss / cfg.gradient_accumulation_steps
            (self.scaler.scale(loss) if self.scaler else loss).backward()
        logs = self.dist.sum_gradients(self.params, logs)  # data-parallel: the global batch's gradient
        if self.scaler:
            self.scaler.unscale_(self.opt)
        if cfg.clipgrad:
            torch.nn.utils.clip_grad_norm_(self.params, 1.0)
        lr = self.lr_at(self.iteration)
        if self.lr_dropout:
            self.lr_dropout.before_step()
        for g in self.opt.param_groups:
            g["lr"] = lr
        if self.scaler:
            self.scaler.step(self.opt)
            self.scaler.update()
        else:
            self.opt.step()
        if self.lr_dropout:
            self.lr_dropout.after_step()
        self.opt.zero_grad(set_to_none=True)
        for name, dloss in discriminator_losses(cfg, s, out, self.code_d, self.gan_d).items():
            self.d_opts[name].zero_grad(set_to_none=True)
            dloss.backward()
            self.dist.average_gradients(getattr(self, name).parameters())
            self.d_opts[name].step()
            logs[name] = float(dloss.detach())
        self.iteration += 1
        return logs

    @torch.no_grad()
    def preview(self, src: FaceSamples, dst: FaceSamples, likeness: Likeness | None, rows: list[tuple[dict, dict]]) -> tuple[np.ndarray, float | None]:
        self.model.eval()
        s = torch.stack([torch.from_numpy(r[0]["target"].transpose(2, 0, 1)) for r in rows]).to(self.device)
        d = torch.stack([torch.from_numpy(r[1]["target"].transpose(2, 0, 1)) for r in rows]).to(self.device)
        out = self.model.train_forward(s, d)
        self.model.train()
        score = likeness(out["swap"], [r[1]["landmarks"] for r in rows]) if likeness else None
        return preview_grid(s, out["src"], d, out["dst"], out["swap"]), score


@job
def run_face_train(cfg: FaceTrainConfig, reporter: Reporter, stop: StopFlag) -> FaceTrainResult:
    """Train (or resume) a DF / LIAE face model with SAEHD's recipe.

    reporter: phase "training ..." with src/dst losses per iteration, the five-column preview as a
    sample, notes (resume decisions, options a mode changed). stop: saves after the current iteration.
    Runs with torch's global generator seeded from cfg.seed and restored afterwards.
    Result: iteration reached, per-iteration losses, model and preview paths, notes.
    """
    device = pick_device(cfg.device)
    with torch.random.fork_rng(devices=[device.index or 0] if device.type == "cuda" else []):
        torch.manual_seed(cfg.seed)
        if cfg.plan:  # a staged plan runs its phases through _train, one run per phase (train/plan.py)
            from .plan import run_plan

            return run_plan(cfg, reporter, stop)
        return _train(cfg, reporter, stop)


def _train(cfg: FaceTrainConfig, reporter: Reporter, stop: StopFlag, extra_watchers: list[Watcher] | None = None
           ) -> FaceTrainResult:
    """One run of the loop. `extra_watchers` (a plan's end rule) follow it beside the ones the options ask for."""
    from ..extract.plugins import identity_encoder

    encoder = None  # the likeness score's, loaded first: a wrong --likeness_recognizer is named before any face loads
    try:
        encoder = identity_encoder(cfg.likeness_recognizer, "likeness_recognizer")
    except (ImportError, FileNotFoundError) as e:
        reporter.log(f"note: no likeness score ({e})")
    trainer = FaceTrainer(cfg, reporter)
    cfg = trainer.cfg
    trainer.dist.broadcast(trainer.model, trainer.code_d, trainer.gan_d)
    stop = trainer.dist.stop_flag(stop)  # with several processes: the stop all of them agreed on
    result = FaceTrainResult(iteration=trainer.iteration, notes=trainer.notes, logs_dir=trainer.dir / "logs")
    for note in trainer.notes:
        reporter.log(f"note: {note}")
    src, dst = trainer.datasets()
    trainer.src, trainer.dst = src, dst
    reporter.log(xseg_coverage(src, "src"))
    if cfg.dst_faceset and Path(cfg.dst_faceset) != Path(cfg.src_faceset):
        reporter.log(xseg_coverage(dst, "dst"))
    rng = np.random.default_rng(cfg.seed)
    rows = [(src.sample(i % len(src), rng, augment=False), dst.sample(i % len(dst), rng, augment=False)) for i in range(4)]
    likeness = None
    if encoder is not None:
        likeness = Likeness(np.stack([r[0]["target"] for r in rows]), [r[0]["landmarks"] for r in rows], encoder)
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(str(trainer.dir / "logs")) if trainer.dist.is_main else NullWriter()
    watchers = watchers_for(trainer, reporter) + list(extra_watchers or [])
    trainer.watchers = watchers
    for w in watchers:
        w.restore(trainer.watcher_states.get(w.name, {}) if w.name else {})
        w.start(trainer, result, writer)
    src_iter = iter(trainer.dist.shard(trainer.loader(src, cfg.seed)))  # shard: this process's share of each batch
    dst_iter = iter(trainer.dist.shard(trainer.loader(dst, cfg.seed + 7)))
    reporter.start(cfg.max_iters, f"training {trainer.model.cfg.archi} {trainer.res}px on {trainer.device.type}",
                   initial=min(trainer.iteration, cfg.max_iters))
    trainer.dir.mkdir(parents=True, exist_ok=True)
    try:
        while trainer.iteration < cfg.max_iters:
            logs = trainer.step(src_iter, dst_iter)
            it = trainer.iteration
            result.history.append({"iteration": it, **logs})
            reporter.advance(1, src=logs["src_loss"], dst=logs["dst_loss"])
            for k, v in logs.items():
                writer.add_scalar(f"loss/{k}", v, it)
            reasons = [r for w in watchers if (r := w.after_step(trainer, logs))]
            if (it % cfg.preview_every == 0 or it == cfg.max_iters) and trainer.dist.is_main:
                grid, score = trainer.preview(src, dst, likeness, rows)
                result.preview_path = write_preview(grid, trainer.dir / "preview.png")
                reporter.sample([str(result.preview_path)], [f"iteration {it}: src | pred src | dst | pred dst | swap"])
                writer.add_image("preview", grid[..., ::-1].copy(), it, dataformats="HWC")
                if score is not None and math.isfinite(score):
                    writer.add_scalar("likeness/swap_to_src_identity_distance", score, it)
                    result.history[-1]["likeness"] = score
                else:
                    score = None
                reasons += [r for w in watchers if (r := w.after_preview(trainer, score, logs))]
            reasons = trainer.dist.agree(reasons, stop)  # data-parallel: all processes end after the same step
            if reasons:
                result.ended_by = "; ".join(reasons)
                reporter.log(f"iteration {it}: {result.ended_by}")
                break
            if it % cfg.save_every == 0:
                result.model_path = trainer.save()
            if stop.is_set():
                result.stopped = True
                break
        result.model_path = trainer.save()
        for w in watchers:
            w.finish(trainer, result)
    finally:
        writer.close()
        reporter.done("")
    result.iteration = trainer.iteration
    if trainer.dist.is_main:
        atomic_write_json(trainer.dir / "history.json", result.history[-2000:])
    return result
