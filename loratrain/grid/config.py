"""Options of `loratrain generate` and `loratrain grid` (light to import: the CLI builds its flags from them)."""
from __future__ import annotations

from pathlib import Path

from loratrain.core.config import JobConfig, opt
from loratrain.core.errors import ConfigError, Problem

SAMPLERS = "loratrain.core.samplers:SAMPLERS"
FLUX = "FLUX.1"
#: FLUX.1 options that an SD model would silently ignore (guidance cannot tell a set value from its default)
FLUX_ONLY = ("clip_l", "t5xxl", "ae", "t5_tokenizer", "t5xxl_max_token_length", "apply_t5_attn_mask", "shift")
#: options of the flow families (FLUX.1, SD3.5) and which of them SD3 takes (core/sd3_sampling.py's SD3Parts)
SD3_TAKES = ("clip_l", "clip_g", "t5xxl", "vae", "t5_tokenizer", "t5xxl_max_token_length", "apply_t5_attn_mask",
             "apply_lg_attn_mask", "shift")
SD3_ONLY = ("clip_g", "vae", "apply_lg_attn_mask")


class SamplingOptions(JobConfig):
    """What every image-making job shares, declared once."""

    model: str = opt("", "base model (diffusers folder or .safetensors)", path="any", group="Model")
    prompt: str = opt("", "prompt", group="Prompt")
    negative_prompt: str = opt("", "negative prompt", group="Prompt")
    width: int = opt(512, "width", ge=8, group="Sampling")
    height: int = opt(512, "height", ge=8, group="Sampling")
    steps: int = opt(30, "sampling steps", ge=1, le=1000, group="Sampling")
    cfg_scale: float = opt(7.5, "CFG scale", group="Sampling")
    seed: int = opt(0, "seed", group="Sampling")
    sampler: str = opt("ddim", "sampler", registry=SAMPLERS, group="Sampling")
    clip_skip: int = opt(1, "clip skip", ge=1, group="Sampling")
    allow_pickle: bool = opt(False, "allow a pickled .ckpt base model", group="Model", advanced=True)
    # FLUX.1 (core/flux_sampling.py): the parts and settings sd-scripts names the same way; unused with an SD model
    clip_l: str = opt("", "FLUX.1: CLIP-L file (default: inside the model)", group=FLUX, path="file", advanced=True)
    t5xxl: str = opt("", "FLUX.1: T5-XXL file (default: inside the model)", group=FLUX, path="file", advanced=True)
    ae: str = opt("", "FLUX.1: autoencoder file (default: inside the model)", group=FLUX, path="file", advanced=True)
    t5_tokenizer: str = opt("", "FLUX.1 / SD3: T5 tokenizer folder (empty: the model folder's own, else the shipped T5 "
                                "v1.1 tokenizer)", group=FLUX, path="dir", advanced=True)
    t5xxl_max_token_length: int | None = opt(None, "FLUX.1: T5 tokens (unset: 512 dev, 256 schnell)", ge=1, group=FLUX,
                                             advanced=True)
    apply_t5_attn_mask: bool = opt(False, "FLUX.1: mask T5's padding (as the LoRA was trained)", group=FLUX, advanced=True)
    clip_g: str = opt("", "SD3.5: CLIP-G file (default: inside the model)", group=FLUX, path="file", advanced=True)
    vae: str = opt("", "SD3.5: VAE file (default: inside the model)", group=FLUX, path="file", advanced=True)
    apply_lg_attn_mask: bool = opt(False, "SD3.5: mask CLIP-L/G padding (as the LoRA was trained)", group=FLUX,
                                   advanced=True)
    guidance: float = opt(3.5, "FLUX.1 dev: embedded (distilled) guidance; cfg_scale is a true CFG only with a "
                               "negative prompt", ge=0, group=FLUX)
    shift: float = opt(0.0, "FLUX.1 / SD3.5: fixed schedule shift s (sigma -> s*sigma / (1 + (s-1)*sigma)); 0 = the "
                            "model's own: BFL's from the image size for dev, none for schnell, 3.0 for SD3", ge=0,
                       group=FLUX, advanced=True)

    def flux_problems(self, models: list[str]) -> list[Problem]:
        """FLUX.1 parts found (headers only) when the models are FLUX.1; FLUX options refused with SD models."""
        from loratrain.core.flux_sampling import is_flux_checkpoint
        from loratrain.core.models.flux_loading import flux_sources

        flux = [m for m in models if m and Path(m).exists() and is_flux_checkpoint(m)]
        if not flux:
            return self.sd3_problems(models)
        if any(getattr(self, n) for n in SD3_ONLY):
            return [(n, "an SD3.5 option, but the model is FLUX.1") for n in SD3_ONLY if getattr(self, n)]
        if len(flux) != len([m for m in models if m]):
            return [("model", "FLUX.1 and SD checkpoints cannot share one grid")]
        for m in flux:
            try:
                flux_sources(m, self.clip_l, self.t5xxl, self.ae, self.t5_tokenizer)
            except ConfigError as e:  # named by its own option when it is one ("ae: ...")
                field, _, text = str(e).partition(": ")
                return [(field, text) if field in type(self).model_fields else ("model", str(e))]
        return []

    def sd3_problems(self, models: list[str]) -> list[Problem]:
        """SD3 parts found (headers only) when the models are SD3; FLUX/SD3 options refused with SD models."""
        from loratrain.core.models.sd3_loading import sd3_sources
        from loratrain.core.sd3_sampling import is_sd3_checkpoint

        given = [m for m in models if m]
        sd3 = [m for m in given if Path(m).exists() and is_sd3_checkpoint(m)]
        if not sd3:
            return [(n, "a FLUX.1 / SD3.5 option, but the model is SD") for n in FLUX_ONLY + SD3_ONLY if getattr(self, n)]
        if len(sd3) != len(given):
            return [("model", "SD3 and other checkpoints cannot share one grid")]
        out: list[Problem] = [(n, "a FLUX.1 option; the model is SD3") for n in FLUX_ONLY if n not in SD3_TAKES and getattr(self, n)]
        for m in sd3:
            try:
                sd3_sources(m, self.clip_l, self.clip_g, self.t5xxl, self.vae, self.t5_tokenizer)
            except ConfigError as e:
                field, _, text = str(e).partition(": ")
                return out + [(field, text) if field in type(self).model_fields else ("model", str(e))]
        return out


class GenerateConfig(SamplingOptions):
    network_weights: list[str] = opt([], "LoRA files as PATH[:WEIGHT[:BLOCKS]] (BLOCKS: a LoRA block-weight preset or "
                                         "12/17/20/26 values)", group="Model", path="lora")
    output: str = opt("out.png", "output PNG", path="output", group="Output")

    def requirements(self) -> list[Problem]:
        out: list[Problem] = []
        if not self.model:
            out.append(("model", "is required"))
        elif not Path(self.model).exists():
            out.append(("model", f"model not found: {self.model}"))
        if not self.prompt:
            out.append(("prompt", "is required"))
        from loratrain.core.sampling import SamplePrompt, check_weights

        try:  # a weight that cannot be encoded is said before the model loads
            check_weights(SamplePrompt(self.prompt, self.negative_prompt))
        except ValueError as e:
            out.append(("prompt", str(e)))
        from loratrain.core.session import lora_use

        if not out:
            out += self.flux_problems([self.model])
        for text in self.network_weights:
            try:
                lora_use(text, self.model)
            except (ConfigError, ValueError) as e:
                out.append(("network_weights", str(e)))
        return out


class GridConfig(SamplingOptions):
    seed: int = opt(-1, "seed for every cell (-1: one random seed, fixed for the whole grid)", group="Sampling")
    loras: list[str] = opt([], "LoRAs as PATH[:WEIGHT[:BLOCKS]]; the LoRA axes change the first one", group="Model",
                           path="lora")
    x_type: str = opt("", "X axis: checkpoint, lora, lora_weight, lora_blocks, seed, steps, cfg_scale, sampler, "
                          "clip_skip, width, height, size, prompt_sr; FLUX.1: guidance, shift", group="Axes")
    x_values: str = opt("", "X values: a,b,c or 1-5 or 1-5 (+2) or 0-1 [5]", group="Axes")
    y_type: str = opt("", "Y axis (as X)", group="Axes")
    y_values: str = opt("", "Y values", group="Axes")
    z_type: str = opt("", "Z axis (optional): one grid per value, plus a sheet of all", group="Axes")
    z_values: str = opt("", "Z values", group="Axes")
    output_dir: str = opt("grid_output", "where the grid(s) and the single cells go", path="output", group="Output")
    margin: int = opt(0, "gap between cells in pixels", ge=0, group="Output", advanced=True)
    draw_legend: bool = opt(True, "draw row/column labels", group="Output")
    max_megapixels: float = opt(200.0, "refuse grids larger than this", gt=0, group="Output", advanced=True)
    color_drift: str = opt("auto", "compare each LoRA cell's colours with the same cell at LoRA weight 0 (a colour cast that "
                                   "grows with the weight is the guides' sign of overtraining): auto = when the grid has "
                                   "weight-0 cells, on = also make the weight-0 cells it lacks, off", choices=["auto", "on", "off"],
                           group="Output")
    drift_delta_e: float = opt(10.0, "colour drift: flag a cell whose mean colour moved more than this CIE76 delta E from weight 0",
                               gt=0, group="Output", advanced=True)
    drift_chroma: float = opt(0.3, "colour drift: flag a cell whose mean saturation changed by more than this share", gt=0,
                              group="Output", advanced=True)

    def requirements(self) -> list[Problem]:
        """Every axis value and every cell's settings, checked before the first image."""
        from .plan import plan_grid

        try:
            plan_grid(self, seed=0)
        except (ConfigError, ValueError) as e:
            return [("", str(e))]
        return []
