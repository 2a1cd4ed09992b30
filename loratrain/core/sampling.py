"""Sample images: the sd-scripts prompt-file syntax (prompts in A1111's attention syntax), and one generate() used by
training, generate and the grid."""
from __future__ import annotations

import secrets
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from PIL import Image
from PIL.PngImagePlugin import PngInfo

from .models.loading import SDModel
from .prompt_encoding import pipeline_embeds
from .safe_io import atomic_path
from .samplers import SAMPLERS


@dataclass
class SamplePrompt:
    prompt: str
    negative_prompt: str = ""
    width: int = 512
    height: int = 512
    steps: int = 30
    cfg_scale: float = 7.5
    seed: int | None = None
    sampler: str | None = None
    guidance: float | None = None  # FLUX.1 dev's embedded guidance (--g); None: the caller's default


def parse_prompt_line(line: str, defaults: SamplePrompt) -> SamplePrompt:
    """`prompt --n negative --w 512 --h 512 --s 30 --l 7.5 --d 42 --ss euler_a --g 3.5` (sd-scripts; --g: FLUX.1)."""
    parts = line.split(" --")
    p = replace(defaults, prompt=parts[0].strip())
    for part in parts[1:]:
        key, _, value = part.strip().partition(" ")
        value = value.strip()
        try:
            if key == "n":
                p.negative_prompt = value
            elif key == "w":
                p.width = int(value)
            elif key == "h":
                p.height = int(value)
            elif key == "s":
                p.steps = max(1, min(1000, int(value)))
            elif key == "l":
                p.cfg_scale = float(value)
            elif key == "d":
                p.seed = int(value)
            elif key == "ss":
                p.sampler = value
            elif key == "g":  # sd-scripts' FLUX.1 guidance scale (SD models ignore it)
                p.guidance = float(value)
        except ValueError:
            raise ValueError(f"prompt option --{key} has a bad value {value!r} in line: {line!r}") from None
    check_weights(p)
    return p


def check_weights(prompt: SamplePrompt) -> None:
    """The prompt and negative prompt read as A1111 weights, so a weight that cannot be encoded is refused when the
    prompts are read (before training or a grid starts), not at the first image."""
    from .prompt_weights import parse_weights

    for text in (prompt.prompt, prompt.negative_prompt):
        try:
            parse_weights(text, breaks=True)
        except ValueError as e:
            raise ValueError(f"{e} (in: {text[:80]!r})") from None


def load_prompts(path: str | Path, defaults: SamplePrompt) -> list[SamplePrompt]:
    from .paths import confine

    path = confine(path, "sample_prompts")  # checked each time it is read: a link swapped in mid-run is refused
    if not path.is_file():
        raise FileNotFoundError(f"sample prompt file not found: {path}")
    lines = [ln.strip() for ln in path.read_text(encoding="utf-8").splitlines()]
    return [parse_prompt_line(ln, defaults) for ln in lines if ln and not ln.startswith("#")]


def build_pipeline(model: SDModel, sampler: str):
    """A diffusers pipeline over the already-loaded components (no copy, adapters stay active)."""
    import diffusers
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    spec = SAMPLERS.get(sampler)
    scheduler = getattr(diffusers, spec.scheduler).from_config(dict(model.noise_scheduler.config), **spec.kwargs)
    if model.family.is_sdxl:
        return StableDiffusionXLPipeline(vae=model.vae, text_encoder=model.text_encoders[0], text_encoder_2=model.text_encoders[1],
                                         tokenizer=model.tokenizers[0], tokenizer_2=model.tokenizers[1], unet=model.unet, scheduler=scheduler)
    return StableDiffusionPipeline(vae=model.vae, text_encoder=model.text_encoders[0], tokenizer=model.tokenizers[0], unet=model.unet,
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None, requires_safety_checker=False)


def infotext(prompt: SamplePrompt, sampler: str, seed: int, clip_skip: int, extra: dict[str, str] | None = None) -> str:
    """A1111's `parameters` text; like A1111, no `Negative prompt:` line when there is none."""
    lines = [prompt.prompt]
    if prompt.negative_prompt:
        lines.append(f"Negative prompt: {prompt.negative_prompt}")
    fields = {"Steps": prompt.steps, "Sampler": sampler, "CFG scale": prompt.cfg_scale, "Seed": seed,
              "Size": f"{prompt.width}x{prompt.height}", "Clip skip": clip_skip, **(extra or {})}
    lines.append(", ".join(f"{k}: {v}" for k, v in fields.items()))
    return "\n".join(lines)


@dataclass
class Generated:
    path: Path
    parameters: str  # the A1111 infotext written into the PNG


@torch.no_grad()
def generate(model: SDModel, prompt: SamplePrompt, out_path: str | Path, sampler: str = "ddim", clip_skip: int = 1,
             extra_info: dict[str, str] | None = None, extra_params: dict[str, str] | None = None) -> Generated:
    """One image, saved atomically as PNG with A1111-style `parameters` text.

    Prompts are read as A1111 reads them (`(word:0.7)`, `(word)`, `[word]`, `BREAK`, 75-token chunks with
    no 77-token cut; see prompt_encoding), here so training samples, `generate` and the grid all agree.
    The seed comes from the prompt (or the system's randomness): torch's global generator is never touched.
    """
    seed = prompt.seed if prompt.seed is not None else secrets.randbelow(2**31 - 1)
    used = prompt.sampler or sampler
    pipe = build_pipeline(model, used)
    pipe.set_progress_bar_config(disable=True)
    gen = torch.Generator(device="cpu").manual_seed(seed)
    embeds = pipeline_embeds(model, prompt.prompt, prompt.negative_prompt, clip_skip,
                             zero_empty_negative=bool(getattr(pipe.config, "force_zeros_for_empty_prompt", False)))
    image = pipe(**embeds, width=prompt.width, height=prompt.height, num_inference_steps=prompt.steps,
                 guidance_scale=prompt.cfg_scale, generator=gen, output_type="pil").images[0]
    return save_sample(image, out_path, infotext(prompt, used, seed, clip_skip, extra_params), extra_info)


def save_sample(image: Image.Image, out_path: str | Path | None, params: str,
                extra_info: dict[str, str] | None = None) -> Generated:
    """A sample image written atomically as PNG with A1111's `parameters` text (and any extra text chunks); every
    family's sampler ends here. `out_path` None writes nothing: a sharded run's other processes take part in every
    forward of a sample, and only the first one writes it."""
    if out_path is None:
        return Generated(None, params)  # type: ignore[arg-type]
    info = PngInfo()
    info.add_text("parameters", params)
    for k, v in (extra_info or {}).items():
        info.add_text(k, v)
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(out_path) as tmp:
        image.save(tmp, format="PNG", pnginfo=info)
    return Generated(out_path, params)


def sample_file_name(output_name: str, epoch: int | None, step: int, index: int, seed: int | None) -> str:
    when = f"e{epoch:06d}" if epoch is not None else f"{step:06d}"
    return f"{output_name}_{when}_{index:02d}" + (f"_{seed}" if seed is not None else "") + ".png"
