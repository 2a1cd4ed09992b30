"""The noise, timesteps and loss of each training step (sd-scripts' names and meanings)."""
from __future__ import annotations

from pydantic import BaseModel

from loratrain.core.config import opt
from loratrain.core.errors import Problem

from . import NOISE


class NoiseOptions(BaseModel):
    noise_offset: float = opt(0.0, "noise offset strength", ge=0, group=NOISE)
    noise_offset_random_strength: bool = opt(False, "draw the offset strength from U(0, noise_offset)", group=NOISE, advanced=True)
    adaptive_noise_scale: float = opt(0.0, "add |mean latent| * this to the offset", group=NOISE, advanced=True)
    multires_noise_iterations: int = opt(0, "pyramid noise iterations (0 = off)", ge=0, group=NOISE)
    multires_noise_discount: float = opt(0.3, "pyramid noise discount", ge=0, le=1, group=NOISE, advanced=True)
    min_snr_gamma: float = opt(0.0, "min-SNR weighting gamma (0 = off, 5 recommended)", ge=0, group=NOISE)
    loss_type: str = opt("l2", "loss: l2, l1, huber, smooth_l1 (sd-scripts' meanings)", choices=["l2", "l1", "huber", "smooth_l1"],
                         group=NOISE, advanced=True)
    huber_schedule: str = opt("snr", "how the huber/smooth_l1 parameter c varies with the timestep",
                              choices=["constant", "exponential", "snr"], group=NOISE, advanced=True)
    huber_c: float = opt(0.1, "huber/smooth_l1 parameter c (its value at t=0 for the schedules)", gt=0, le=1, group=NOISE,
                         advanced=True)
    huber_scale: float = opt(1.0, "multiplies c", gt=0, group=NOISE, advanced=True)
    ip_noise_gamma: float = opt(0.0, "input perturbation: the noisy latent gets extra noise * gamma, the target does not "
                                     "(0 = off, 0.1 typical)", ge=0, group=NOISE, advanced=True)
    ip_noise_gamma_random_strength: bool = opt(False, "draw the input perturbation from U(0, ip_noise_gamma)", group=NOISE,
                                               advanced=True)
    scale_v_pred_loss_like_noise_pred: bool = opt(False, "v-prediction: weight the loss by SNR/(SNR+1), so it weighs the "
                                                         "timesteps as an epsilon loss does", group=NOISE, advanced=True)
    v_pred_like_loss: float = opt(0.0, "epsilon models: add this share of a v-prediction-like loss (loss x (SNR+1)/SNR)", ge=0,
                                  group=NOISE, advanced=True)
    debiased_estimation_loss: bool = opt(False, "weight the loss by 1/sqrt(SNR) (eps) or 1/(SNR+1) (v)", group=NOISE, advanced=True)
    masked_loss: bool = opt(False, "weight the loss by a mask: conditioning_data_dir's images (red channel) or the alpha channel "
                                   "(alpha_mask)", group=NOISE, advanced=True)
    zero_terminal_snr: bool = opt(False, "rescale the noise schedule so the last timestep is pure noise (SNR 0, Lin et al. 2023): "
                                         "lets a v-prediction model learn very dark or bright images", group=NOISE, advanced=True)
    min_timestep: int = opt(0, "lowest timestep sampled", ge=0, le=999, group=NOISE, advanced=True)
    max_timestep: int = opt(1000, "highest timestep sampled (exclusive)", ge=1, le=1000, group=NOISE, advanced=True)

    def problems(self) -> list[Problem]:
        if self.min_timestep >= self.max_timestep:
            return [("min_timestep", f"min_timestep {self.min_timestep} must be below max_timestep {self.max_timestep}")]
        return []

    def requirements(self) -> list[Problem]:
        return []
