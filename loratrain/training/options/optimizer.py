"""Learning rates, optimizer and schedule, steps, precision and the speed/memory switches of the training loop."""
from __future__ import annotations

from pydantic import BaseModel, field_validator

from loratrain.core.config import opt
from loratrain.core.errors import Problem

from . import OPTIM

MIXED_PRECISIONS = ("no", "fp32", "fp16", "bf16")


def plateau(scheduler_type: str) -> bool:
    """torch's ReduceLROnPlateau: stepped with a metric (a validation loss), which the training loop has not got."""
    return scheduler_type.removeprefix("torch.optim.lr_scheduler.").lower() == "reducelronplateau"


class OptimizerOptions(BaseModel):
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
    clip_skip: int = opt(1, "use the n-th text encoder layer from the end (SD1/SD2)", ge=1, group=OPTIM)
    seed: int = opt(42, "seed; a run with the same seed and data is repeatable", group=OPTIM)

    @field_validator("text_encoder_lr", mode="before")
    @classmethod
    def _one_or_per_encoder(cls, value: object) -> object:
        """sd-scripts and the GUI write a number or a list (one per text encoder); a list either way."""
        if isinstance(value, str):
            return value.replace(",", " ").split()
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return [value]
        return value

    @field_validator("dynamo_backend", mode="before")
    @classmethod
    def _backend_name(cls, value: object) -> object:
        return value.lower() if isinstance(value, str) else value  # accelerate's config and the GUI write "NO"

    @field_validator("optimizer_args", "lr_scheduler_args")
    @classmethod
    def _key_values(cls, value: list[str]) -> list[str]:
        bad = [a for a in value if "=" not in a]
        if bad:
            raise ValueError(f"{bad[0]!r} is not key=value")
        return value

    def text_encoder_lrs(self, n_encoders: int) -> list[float]:
        """The learning rate of each text encoder: one value for all, or one each; learning_rate when unset."""
        if not self.text_encoder_lr:
            return [self.learning_rate] * n_encoders
        if len(self.text_encoder_lr) == 1:
            return list(self.text_encoder_lr) * n_encoders
        return list(self.text_encoder_lr[:n_encoders])

    def problems(self) -> list[Problem]:
        out: list[Problem] = []
        sched = self.lr_scheduler.lower()
        if sched == "piecewise_constant" and not any(a.startswith("step_rules=") for a in self.lr_scheduler_args):
            out.append(("lr_scheduler_args", "piecewise_constant needs step_rules=..., e.g. step_rules=1:100,0.5:200,0.1"))
        if sched == "warmup_stable_decay" and not self.lr_decay_steps:
            out.append(("lr_decay_steps", "warmup_stable_decay needs lr_decay_steps (steps, or a ratio of the total)"))
        if plateau(self.lr_scheduler_type):
            out.append(("lr_scheduler_type", "ReduceLROnPlateau lowers the lr when a metric stops improving and needs that "
                                             "metric at every step; training gives it none. Choose a schedule by steps "
                                             "(e.g. CosineAnnealingLR, StepLR) or an lr_scheduler"))
        if sched == "adafactor" and self.optimizer_type.lower() != "adafactor":
            out.append(("lr_scheduler", "the adafactor schedule is Adafactor's own: use optimizer_type Adafactor "
                                        "with optimizer_args relative_step=True"))
        if self.torch_compile and self.dynamo_backend == "no":
            out.append(("dynamo_backend", "'no' turns torch.compile off, but torch_compile is on; choose a backend (inductor)"))
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
        """The optimizer's package and arguments, and the schedule's, checked before a model loads."""
        from ..config_checks import optimizer_problems, schedule_problems
        from ..optim import OPTIMIZERS

        out: list[Problem] = []
        if (self.lr_scheduler_args or self.lr_scheduler_type) and not plateau(self.lr_scheduler_type):
            out += schedule_problems(self)
        out += optimizer_problems(self)
        if self.optimizer_type in OPTIMIZERS and (hint := OPTIMIZERS.get(self.optimizer_type).missing()):
            out.append(("optimizer_type", hint))
        if self.fused_backward_pass and self.optimizer_type in OPTIMIZERS and not OPTIMIZERS.get(self.optimizer_type).per_parameter:
            out.append(("fused_backward_pass", f"not with {self.optimizer_type}: its state spans parameters; use AdamW, "
                                               "AdamW8bit, Adafactor, Lion or SGD"))
        return out
