"""`loratrain dreambooth` and `loratrain finetune`: full fine-tuning of SD1/SD2/SDXL on the LoRA trainer's loop
(the `full` network), with DreamBooth's prior preservation: class images in the reg folder, weighted by
`prior_loss_weight`, generated with the base model when there are fewer than `num_class_images`.

Class images are made in seeded batches (image i always from seed + i), each written atomically with its
prompt as caption, so a stop keeps what was made and the next run continues with the missing ones.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from loratrain.core.config import opt
from loratrain.core.errors import Problem
from loratrain.core.images import list_images
from loratrain.core.jobs import job
from loratrain.core.progress import Reporter, StopFlag

from .config import DATA, NET, OPTIM, SAVE, TrainConfig


class FinetuneConfig(TrainConfig):
    network_module: str = opt("full", "a fine-tune trains the whole model", registry="loratrain.training.networks:NETWORKS",
                              group=NET)
    stop_text_encoder_training: int = opt(0, "stop training the text encoder(s) after this many steps (0 = never)", ge=0,
                                          group=OPTIM)
    use_ema: bool = opt(False, "keep an exponential moving average of the weights and save it", group=OPTIM)
    ema_decay: float = opt(0.9999, "EMA decay (diffusers' EMAModel, with its warm-up)", gt=0, lt=1, group=OPTIM, advanced=True)
    ema_on_cpu: bool = opt(False, "keep the EMA weights in CPU memory (frees GPU memory, costs a copy per step)",
                           group=OPTIM, advanced=True)
    save_diffusers: bool = opt(False, "also write each save as a diffusers folder <output_name>/ beside the .safetensors "
                                      "(sd-scripts' save_model_as diffusers)", group=SAVE)

    def network_options(self) -> dict[str, Any]:
        return {**super().network_options(), "ema_decay": self.ema_decay if self.use_ema else 0.0, "ema_on_cpu": self.ema_on_cpu,
                "stop_text_encoder_after": self.stop_text_encoder_training, "save_diffusers": self.save_diffusers,
                "replace_diffusers": self.overwrite or bool(self.resume)}

    @classmethod
    def compat(cls, flat: dict) -> tuple[dict, list[str], list[Problem]]:
        """sd-scripts' train_db.py / fine_tune.py: save_model_as diffusers(_safetensors) writes a pipeline folder."""
        if str(flat.get("save_model_as", "")).lower() in ("diffusers", "diffusers_safetensors"):
            flat = {**{k: v for k, v in flat.items() if k != "save_model_as"}, "save_diffusers": True}
        return super().compat(flat)

    def problems(self) -> list[Problem]:
        out = super().problems()
        if self.network_kind != "full":
            out.append(("network_module", "a fine-tune trains the whole model (network_module full)"))
        ema = [n for n in ("ema_decay", "ema_on_cpu") if getattr(self, n) != type(self).model_fields[n].default]
        if ema and not self.use_ema:
            out.append((ema[0], f"{' and '.join(ema)} {'set the' if len(ema) > 1 else 'sets the'} EMA, which is off: add "
                                "--use_ema, or leave them out"))
        return out


class DreamBoothConfig(FinetuneConfig):
    class_prompt: str = opt("", "prompt of the class images, e.g. 'a photo of a dog'", group=DATA)
    num_class_images: int = opt(0, "make class images with the base model until the reg folder holds this many", ge=0, group=DATA)
    class_sampling_steps: int = opt(30, "sampling steps of each class image", ge=1, group=DATA, advanced=True)
    class_batch_size: int = opt(4, "class images generated together", ge=1, group=DATA, advanced=True)

    def problems(self) -> list[Problem]:
        out = super().problems()
        if self.num_class_images and not self.class_prompt:
            out.append(("class_prompt", "is needed to generate class images (num_class_images is set)"))
        if self.num_class_images and not self.reg_data_dir and not self.dataset_config:
            out.append(("reg_data_dir", "give the folder the class images go into (num_class_images is set)"))
        return out


    def requirements(self) -> list[Problem]:
        out = super().requirements()
        if self.num_class_images:  # the class images make the reg folder
            out = [p for p in out if p[0] != "reg_data_dir"]
        return out


def class_folder(cfg: DreamBoothConfig) -> Path:
    """`<reg_data_dir>/1_<class prompt>`: sd-scripts' `<repeats>_<class>` layout, one repeat."""
    name = "".join(c if c.isalnum() or c in " -_," else "_" for c in cfg.class_prompt).strip()[:80] or "class"
    return Path(cfg.reg_data_dir) / f"1_{name}"


def count_class_images(reg: Path) -> int:
    """The class images training will use: images that open (their header), directly in the reg folder's
    `<repeats>_<class>` subfolders as training reads them; junk files with an image's name, files elsewhere in
    the folder and folders of another name do not count."""
    from PIL import Image

    if not reg.is_dir():
        return 0
    count = 0
    for child in sorted(p for p in reg.iterdir() if p.is_dir() and not p.name.startswith(".")):
        head = child.name.partition("_")[0]
        if not (head.isdigit() and int(head) >= 1):
            continue
        for path in list_images(child):
            try:
                with Image.open(path):
                    count += 1
            except (OSError, ValueError, SyntaxError, Image.DecompressionBombError):
                continue
    return count


def make_class_images(cfg: DreamBoothConfig, reporter: Reporter, stop: StopFlag) -> tuple[int, bool]:
    """(images made, stopped): fill the class folder until the reg folder holds `num_class_images` images."""
    need = cfg.num_class_images - count_class_images(Path(cfg.reg_data_dir))
    if need <= 0:
        return 0, False
    import torch
    from PIL.PngImagePlugin import PngInfo

    from loratrain.core.devices import pick_device
    from loratrain.core.models.loading import load_model
    from loratrain.core.safe_io import atomic_path, atomic_write_text
    from loratrain.core.sampling import build_pipeline

    folder = class_folder(cfg)
    folder.mkdir(parents=True, exist_ok=True)
    device = pick_device("auto")
    model = load_model(cfg.pretrained_model_name_or_path).to(device)
    pipe = build_pipeline(model, "ddim")
    pipe.set_progress_bar_config(disable=True)
    w, h = cfg.resolution_wh()
    todo = [i for i in range(cfg.num_class_images) if not (folder / f"class_{i:05d}.png").exists()][:need]
    reporter.start(len(todo), "class images", unit="image")
    made = 0
    for start in range(0, len(todo), cfg.class_batch_size):
        if stop.is_set():
            reporter.done("")
            return made, True
        batch = todo[start:start + cfg.class_batch_size]
        gens = [torch.Generator(device="cpu").manual_seed(cfg.seed + i) for i in batch]
        images = pipe([cfg.class_prompt] * len(batch), width=w, height=h, num_inference_steps=cfg.class_sampling_steps,
                      generator=gens, output_type="pil").images
        for i, image in zip(batch, images):
            path = folder / f"class_{i:05d}.png"
            atomic_write_text(path.with_suffix(cfg.caption_extension), cfg.class_prompt)  # the caption first: an image
            info = PngInfo()                                                             # on disk always has one
            info.add_text("parameters", f"{cfg.class_prompt}\nSteps: {cfg.class_sampling_steps}, Seed: {cfg.seed + i}, Size: {w}x{h}")
            with atomic_path(path) as tmp:
                image.save(tmp, format="PNG", pnginfo=info)
            made += 1
            reporter.advance(1)
    reporter.done(f"{made} class image(s) in {folder}")
    del pipe, model
    return made, False


def _train(cfg: FinetuneConfig, reporter: Reporter, stop: StopFlag):  # noqa: ANN202
    from .trainer import LoRATrainer

    trainer = LoRATrainer(cfg, reporter, stop)
    trainer.setup()
    return trainer.run()


@job
def run_finetune(cfg: FinetuneConfig, reporter: Reporter, stop: StopFlag):  # noqa: ANN201
    """Fine-tune the whole UNet (and the text encoders unless network_train_unet_only, for stop_text_encoder_training
    steps when set). Same data, options, resume and samples as `train`; saves LDM single-file checkpoints.
    Result: a TrainResult whose lora_path is the checkpoint."""
    return _train(cfg, reporter, stop)


@job
def run_dreambooth(cfg: DreamBoothConfig, reporter: Reporter, stop: StopFlag):  # noqa: ANN201
    """DreamBooth: class images generated first when the reg folder has fewer than num_class_images (a stop keeps
    them), then a full fine-tune with prior preservation (reg images at prior_loss_weight). Result: a TrainResult
    whose lora_path is the checkpoint."""
    from .trainer import TrainResult

    made, stopped = make_class_images(cfg, reporter, stop)
    if made:
        reporter.log(f"made {made} class image(s) from {cfg.class_prompt!r} in {class_folder(cfg)}")
    if stopped:
        return TrainResult(lora_path=None, state_dir=Path(cfg.output_dir), global_step=0, epoch=0, stopped=True)
    return _train(cfg, reporter, stop)
