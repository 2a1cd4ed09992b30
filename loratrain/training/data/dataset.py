"""The training set: items with repeats, reg balancing, buckets, cached latents and the step plan."""
from __future__ import annotations

import hashlib
import math
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from safetensors import safe_open

from loratrain.core.captions import read_caption
from loratrain.core.paths import confine
from loratrain.core.safe_io import save_safetensors

from .buckets import bucket_resolutions, fit_to_bucket, no_upscale_bucket, select_bucket
from .captions import with_trigger
from .subsets import DatasetError, DatasetSpec, Subset

CACHE_DIR = ".loratrain_cache"
#: samples (images x repeats, reg balance included) one epoch may hold
MAX_EPOCH_SAMPLES = 10_000_000


@dataclass
class Item:
    image: Path
    caption: str
    subset: Subset
    repeats: int
    original_size: tuple[int, int] = (0, 0)
    bucket: tuple[int, int] = (0, 0)
    crop_top_left: tuple[int, int] = (0, 0)
    latents: list[torch.Tensor] = field(default_factory=list)  # [plain, flipped?]
    resize_to: tuple[int, int] | None = None  # bucket_no_upscale's own size for the image (None: cover the bucket)
    mask: list[torch.Tensor] = field(default_factory=list)  # loss weights at latent size, [plain, flipped?]; empty: all 1
    mask_path: Path | None = None  # masked_loss: its mask image in conditioning_data_dir (found once, when the data is read)


@dataclass
class StepPlan:
    train_images: int
    train_samples: int
    reg_images: int
    reg_samples: int
    batches_per_epoch: int
    grad_accum: int
    steps_per_epoch: int
    epochs: int
    max_train_steps: int
    validation_images: int = 0

    def describe(self, batch_sizes: list[int]) -> str:
        reg = f", reg {self.reg_images} images -> {self.reg_samples} samples (balanced to train)" if self.reg_images else ""
        held = f", {self.validation_images} images held out for validation" if self.validation_images else ""
        return (f"steps: train {self.train_images} images x repeats = {self.train_samples} samples{reg}{held}; "
                f"{self.batches_per_epoch} batches/epoch (batch {','.join(map(str, batch_sizes))}); "
                f"grad accumulation {self.grad_accum} -> {self.steps_per_epoch} steps/epoch; "
                f"{self.epochs} epochs -> {self.max_train_steps} optimizer steps")


class BadImageError(DatasetError):
    pass


def model_pixels(pixels: np.ndarray) -> torch.Tensor:
    """HWC uint8 -> CHW float in [-1, 1], what the VAE encodes."""
    return torch.from_numpy(pixels).permute(2, 0, 1).float() / 127.5 - 1.0


def split_validation(images: list[Path], share: float, seed: int) -> tuple[list[Path], list[Path]]:
    """(train, held out): round(n * share) images drawn by the seed, both lists in file order.

    sd-scripts draws the same way (a seeded shuffle per subset) but cuts with ceil for the
    training part and round for the held-out part, so one image can land in both; here the two
    parts never overlap.
    """
    if share <= 0 or not images:
        return images, []
    order = list(images)
    random.Random(seed).shuffle(order)
    n_val = round(len(order) * share)
    held = set(order[len(order) - n_val:])
    return [p for p in images if p not in held], [p for p in images if p in held]


class TrainData:
    def __init__(self, specs: list[DatasetSpec], log: Callable[[str], None] = print, seed: int = 0) -> None:
        self.specs = specs
        self.log = log
        self.groups: list[tuple[DatasetSpec, list[Item]]] = []
        self.validation: list[tuple[DatasetSpec, list[Item]]] = []  # held-out images (repeats 1), per dataset
        missing: list[Path] = []
        for spec in specs:
            items, held_out = [], []
            for subset in spec.subsets:
                images, val_images = subset.images(), []
                if not subset.is_reg:  # as sd-scripts: regularization images are never held out
                    images, val_images = split_validation(
                        images, spec.validation_split, seed if spec.validation_seed is None else spec.validation_seed)
                    if val_images and not images:
                        raise DatasetError(f"{subset.image_dir}: validation_split {spec.validation_split} leaves no training image")
                for image, target in [(i, items) for i in images] + [(i, held_out) for i in val_images]:
                    caption = read_caption(image, subset.caption_extension)
                    if caption is None:
                        missing.append(image)
                        caption = subset.class_tokens or ""
                    if subset.trigger_word:
                        caption = with_trigger(caption, subset.trigger_word, subset.caption_separator)
                    target.append(Item(image, caption, subset, subset.num_repeats if target is items else 1))
            self._balance_reg(items)
            no_mask = []
            for it in items + held_out:
                if it.subset.conditioning_data_dir:
                    it.mask_path = it.subset.mask_file(it.image)
                    if it.mask_path is None:
                        no_mask.append(it.image)
            if no_mask:
                raise DatasetError(f"masked_loss: {len(no_mask)} image(s) have no mask image of the same name in "
                                   f"{no_mask[0].parent.name}'s conditioning_data_dir, e.g. {no_mask[0].name}")
            self.groups.append((spec, items))
            self.validation.append((spec, held_out))
        if missing:
            ext = sorted({s.caption_extension for spec in specs for s in spec.subsets})
            self.log(f"WARNING: {len(missing)} image(s) have no caption file ({'/'.join(ext)}); "
                     "using the folder's class tokens (or an empty caption) for:\n  " + "\n  ".join(map(str, missing)))
        self.missing_captions = missing
        if not any(not it.subset.is_reg for _, items in self.groups for it in items):
            raise DatasetError("no training images found in " + ", ".join(s.image_dir for sp in specs for s in sp.subsets))
        samples = sum(it.repeats for _, items in self.groups for it in items)
        if samples > MAX_EPOCH_SAMPLES:  # each sample of an epoch is listed: a typo in a repeat count would fill memory
            big = max((s for sp in specs for s in sp.subsets), key=lambda s: s.num_repeats)
            raise DatasetError(f"one epoch would hold {samples:,} samples (more than {MAX_EPOCH_SAMPLES:,}); the largest "
                               f"repeat count is {big.num_repeats:,} ({big.image_dir}): lower it")

    @staticmethod
    def _balance_reg(items: list[Item]) -> None:
        """sd-scripts: reg images are added pass by pass until they match the train sample count."""
        n_train = sum(it.repeats for it in items if not it.subset.is_reg)
        reg = [it for it in items if it.subset.is_reg]
        if not reg:
            return
        for it in reg:
            it.repeats = 0
        n, first = 0, True
        while n < n_train:
            for it in reg:
                if first:
                    it.repeats = it.subset.num_repeats
                    n += it.subset.num_repeats
                else:
                    it.repeats += 1
                    n += 1
                if n >= n_train:
                    break
            first = False
        items[:] = [it for it in items if not it.subset.is_reg or it.repeats > 0]

    def items(self) -> list[Item]:
        return [it for _, items in self.groups for it in items]

    def validation_items(self) -> list[Item]:
        return [it for _, items in self.validation for it in items]

    def validation_batches(self, max_batches: int | None = None) -> list[list[tuple[Item, bool]]]:
        """The held-out images in fixed batches (per dataset and bucket, file order, never flipped): every
        validation pass sees the same batches."""
        batches = []
        for spec, items in self.validation:
            by_bucket: dict[tuple[int, int], list[Item]] = {}
            for it in items:
                by_bucket.setdefault(it.bucket, []).append(it)
            for bucket in sorted(by_bucket):
                group = sorted(by_bucket[bucket], key=lambda it: str(it.image))
                batches += [[(it, False) for it in group[i:i + spec.batch_size]] for i in range(0, len(group), spec.batch_size)]
        return batches[:max_batches] if max_batches else batches

    # -- latents -------------------------------------------------------------------------------
    def cache_latents(self, encode: Callable[[torch.Tensor], torch.Tensor], vae_id: str, to_disk: bool,
                      on_bad_image: str = "skip", progress: Callable[[int], None] | None = None) -> None:
        """Decode, bucket and encode every image once (held-out ones too); corrupt images are named and skipped (or fatal)."""
        for held_out, (spec, items) in [(False, g) for g in self.groups] + [(True, g) for g in self.validation]:
            buckets = (bucket_resolutions(spec.resolution, spec.min_bucket_reso, spec.max_bucket_reso, spec.bucket_reso_steps)
                       if spec.enable_bucket else [spec.resolution])
            kept = []
            for it in items:
                try:  # validation always sees the plain centre crop, so its number does not move with the augmentation
                    self._cache_item(it, buckets, encode, vae_id, to_disk, spec, live=it.subset.live and not held_out)
                    kept.append(it)
                except BadImageError as e:
                    if on_bad_image == "error":
                        raise
                    self.log(f"WARNING: skipping {e}")
                if progress:
                    progress(1)
            items[:] = kept
        if not any(not it.subset.is_reg for it in self.items()):
            raise DatasetError("every training image was unreadable")

    def _cache_item(self, it: Item, buckets: list[tuple[int, int]], encode: Callable[[torch.Tensor], torch.Tensor],
                    vae_id: str, to_disk: bool, spec: DatasetSpec | None = None, live: bool = False) -> None:
        """Bucket the item and encode its latents; a `live` item (color_aug / random_crop) is only bucketed: the
        trainer encodes it every step (`live_pixels`)."""
        try:
            raw = it.image.read_bytes()
            with Image.open(it.image) as im:
                im.load()
                image = im.convert("RGB")
                im_alpha = im.convert("RGBA").getchannel("A") if it.subset.alpha_mask else None
        except Exception as e:
            raise BadImageError(f"{it.image}: unreadable or corrupt image ({e.__class__.__name__}: {e})") from None
        it.original_size = image.size
        resize_to = None
        if spec is not None and spec.bucket_no_upscale:
            resize_to, it.bucket = no_upscale_bucket(image.size, spec.resolution[0] * spec.resolution[1], spec.bucket_reso_steps)
            if min(it.bucket) < spec.bucket_reso_steps:
                raise BadImageError(f"{it.image}: {image.size[0]}x{image.size[1]} is smaller than bucket_reso_steps "
                                    f"{spec.bucket_reso_steps} on a side (bucket_no_upscale never enlarges it)")
            it.crop_top_left = ((resize_to[1] - it.bucket[1]) // 2, (resize_to[0] - it.bucket[0]) // 2)
        else:
            it.bucket = select_bucket(image.size, buckets)
            scale = max(it.bucket[0] / image.size[0], it.bucket[1] / image.size[1])
            it.crop_top_left = ((round(image.size[1] * scale) - it.bucket[1]) // 2, (round(image.size[0] * scale) - it.bucket[0]) // 2)
        n_views = 2 if it.subset.flip_aug else 1
        it.resize_to = resize_to
        if live:
            return
        mask = self._loss_mask(it, im_alpha, resize_to) if it.subset.alpha_mask or it.subset.conditioning_data_dir else None
        digest = hashlib.sha256(raw).hexdigest()
        cache = it.image.parent / CACHE_DIR / f"{it.image.name}.{it.bucket[0]}x{it.bucket[1]}.safetensors"
        if to_disk and confine(cache, "latent cache").is_file():  # a cache linking out is refused, not read
            with safe_open(str(cache), framework="pt") as f:
                meta = f.metadata() or {}
                if (meta.get("image_sha256") == digest and meta.get("vae") == vae_id and int(meta.get("views", 0)) >= n_views
                        and meta.get("resize", "") == it.subset.resize_interpolation):
                    it.latents = [f.get_tensor(f"view{i}") for i in range(n_views)]
                    it.mask = self._mask_views(mask, it.latents[0].shape[-2:], n_views)
                    return
        pixels = model_pixels(fit_to_bucket(image, it.bucket, resize_to, None, it.subset.resize_interpolation))
        views = [pixels] + ([pixels.flip(-1)] if n_views == 2 else [])
        latents = encode(torch.stack(views))
        if not torch.isfinite(latents).all():
            raise DatasetError(f"{it.image}: the VAE produced NaN/inf latents (an fp16 VAE overflow? use fp32 or bf16 for the VAE)")
        it.latents = [lat.cpu() for lat in latents]
        it.mask = self._mask_views(mask, it.latents[0].shape[-2:], n_views)
        if to_disk:
            save_safetensors({f"view{i}": t for i, t in enumerate(it.latents)}, cache,
                             {"image_sha256": digest, "vae": vae_id, "views": str(n_views), "resize": it.subset.resize_interpolation})

    @staticmethod
    def live_pixels(it: Item, flip: bool, rng: random.Random) -> tuple[torch.Tensor, tuple[int, int]]:
        """A live item's pixels for one step (CHW in [-1, 1]) with this step's crop and colour, and the crop's
        (top, left) for SDXL's conditioning."""
        from .augment import augmented_pixels

        with Image.open(it.image) as im:
            image = im.convert("RGB")
        pixels, top_left = augmented_pixels(image, it.bucket, it.resize_to, it.subset.random_crop, it.subset.color_aug, rng,
                                            it.subset.resize_interpolation)
        out = model_pixels(pixels)
        return (out.flip(-1) if flip else out), (top_left if top_left[0] >= 0 else it.crop_top_left)

    @staticmethod
    def _mask_views(mask: torch.Tensor | None, size: tuple[int, int], n_views: int) -> list[torch.Tensor]:
        """The pixel mask averaged down to the latents' size ("area", as sd-scripts), and flipped for a flipped view."""
        if mask is None:
            return []
        small = torch.nn.functional.interpolate(mask[None, None], size=tuple(size), mode="area")[0]
        return [small] + ([small.flip(-1)] if n_views == 2 else [])

    @staticmethod
    def _loss_mask(it: Item, alpha: Image.Image | None, resize_to: tuple[int, int] | None) -> torch.Tensor:
        """sd-scripts' masked loss: the alpha channel (alpha_mask) or the red channel of the item's mask image in
        conditioning_data_dir, resized and cropped as the image; (H, W) weights in [0, 1]."""
        if alpha is None:
            path = it.mask_path  # found (or refused) when the data was read
            try:
                with Image.open(path) as m:
                    alpha = m.convert("RGB").getchannel("R")
            except Exception as e:
                raise DatasetError(f"{path}: unreadable mask image ({e.__class__.__name__}: {e})") from None
            if alpha.size != it.original_size:
                alpha = alpha.resize(it.original_size, Image.Resampling.BILINEAR)
        return torch.from_numpy(fit_to_bucket(alpha, it.bucket, resize_to, None, it.subset.resize_interpolation)[:, :, 0]
                                ).float() / 255.0

    # -- epochs --------------------------------------------------------------------------------
    def batches_for_epoch(self, epoch: int, seed: int, processes: int = 1) -> list[list[tuple[Item, bool]]]:
        """All (global) batches of one epoch: per dataset and bucket, shuffled reproducibly by (seed, epoch).

        With N processes a global batch holds N times the dataset's batch size; each process trains
        its share of it (data_parallel.local_share).
        """
        rng = random.Random(seed * 100003 + epoch)
        batches = []
        for spec, items in self.groups:
            by_bucket: dict[tuple[int, int], list[tuple[Item, bool]]] = {}
            for it in items:
                for _ in range(it.repeats):
                    flip = it.subset.flip_aug and rng.random() < 0.5
                    by_bucket.setdefault(it.bucket, []).append((it, flip))
            for bucket in sorted(by_bucket):
                samples = by_bucket[bucket]
                rng.shuffle(samples)
                size = spec.batch_size * processes
                batches += [samples[i:i + size] for i in range(0, len(samples), size)]
        rng.shuffle(batches)
        return batches

    def plan(self, grad_accum: int, max_train_steps: int | None, max_train_epochs: int | None, processes: int = 1) -> StepPlan:
        n_batches = 0
        for spec, items in self.groups:
            counts: dict[tuple[int, int], int] = {}
            for it in items:
                counts[it.bucket] = counts.get(it.bucket, 0) + it.repeats
            n_batches += sum(math.ceil(c / (spec.batch_size * processes)) for c in counts.values())
        steps_per_epoch = math.ceil(n_batches / grad_accum)
        if max_train_epochs:
            epochs = max_train_epochs
            total = epochs * steps_per_epoch
        else:
            total = max_train_steps or 1600
            epochs = math.ceil(total / steps_per_epoch)
        train = [it for it in self.items() if not it.subset.is_reg]
        reg = [it for it in self.items() if it.subset.is_reg]
        return StepPlan(len(train), sum(it.repeats for it in train), len(reg), sum(it.repeats for it in reg),
                        n_batches, grad_accum, steps_per_epoch, epochs, total, len(self.validation_items()))

