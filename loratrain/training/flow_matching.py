"""Flow-matching training maths for FLUX.1 and SD3.5, with sd-scripts' option names, defaults and meanings.

Why a module of its own: FLUX.1 and SD3.5 are rectified-flow models, not DDPM ones. The noisy input is the straight
line `(1 - sigma) * latents + sigma * noise` with sigma in [0, 1], the model predicts the velocity `noise - latents`,
and the timestep the model sees is `sigma * 1000`. None of the DDPM scheduler, SNR or v-prediction machinery of the
SD/SDXL path applies. People bring sd-scripts configs (`flux_train_network.py`, `sd3_train_network.py`), so every
option here keeps sd-scripts' name, default and meaning (sd-scripts 48d368fa), and the tests and a parity check
prove the numbers are the same given the same random draws.

Where sd-scripts' help and code disagree, the code wins: `--sigmoid_scale` is documented as "only used when
timestep_sampling is sigmoid" but also scales `shift` and `flux_shift`; `--weighting_scheme` weights the loss only
with `--model_prediction_type sigma_scaled` and shapes the timestep density only with `--timestep_sampling sigma`.

Determinism: sd-scripts draws from torch's global RNG; here every draw comes from the `torch.Generator` passed in
(one for the batch, drawn in sd-scripts' order, so seeding both the same gives the same numbers; or one per sample,
so a sample's timestep does not depend on what else is in its batch).

Where diffusers already has the function with the same meaning it is called, not rewritten: the timestep density
(`compute_density_for_timestep_sampling`), the loss weighting (`compute_loss_weighting_for_sd3`) and the discrete
training schedule of `--timestep_sampling sigma` (`FlowMatchEulerDiscreteScheduler`).
"""
from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache
from typing import TYPE_CHECKING, Any, NamedTuple

from pydantic import BaseModel, ConfigDict

from loratrain.core.config import JobConfig, opt
from loratrain.core.errors import ConfigError, Problem

# the schedule, shift and packing maths the samplers share live in core (core/flow_schedule.py), re-exported here
from loratrain.core.flow_schedule import (  # noqa: F401
    BASE_SEQ_LEN,
    BASE_SHIFT,
    MAX_SEQ_LEN,
    MAX_SHIFT,
    flux_forward,
    flux_mu,
    flux_schedule,
    image_ids,
    pack_latents,
    shift_sigmas,
    t5_max_length,
    text_ids,
    time_shift,
    unpack_latents,
)

if TYPE_CHECKING:  # importing the option group stays light (no torch) so the CLI and UI can read it
    import torch

FLOW = "Flow matching (FLUX.1, SD3.5)"
TIMESTEP_SAMPLING = ("sigma", "uniform", "sigmoid", "shift", "flux_shift")
PREDICTION_TYPES = ("raw", "additive", "sigma_scaled")
WEIGHTING_SCHEMES = ("sigma_sqrt", "logit_normal", "mode", "cosmap", "none", "uniform")
#: the `mode` density is 1 - u - s * (u - sin^2(pi u / 2)); it stays a density on [0, 1] only for -1 <= s <= 7.2350...
#: (numerically, min over u of (1 - u) / (u - sin^2(pi u / 2))); outside, sd-scripts indexes its schedule out of range
MODE_SCALE_RANGE = (-1.0, 7.235)
NUM_TRAIN_TIMESTEPS = 1000


class FlowMatchOptions(BaseModel):
    """sd-scripts' FLUX.1 / SD3.5 training options (add_flux_train_arguments, add_sd3_training_arguments and
    add_dit_training_arguments), declared once for the flags, the TOML keys and the form."""

    timestep_sampling: str = opt(
        "sigma", "how sigma (the noise level, timestep / 1000) is drawn: sigma = from the discrete schedule shifted by "
        "discrete_flow_shift, with weighting_scheme's density; uniform = U(0, 1); sigmoid = sigmoid(sigmoid_scale * "
        "N(0, 1)); shift = that sigmoid, then shifted by discrete_flow_shift; flux_shift = that sigmoid, then FLUX.1's "
        "resolution-dependent shift (mu from the image token count)", choices=TIMESTEP_SAMPLING, group=FLOW)
    sigmoid_scale: float = opt(1.0, "scales the N(0, 1) draw before the sigmoid of the sigmoid, shift and flux_shift "
                               "samplings (larger = closer to uniform)", ge=0, group=FLOW, advanced=True)
    discrete_flow_shift: float = opt(3.0, "shift s of the sigma and shift samplings: sigma -> s*sigma / (1 + (s-1)*sigma) "
                                     "(> 1 favours noisier steps)", gt=0, group=FLOW)
    model_prediction_type: str = opt(
        "sigma_scaled", "how the model output becomes the prediction compared with noise - latents: raw = as is; "
        "additive = output + noisy input; sigma_scaled = noisy input - sigma * output, and the loss is weighted by "
        "weighting_scheme", choices=PREDICTION_TYPES, group=FLOW, advanced=True)
    guidance_scale: float = opt(3.5, "FLUX.1 dev is guidance-distilled: the guidance value it is given while "
                                "training (schnell ignores it)", ge=0, group=FLOW)
    weighting_scheme: str = opt(
        "uniform", "SD3 paper's timestep density / loss weighting: logit_normal and mode shape the draw of "
        "timestep_sampling=sigma (and every SD3 draw); sigma_sqrt (weight sigma^-2) and cosmap weight the loss "
        "(FLUX: with model_prediction_type=sigma_scaled); uniform and none are the same",
        choices=WEIGHTING_SCHEMES, group=FLOW, advanced=True)
    logit_mean: float = opt(0.0, "mean of the logit_normal density", group=FLOW, advanced=True)
    logit_std: float = opt(1.0, "standard deviation of the logit_normal density", ge=0, group=FLOW, advanced=True)
    mode_scale: float = opt(1.29, "scale of the mode density (weighting_scheme=mode)", group=FLOW, advanced=True)
    apply_t5_attn_mask: bool = opt(False, "mask T5-XXL's padding tokens in the text encoder and in FLUX's attention",
                                   group=FLOW, advanced=True)
    t5xxl_max_token_length: int | None = opt(None, "T5-XXL token length; unset: 256 for FLUX.1 schnell and SD3.5, 512 "
                                             "for FLUX.1 dev", ge=1, group=FLOW, advanced=True)
    training_shift: float = opt(1.0, "SD3.5 only: shift s applied to the drawn timestep, u -> s*u / (1 + (s-1)*u) "
                                "(> 1 favours noisier steps)", gt=0, group=FLOW, advanced=True)

    def problems(self) -> list[Problem]:
        out: list[Problem] = []
        lo, hi = MODE_SCALE_RANGE
        if self.weighting_scheme == "mode" and not lo <= self.mode_scale <= hi:
            out.append(("mode_scale", f"mode_scale {self.mode_scale} must be within [{lo}, {hi}]: outside it the mode "
                                      "density leaves [0, 1] and would pick timesteps that do not exist"))
        return out

    def requirements(self) -> list[Problem]:
        return []

    def unused_settings(self) -> list[str]:
        """FLUX settings that change nothing in this combination (sd-scripts accepts them silently): one line each."""
        out = []
        density = self.weighting_scheme in ("logit_normal", "mode")
        if density and self.timestep_sampling != "sigma":
            out.append(f"weighting_scheme={self.weighting_scheme} shapes only timestep_sampling=sigma's draw; "
                       f"{self.timestep_sampling} ignores it")
        if self.weighting_scheme in ("sigma_sqrt", "cosmap") and self.model_prediction_type != "sigma_scaled":
            out.append(f"weighting_scheme={self.weighting_scheme} weights the loss only with "
                       f"model_prediction_type=sigma_scaled, not {self.model_prediction_type}")
        if self.sigmoid_scale != 1.0 and self.timestep_sampling in ("sigma", "uniform"):
            out.append(f"sigmoid_scale is unused by timestep_sampling={self.timestep_sampling}")
        if self.discrete_flow_shift != 3.0 and self.timestep_sampling not in ("sigma", "shift"):
            out.append(f"discrete_flow_shift is unused by timestep_sampling={self.timestep_sampling}")
        return out


class FlowMatchConfig(FlowMatchOptions, JobConfig):
    """The group on its own, validated (choices, ranges, problems) as a job config is; for code and tests."""

    model_config = ConfigDict(allow_inf_nan=False)


def flow_match_options(**values: Any) -> FlowMatchConfig:
    """FlowMatchConfig from keyword values, every problem raised as one ConfigError naming its option."""
    return FlowMatchConfig.build(values, source="flow matching options")


# ---- shifts and schedules ------------------------------------------------------------------------------------------
@lru_cache(maxsize=8)
def _train_schedule(shift: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The 1000-step shifted training schedule (timesteps, sigmas) of --timestep_sampling sigma, as sd-scripts builds it."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    sched = FlowMatchEulerDiscreteScheduler(num_train_timesteps=NUM_TRAIN_TIMESTEPS, shift=shift)
    return sched.timesteps.clone(), sched.sigmas.clone()


# ---- the noisy input of a training step ----------------------------------------------------------------------------
class FlowSample(NamedTuple):
    """A step's noisy input (latents' shape), timesteps (B,) in [0, 1000] and sigmas (B, 1, 1, 1) in [0, 1]."""

    noisy: torch.Tensor
    timesteps: torch.Tensor
    sigmas: torch.Tensor


def _generators(generator: torch.Generator | Sequence[torch.Generator], batch: int) -> list[torch.Generator]:
    import torch

    gens = [generator] if isinstance(generator, torch.Generator) else list(generator)
    if len(gens) not in (1, batch):
        raise ValueError(f"{len(gens)} generators for a batch of {batch}: pass one, or one per sample")
    return gens


def draw_sigmas(opts: Any, batch: int, generator: torch.Generator, image_seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(timesteps, sigmas), each (batch,) on the CPU, drawn as sd-scripts' FLUX get_noisy_model_input_and_timesteps
    draws them (same distributions, same order of draws). `image_seq_len` (packed tokens) is flux_shift's mu."""
    import torch

    kind = opts.timestep_sampling
    if kind in ("uniform", "sigmoid"):
        if kind == "sigmoid":
            sigmas = torch.sigmoid(opts.sigmoid_scale * torch.randn((batch,), generator=generator))
        else:
            sigmas = torch.rand((batch,), generator=generator)
    elif kind in ("shift", "flux_shift"):
        sigmas = (torch.randn(batch, generator=generator) * opts.sigmoid_scale).sigmoid()
        if kind == "shift":
            sigmas = shift_sigmas(sigmas, opts.discrete_flow_shift)
        else:
            sigmas = time_shift(flux_mu(image_seq_len), 1.0, sigmas)
    elif kind == "sigma":
        from diffusers.training_utils import compute_density_for_timestep_sampling

        u = compute_density_for_timestep_sampling(opts.weighting_scheme, batch, logit_mean=opts.logit_mean,
                                                  logit_std=opts.logit_std, mode_scale=opts.mode_scale, generator=generator)
        # a float32 sigmoid can round to exactly 1 (and mode's density is 1 at u = 0): sd-scripts then indexes
        # timestep 1000 of 0..999 and fails; the nearest existing step is the one meant
        indices = (u * NUM_TRAIN_TIMESTEPS).long().clamp(0, NUM_TRAIN_TIMESTEPS - 1)
        timesteps, sigmas = _train_schedule(float(opts.discrete_flow_shift))
        return timesteps[indices], sigmas[indices]
    else:
        raise ConfigError(f"timestep_sampling {kind!r} is not one of: {', '.join(TIMESTEP_SAMPLING)}")
    return sigmas * NUM_TRAIN_TIMESTEPS, sigmas


def sample_timesteps(latents: torch.Tensor, noise: torch.Tensor, opts: Any,
                     generator: torch.Generator | Sequence[torch.Generator], dtype: torch.dtype | None = None,
                     image_seq_len: int | None = None, ip_noise_gamma: float = 0.0,
                     ip_noise_gamma_random_strength: bool = False) -> FlowSample:
    """FLUX.1's noisy model input, timesteps and sigmas for a batch of (unpacked) latents, as sd-scripts'
    get_noisy_model_input_and_timesteps computes them.

    `generator`: one for the batch (draws in sd-scripts' order: sigmas, then the input perturbation, then its one
    random strength) or one per sample (each sample's sigma, perturbation and strength from its own). `image_seq_len`
    defaults to the packed token count (H/2)*(W/2), which flux_shift needs. `dtype` (default: the latents') is what
    the noisy input and timesteps are cast to, and the sigma sampling's sigmas too, as sd-scripts does.
    ip_noise_gamma: input perturbation, noise + gamma * xi in the input only (the target keeps the plain noise).
    """
    import torch

    if latents.ndim < 3 or noise.shape != latents.shape:
        raise ValueError(f"latents {tuple(latents.shape)} and noise {tuple(noise.shape)} must be the same (B, C, H, W)")
    dtype = dtype or latents.dtype
    batch, h, w = latents.shape[0], latents.shape[-2], latents.shape[-1]
    seq_len = (h // 2) * (w // 2) if image_seq_len is None else int(image_seq_len)
    gens = _generators(generator, batch)
    if len(gens) == 1:
        timesteps, sigmas = draw_sigmas(opts, batch, gens[0], seq_len)
    else:
        draws = [draw_sigmas(opts, 1, g, seq_len) for g in gens]
        timesteps, sigmas = torch.cat([d[0] for d in draws]), torch.cat([d[1] for d in draws])
    if opts.timestep_sampling == "sigma":
        sigmas = sigmas.to(dtype)
    sigmas = sigmas.to(latents.device).view(-1, *[1] * (latents.ndim - 1))
    timesteps = timesteps.to(latents.device)
    if ip_noise_gamma:
        parts = []
        for g, n in ((gens[0], batch),) if len(gens) == 1 else ((g, 1) for g in gens):
            xi = torch.randn((n, *latents.shape[1:]), generator=g, dtype=dtype)
            strength = torch.rand(1, generator=g, dtype=dtype) * ip_noise_gamma if ip_noise_gamma_random_strength \
                else ip_noise_gamma
            parts.append(xi * strength)
        noisy = (1.0 - sigmas) * latents + sigmas * (noise + torch.cat(parts).to(latents.device))
    else:
        noisy = (1.0 - sigmas) * latents + sigmas * noise
    return FlowSample(noisy.to(dtype), timesteps.to(dtype), sigmas)


def sample_timesteps_sd3(latents: torch.Tensor, noise: torch.Tensor, opts: Any, generator: torch.Generator,
                         min_timestep: int | None = None, max_timestep: int | None = None,
                         dtype: torch.dtype | None = None) -> FlowSample:
    """SD3.5's noisy input, as sd-scripts' sd3_train_utils computes it: u from weighting_scheme's density, shifted by
    training_shift, mapped to an integer timestep in [min_timestep, max_timestep) and sigma = timestep / 1000."""
    from diffusers.training_utils import compute_density_for_timestep_sampling

    dtype = dtype or latents.dtype
    u = compute_density_for_timestep_sampling(opts.weighting_scheme, latents.shape[0], logit_mean=opts.logit_mean,
                                              logit_std=opts.logit_std, mode_scale=opts.mode_scale, generator=generator)
    t_min = 0 if min_timestep is None else min_timestep
    t_max = NUM_TRAIN_TIMESTEPS if max_timestep is None else max_timestep
    u = shift_sigmas(u, opts.training_shift)
    timesteps = (u * (t_max - t_min) + t_min).long().to(device=latents.device, dtype=dtype)
    sigmas = (timesteps / NUM_TRAIN_TIMESTEPS).view(-1, *[1] * (latents.ndim - 1))
    noisy = sigmas * noise + (1.0 - sigmas) * latents
    return FlowSample(noisy, timesteps, sigmas)


# ---- prediction, target and loss weighting -------------------------------------------------------------------------
def loss_weighting(weighting_scheme: str, sigmas: torch.Tensor) -> torch.Tensor:
    """The SD3 paper's loss weight per sample (diffusers' function): sigma_sqrt = sigma^-2, cosmap = 2 / (pi (1 - 2
    sigma + 2 sigma^2)), anything else 1."""
    from diffusers.training_utils import compute_loss_weighting_for_sd3

    if weighting_scheme not in WEIGHTING_SCHEMES:
        raise ConfigError(f"weighting_scheme {weighting_scheme!r} is not one of: {', '.join(WEIGHTING_SCHEMES)}")
    return compute_loss_weighting_for_sd3(weighting_scheme, sigmas)


def apply_prediction_type(model_pred: torch.Tensor, noisy: torch.Tensor, sigmas: torch.Tensor,
                          opts: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(prediction, loss weighting or None) from FLUX's raw output, per --model_prediction_type: raw as is; additive
    + noisy input; sigma_scaled noisy - sigma * output (EDM-style preconditioning), with weighting_scheme's weight."""
    kind = opts.model_prediction_type
    if kind == "raw":
        return model_pred, None
    if kind == "additive":
        return model_pred + noisy, None
    if kind == "sigma_scaled":
        return model_pred * (-sigmas) + noisy, loss_weighting(opts.weighting_scheme, sigmas)
    raise ConfigError(f"model_prediction_type {kind!r} is not one of: {', '.join(PREDICTION_TYPES)}")


def flux_target(latents: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """What FLUX's prediction is compared with: the velocity noise - latents (d noisy / d sigma)."""
    return noise - latents


def sd3_prediction(model_pred: torch.Tensor, noisy: torch.Tensor, sigmas: torch.Tensor,
                   weighting_scheme: str) -> tuple[torch.Tensor, torch.Tensor]:
    """SD3.5's (prediction, loss weight): the output preconditioned as noisy - sigma * output, an estimate of the
    clean latents, which are SD3's target in sd-scripts (not FLUX's noise - latents); the weight is always applied."""
    return model_pred * (-sigmas) + noisy, loss_weighting(weighting_scheme, sigmas)


def weighted_loss(pred: torch.Tensor, target: torch.Tensor, weighting: torch.Tensor | None = None,
                  loss_type: str = "l2", huber_c: torch.Tensor | None = None) -> torch.Tensor:
    """Per-sample loss as sd-scripts computes it: elementwise loss in float32, times the weighting, mean over all
    but the batch dimension (the caller applies per-sample loss weights and the batch mean)."""
    from .noise import elementwise_loss

    loss = elementwise_loss(pred.float(), target.float(), loss_type, huber_c)
    if weighting is not None:
        loss = loss * weighting
    return loss.mean(dim=list(range(1, loss.ndim)))


def flux_prediction(model: Any, latents: torch.Tensor, noise: torch.Tensor, t5_out: torch.Tensor,
                    clip_pooled: torch.Tensor, opts: Any, generator: torch.Generator | Sequence[torch.Generator],
                    t5_mask: torch.Tensor | None = None, dtype: torch.dtype | None = None,
                    ip_noise_gamma: float = 0.0, ip_noise_gamma_random_strength: bool = False,
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """One FLUX.1 training forward as sd-scripts' FluxNetworkTrainer.get_noise_pred_and_target does it: noisy input,
    pack, run the transformer (timesteps / 1000, guidance_scale, T5 mask only with apply_t5_attn_mask), unpack, apply
    the prediction type. Returns (prediction, target, timesteps, weighting or None) in latents' (B, C, H, W) layout."""
    s = sample_timesteps(latents, noise, opts, generator, dtype, ip_noise_gamma=ip_noise_gamma,
                         ip_noise_gamma_random_strength=ip_noise_gamma_random_strength)
    pred, weighting = flux_predict(model, s.noisy, s.sigmas, s.timesteps / NUM_TRAIN_TIMESTEPS, t5_out, clip_pooled,
                                   opts, t5_mask)
    return pred, flux_target(latents, noise), s.timesteps, weighting


def flux_predict(model: Any, noisy: torch.Tensor, sigmas: torch.Tensor, timesteps: torch.Tensor, t5_out: torch.Tensor,
                 clip_pooled: torch.Tensor, opts: Any, t5_mask: torch.Tensor | None = None,
                 ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(prediction, weighting or None) for a noisy (B, C, H, W) input at `sigmas` (B, 1, 1, 1): pack, run the
    transformer (timesteps in [0, 1], guidance_scale, T5 mask only with apply_t5_attn_mask), unpack, apply the
    prediction type. flux_prediction draws the input first; validation passes a fixed sigma."""
    ph, pw = noisy.shape[-2] // 2, noisy.shape[-1] // 2
    out = flux_forward(model, pack_latents(noisy), ph, pw, t5_out, clip_pooled, timesteps, opts.guidance_scale,
                       t5_mask if opts.apply_t5_attn_mask else None)
    return apply_prediction_type(unpack_latents(out, ph, pw), noisy, sigmas, opts)
