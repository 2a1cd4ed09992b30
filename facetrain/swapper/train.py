"""`loratrain face swapper train`: fine-tune an identity-injection swapper on one person (or train ours from scratch).

Each step swaps the identity into its own faces (reconstruction: L1 / L2 / LPIPS to the face itself) and, with a
dst faceset, into other people's faces (kept close to them by a weak attribute loss); both are pulled toward the
identity by the recogniser's cosine (identity loss), optionally with a patch GAN. The saved model *is* the export:
the graph it started from with the tuned weights written in (same inputs, outputs, shapes and `emap`), so
FaceFusion and `face swap --swapper` load it unchanged. Resumable exactly: a state file beside it holds the
fp32 weights, the optimizer(s), the held-out split and the early-stopping record, and every batch and
augmentation is drawn from (seed, iteration).
"""
from __future__ import annotations

import contextlib
import json
import math
import secrets
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from loratrain.core.devices import pick_device
from loratrain.core.errors import ConfigError
from loratrain.core.jobs import JobResult, job
from loratrain.core.paths import confine
from loratrain.core.progress import Reporter, StopFlag
from loratrain.core.safe_io import save_safetensors

from ..train.preview import write_preview
from ..train.state import companions, load_optimizer, optimizer_tensors, read_state, rotate_backup
from .arch import GeneratorSpec, build_generator, save_onnx
from .config import SwapperTrainConfig
from .contract import read_contract
from .data import Augment, SwapperFaces, dedupe, drop_blurry, load_faces, split_names
from .model import TorchLpips, TorchRecognizer, TorchSwapper
from .onnx_module import OnnxModule, block_name, load_onnx

STATE_KEY = "loratrain.swapper_state"
ITERATION_KEY = "loratrain.iteration"
#: one random id per save, in the model's metadata and in its state: a state restores only the model saved with it
SAVE_ID_KEY = "loratrain.save_id"


@dataclass(kw_only=True)
class SwapperTrainResult(JobResult):
    model_path: str = ""
    iteration: int = 0
    faces: int = 0
    held_out: int = 0
    dropped_blurry: int = 0
    dropped_duplicate: int = 0
    frozen: list[str] = field(default_factory=list)
    val_loss: float | None = None
    likeness: float | None = None
    early_stopped: bool = False
    preview_path: str = ""
    history: list[dict] = field(default_factory=list)

    def summary(self) -> list[str]:
        out = [f"swapper: {self.model_path} at iteration {self.iteration} ({self.faces} faces, {self.held_out} held out; "
               f"dropped {self.dropped_blurry} blurry, {self.dropped_duplicate} near-duplicate)"]
        if self.frozen:
            out.append(f"frozen: {len(self.frozen)} weights before the named block")
        if self.likeness is not None:
            out.append(f"likeness (recogniser cosine to the identity): {self.likeness:.3f}")
        if self.val_loss is not None:
            out.append(f"validation loss: {self.val_loss:.4f}")
        if self.early_stopped:
            out.append("stopped early: the validation loss stopped improving")
        return out


def _lr_at(cfg: SwapperTrainConfig, it: int) -> float:
    if cfg.warmup and it < cfg.warmup:
        return cfg.lr * (it + 1) / cfg.warmup
    if cfg.schedule == "cosine":
        span = max(1, cfg.iterations - cfg.warmup)
        return cfg.lr * 0.5 * (1 + math.cos(math.pi * min(1.0, (it - cfg.warmup) / span)))
    return cfg.lr


class SwapperTrainer:
    """The models, the optimizer and the state file of one run; `step` is one update (all accumulation steps)."""

    def __init__(self, cfg: SwapperTrainConfig, reporter: Reporter) -> None:
        self.cfg, self.reporter = cfg, reporter
        self.path = confine(cfg.model, "model", write=True)
        self.state_path, self.logs_dir, self.preview_path = companions(self.path)
        self.device = pick_device(cfg.device)
        self.iteration, self.meta, self.save_id = 0, {}, ""
        if self.path.exists():
            proto = load_onnx(self.path, "model")
            props = {p.key: p.value for p in proto.metadata_props}
            self.save_id = props.get(SAVE_ID_KEY, "")
            if ITERATION_KEY not in props:  # someone's own model file: resuming would overwrite it
                raise ConfigError(f"model {self.path}: exists and was not written by `face swapper train`; give a new "
                                  "file name (to start from this file, pass it as --base)")
            self.iteration = int(props[ITERATION_KEY]) if props[ITERATION_KEY].isdigit() else 0
            reporter.log(f"resuming {self.path.name} at iteration {self.iteration} (its own graph; --base is not read)")
        elif cfg.base:
            proto = load_onnx(confine(cfg.base, "base"), "base")
        else:
            proto = build_generator(GeneratorSpec(cfg.resolution, cfg.base_channels, cfg.style_blocks), cfg.seed)
            reporter.log(f"our generator from scratch: {cfg.resolution} px, base {cfg.base_channels}, "
                         f"{cfg.style_blocks} style blocks")
        label = f"model {self.path.name}" if self.path.exists() else (f"base {Path(cfg.base).name}" if cfg.base else "generator")
        self.swapper = TorchSwapper(OnnxModule(proto, label), read_contract(proto, label))
        self.frozen = self.swapper.module.freeze_until(cfg.freeze_until) if cfg.freeze_until else []
        c = self.swapper.contract
        self.recognizer = TorchRecognizer.load(confine(cfg.recognizer, "recognizer"), c.template, c.size)
        self.lpips = TorchLpips.load(confine(cfg.lpips_model, "lpips_model")) if cfg.lpips_model else None
        if self.lpips is not None:
            self.lpips.probe(c.size)
        if not self.lpips and cfg.lpips_weight > 0:
            reporter.log("no --lpips_model: LPIPS needs a pretrained network you provide; training without it")
        self.disc = None
        if cfg.gan_weight > 0:
            from ..train.discriminators import PatchDiscriminator

            self.disc = PatchDiscriminator(max(8, c.size // 4)).to(self.device)
            self.opt_d = torch.optim.AdamW(self.disc.parameters(), lr=cfg.lr, betas=(0.5, 0.999),
                                           weight_decay=cfg.weight_decay)
        for m in (self.swapper, self.recognizer, self.lpips):
            if m is not None:
                m.to(self.device)
        self.swapper.probe()
        if (d := self.recognizer.probe()) != c.embed:
            raise ConfigError(f"recognizer {Path(cfg.recognizer).name}: its embeddings have {d} values, the swapper's "
                              f"source input takes {c.embed}")
        self.named = [(n, p) for n, p in self.swapper.module.named_weights().items() if p.requires_grad]
        if not self.named:
            raise ConfigError(f"freeze_until {cfg.freeze_until}: nothing is left to train")
        self.opt = torch.optim.AdamW([p for _, p in self.named], lr=cfg.lr, weight_decay=cfg.weight_decay)
        amp = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.mixed_precision)
        self.autocast = (lambda: torch.autocast(self.device.type, dtype=amp)) if amp else contextlib.nullcontext
        self.scaler = torch.amp.GradScaler(self.device.type) if cfg.mixed_precision == "fp16" else None
        self._load_state()

    # ---- state
    def _load_state(self) -> None:
        if not self.iteration or not self.state_path.exists():
            return
        try:
            tensors, meta = read_state(self.state_path, STATE_KEY, self.iteration)
            if self.save_id and meta.get("save_id") != self.save_id:  # same iteration, but another run's model
                raise ValueError("it was saved with another model file than this one")
            weights = self.swapper.module.named_weights()
            with torch.no_grad():
                for k, t in tensors.items():
                    if k.startswith("w.") and k[2:] in weights and weights[k[2:]].shape == t.shape:
                        weights[k[2:]].copy_(t)  # fp32: exact even when the graph stores fp16
            load_optimizer(self.opt, self.named, "opt", tensors, meta["opt"])
            if self.disc is not None and "disc" in meta:
                self.disc.load_state_dict({k[2:]: t for k, t in tensors.items() if k.startswith("d.")})
                load_optimizer(self.opt_d, list(self.disc.named_parameters()), "optd", tensors, meta["disc"])
            self.meta = meta
        except Exception as e:  # a stale or damaged state costs momentum, never the model
            self.reporter.log(f"note: training state not restored ({str(e)[:160]}); the optimizer starts fresh")

    def save(self, meta: dict) -> None:
        cfg = self.cfg
        for p in (self.path, self.state_path):
            rotate_backup(p, cfg.keep_backups)
        tensors, opt_meta = optimizer_tensors(self.opt, self.named, "opt")
        tensors.update({f"w.{n}": p.detach().float().cpu().contiguous() for n, p in self.named})
        self.save_id = secrets.token_hex(8)
        full = {"iteration": self.iteration, "opt": opt_meta, **meta, "save_id": self.save_id}
        if self.disc is not None:
            d_tensors, full["disc"] = optimizer_tensors(self.opt_d, list(self.disc.named_parameters()), "optd")
            tensors.update(d_tensors)
            tensors.update({f"d.{k}": v.detach().cpu().contiguous() for k, v in self.disc.state_dict().items()})
        save_safetensors({k: v.cpu().contiguous() for k, v in tensors.items()}, self.state_path,
                         {STATE_KEY: json.dumps(full)})
        # no paths of this machine in a file people share: names only
        extra = {ITERATION_KEY: str(self.iteration), SAVE_ID_KEY: self.save_id,
                 "loratrain.recognizer": Path(cfg.recognizer).name,
                 "loratrain.base": Path(cfg.base).name if cfg.base else str(meta.get("base", "loratrain generator"))}
        save_onnx(self.swapper.to_onnx(extra), self.path)

    # ---- maths
    def embed(self, faces: SwapperFaces) -> np.ndarray:
        out = []
        with torch.no_grad():
            for i in range(0, len(faces.names), 32):
                x = faces.tensor(list(range(i, min(i + 32, len(faces.names))))).to(self.device)
                out.append(self.recognizer(x).float().cpu().numpy())
        return np.concatenate(out)

    def identity(self, out: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        """Per-image 1 - cosine between the recogniser's view of `out` and the wanted identity."""
        return 1 - F.cosine_similarity(self.recognizer(out).float(), emb.float(), dim=1)

    def losses(self, target: torch.Tensor, emb: torch.Tensor, own: torch.Tensor) -> dict[str, torch.Tensor]:
        """Loss terms of one micro-batch: `own[i]` says target i is the identity itself (reconstruction) or another
        person (attribute loss)."""
        cfg = self.cfg
        with self.autocast():
            out = self.swapper(target, self.swapper.latent(emb)).float()
        terms: dict[str, torch.Tensor] = {"identity": self.identity(out, emb).mean()}
        diff = (out - target).abs().mean((1, 2, 3))
        sq = (out - target).square().mean((1, 2, 3))
        per = cfg.l1_weight * diff + cfg.l2_weight * sq
        if self.lpips is not None and cfg.lpips_weight > 0:
            lp = self.lpips(out, target)
            terms["lpips"] = lp.mean()
            per = per + cfg.lpips_weight * lp
        own_f = own.float()
        terms["reconstruction"] = (per * own_f).sum() / own_f.sum().clamp_min(1)
        attr = diff + (cfg.lpips_weight * lp if "lpips" in terms else 0)
        terms["attribute"] = (attr * (1 - own_f)).sum() / (1 - own_f).sum().clamp_min(1)
        total = cfg.identity_weight * terms["identity"] + terms["reconstruction"] + cfg.attribute_weight * terms["attribute"]
        if self.disc is not None:
            self.disc.requires_grad_(False)  # the generator's adversarial loss must not train the critic
            terms["gan"] = -self.disc(out).mean()
            self.disc.requires_grad_(True)
            total = total + cfg.gan_weight * terms["gan"]
            self._fake, self._real = out.detach(), target
        terms["total"] = total
        return terms

    def step(self, batches: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]) -> dict[str, float]:
        cfg = self.cfg
        for g in self.opt.param_groups:
            g["lr"] = _lr_at(cfg, self.iteration)
        self.opt.zero_grad(set_to_none=True)
        sums: dict[str, float] = {}
        for target, emb, own in batches:
            terms = self.losses(target.to(self.device), emb.to(self.device), own.to(self.device))
            if not torch.isfinite(terms["total"]):
                raise FloatingPointError(f"the loss became {float(terms['total'].detach())} at iteration "
                                         f"{self.iteration + 1}; stopping without saving (the last save of "
                                         f"{self.path.name} is intact). Lower --lr or the loss weights, or turn off fp16")
            loss = terms["total"] / len(batches)
            (self.scaler.scale(loss) if self.scaler else loss).backward()
            if self.disc is not None:
                d_loss = (F.relu(1 - self.disc(self._real)).mean() + F.relu(1 + self.disc(self._fake)).mean()) / len(batches)
                d_loss.backward()
                sums["disc"] = sums.get("disc", 0.0) + float(d_loss.detach())
            for k, v in terms.items():
                sums[k] = sums.get(k, 0.0) + float(v.detach()) / len(batches)
        if self.scaler:
            self.scaler.step(self.opt)
            self.scaler.update()
        else:
            self.opt.step()
        if self.disc is not None:
            self.opt_d.step()
            self.opt_d.zero_grad(set_to_none=True)
        finite = torch.stack([torch.isfinite(p).all() for _, p in self.named])  # one device sync, not one per weight
        if not finite.all():  # a finite loss can still step to inf: never preview or save such a model
            bad = self.named[int((~finite).nonzero()[0])][0]
            raise FloatingPointError(f"weight {bad} became NaN or inf at iteration {self.iteration + 1}; stopping "
                                     f"without saving (the last save of {self.path.name} is intact). Lower --lr or the "
                                     "loss weights")
        self.iteration += 1
        return sums


class Data:
    """The run's faces: identity faces split into train / held out, their embeddings, and the dst faces."""

    def __init__(self, cfg: SwapperTrainConfig, trainer: SwapperTrainer, reporter: Reporter) -> None:
        c = trainer.swapper.contract
        faces = drop_blurry(load_faces(cfg.faceset, c.template, c.size, "faceset"), cfg.blur_drop)
        faces, emb = dedupe(faces, trainer.embed(faces), cfg.dedupe_threshold)
        self.dropped_blurry, self.dropped_duplicate = len(faces.dropped_blurry), len(faces.dropped_duplicate)
        saved = trainer.meta.get("held_out")
        held = set(saved) if isinstance(saved, list) else set(split_names(faces.names, cfg.validation_split, cfg.seed))
        train_idx = [i for i, n in enumerate(faces.names) if n not in held]
        held_idx = [i for i, n in enumerate(faces.names) if n in held]
        if not train_idx:
            raise ConfigError(f"faceset {cfg.faceset}: no face left to train on after the held-out split and cleaning")
        self.train, self.train_emb = faces.subset(train_idx), torch.from_numpy(emb[train_idx])
        self.held = faces.subset(held_idx) if held_idx else None
        self.held_emb = torch.from_numpy(emb[held_idx]) if held_idx else None
        self.dst = load_faces(cfg.dst_faceset, c.template, c.size, "dst_faceset") if cfg.dst_faceset else None
        self.mean_emb = self.train_emb.mean(0, keepdim=True)
        self.augment = Augment(cfg.random_flip, cfg.color_jitter, cfg.rotation, cfg.crop_scale)
        reporter.log(f"identity: {len(faces.names)} faces kept ({self.dropped_blurry} blurry and {self.dropped_duplicate} "
                     f"near-duplicate dropped), {len(held_idx)} held out; dst: {len(self.dst.names) if self.dst else 0} faces")

    def batches(self, seed: int, it: int, size: int, accum: int) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        gen = torch.Generator().manual_seed(seed * 1_000_003 + it)
        out = []
        n_own = size if self.dst is None else max(1, (size + 1) // 2)
        for _ in range(accum):
            own = self.train.tensor(torch.randint(len(self.train.names), (n_own,), generator=gen).tolist())
            parts = [own]
            if self.dst is not None and size > n_own:
                parts.append(self.dst.tensor(torch.randint(len(self.dst.names), (size - n_own,), generator=gen).tolist()))
            target = self.augment(torch.cat(parts), gen)
            emb = self.train_emb[torch.randint(len(self.train.names), (size,), generator=gen)]
            flags = torch.cat([torch.ones(n_own), torch.zeros(size - n_own)])
            out.append((target, emb, flags))
        return out


@torch.no_grad()
def validate(trainer: SwapperTrainer, data: Data) -> tuple[float | None, float]:
    """(held-out loss: identity + L1 of the faces swapped with their own identity, or None without a split;
    likeness: recogniser cosine to the identity of the swapped dst faces, or of the held-out / training faces)."""
    sw, dev = trainer.swapper, trainer.device
    loss = None
    if data.held is not None:
        x, e = data.held.tensor(list(range(len(data.held.names)))).to(dev), data.held_emb.to(dev)
        out = sw(x, sw.latent(e)).float()
        loss = float((trainer.identity(out, e) + (out - x).abs().mean((1, 2, 3))).mean())
    faces = data.dst or data.held or data.train
    x = faces.tensor(list(range(min(8, len(faces.names))))).to(dev)
    e = data.mean_emb.to(dev).expand(len(x), -1)
    likeness = float(1 - trainer.identity(sw(x, sw.latent(e)).float(), e).mean())
    return loss, likeness


@torch.no_grad()
def preview(trainer: SwapperTrainer, data: Data) -> np.ndarray:
    """Rows of source | target | result (BGR uint8), at least 128 px a tile."""
    sw, dev = trainer.swapper, trainer.device
    faces = data.dst or data.held or data.train
    x = faces.tensor(list(range(min(3, len(faces.names))))).to(dev)
    out = sw(x, sw.latent(data.mean_emb.to(dev).expand(len(x), -1))).float().clamp(0, 1).cpu()
    src = data.train.tensor([0]).expand(len(x), -1, -1, -1)
    rows = torch.cat([src, x.cpu(), out], 3)
    scale = max(1, math.ceil(128 / sw.size))
    rows = F.interpolate(rows, scale_factor=scale, mode="nearest") if scale > 1 else rows
    grid = torch.cat(list(rows), 1).permute(1, 2, 0).numpy()
    return np.ascontiguousarray((grid[..., ::-1] * 255 + 0.5).astype(np.uint8))


@job
def run_swapper_train(cfg: SwapperTrainConfig, reporter: Reporter, stop: StopFlag) -> SwapperTrainResult:
    """Fine-tune `cfg.base` (or our generator) on the identity of `cfg.faceset`; resume `cfg.model` if it exists.

    reporter: logs (faces kept and dropped, frozen blocks), per-iteration loss / identity / likeness metrics, a
    preview (source | target | result) every `preview_every`. stop: saves after the current iteration.
    Result: model path, iteration, face counts, frozen weights, validation loss, likeness, early stop, history.
    """
    device = pick_device(cfg.device)
    with torch.random.fork_rng(devices=[device.index or 0] if device.type == "cuda" else []):
        torch.manual_seed(cfg.seed)
        trainer = SwapperTrainer(cfg, reporter)
        return _train(cfg, trainer, reporter, stop)


def _train(cfg: SwapperTrainConfig, trainer: SwapperTrainer, reporter: Reporter, stop: StopFlag) -> SwapperTrainResult:
    data = Data(cfg, trainer, reporter)
    if trainer.frozen:
        module = trainer.swapper.module
        training = [b for b in module.blocks() if any(module.param(n).requires_grad for n, _ in trainer.named
                                                      if block_name(n) == b)]
        reporter.log(f"frozen before {cfg.freeze_until}: {len(trainer.frozen)} weights; training {len(trainer.named)} "
                     f"in {', '.join(training)[:300]}")
    if cfg.early_stopping and data.held is None:
        reporter.log("note: --early_stopping needs held-out faces (--validation_split > 0 and 3+ faces); it is off")
    meta = {k: trainer.meta[k] for k in ("best", "bad", "base") if k in trainer.meta}
    meta["held_out"] = data.held.names if data.held is not None else []
    if not cfg.base and "base" not in meta:
        meta["base"] = "loratrain generator"
    result = SwapperTrainResult(model_path=str(trainer.path), iteration=trainer.iteration, faces=len(data.train.names),
                                held_out=len(meta["held_out"]), dropped_blurry=data.dropped_blurry,
                                dropped_duplicate=data.dropped_duplicate, frozen=trainer.frozen)
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(str(trainer.logs_dir))
    reporter.start(cfg.iterations, f"training swapper {trainer.swapper.size}px on {trainer.device.type}",
                   initial=min(trainer.iteration, cfg.iterations))
    start = trainer.iteration
    if start >= cfg.iterations:
        reporter.log(f"{trainer.path.name} is at iteration {start} already (--iterations {cfg.iterations}): nothing to "
                     "train; raise --iterations to go on")
    try:
        while trainer.iteration < cfg.iterations:
            sums = trainer.step(data.batches(cfg.seed, trainer.iteration, cfg.batch_size, cfg.grad_accum))
            it = trainer.iteration
            row = {"iteration": it, "loss": sums["total"], "identity": sums["identity"]}
            for k, v in sums.items():
                writer.add_scalar(f"swapper/{k}", v, it)
            if it % cfg.validate_every == 0 or it == cfg.iterations:
                result.val_loss, result.likeness = validate(trainer, data)
                row["likeness"] = result.likeness
                writer.add_scalar("swapper/likeness", result.likeness, it)
                if result.val_loss is not None:
                    row["val_loss"] = result.val_loss
                    writer.add_scalar("swapper/val_loss", result.val_loss, it)
                    if result.val_loss < meta.get("best", float("inf")):
                        meta["best"], meta["bad"] = result.val_loss, 0
                    else:
                        meta["bad"] = meta.get("bad", 0) + 1
                    result.early_stopped = bool(cfg.early_stopping and meta["bad"] >= cfg.early_stopping)
            result.history.append(row)
            reporter.advance(1, **{k: v for k, v in row.items() if k != "iteration"})
            if it % cfg.preview_every == 0 or it == cfg.iterations:
                grid = preview(trainer, data)
                result.preview_path = str(write_preview(grid, trainer.preview_path))
                reporter.sample([result.preview_path], [f"iteration {it}: source | target | result"])
                writer.add_image("swapper/preview", grid[..., ::-1].copy(), it, dataformats="HWC")
            if it % cfg.save_every == 0:
                trainer.save(meta)
            if result.early_stopped:
                reporter.log(f"early stop at iteration {it}: {meta['bad']} validations without improvement")
                break
            if stop.is_set():
                result.stopped = True
                break
        if trainer.iteration > start and trainer.iteration % cfg.save_every:  # not saved by the loop just now
            trainer.save(meta)
    finally:
        writer.close()
        reporter.done("")
    result.iteration = trainer.iteration
    return result
