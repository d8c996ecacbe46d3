"""Pure diffusion maths for Video LDM: schedules, parametrisations, losses, samplers.

Nothing here knows about a network: models enter as functions model_fn(x_t, t) -> output
on channels-last latents (B, ...), so images (B, H, W, C) and videos (B, F, H, W, C)
share every line.
"""

from videoldm_jax.diffusion.losses import (denoising_loss, diffusion_loss, make_loss_fn,
                                           min_snr_weight, sample_timesteps)
from videoldm_jax.diffusion.parametrization import (PREDICTION_TYPES, target, to_eps, to_v,
                                                    to_x0)
from videoldm_jax.diffusion.samplers import (DPMSolverState, classifier_free_guidance,
                                             ddim_step, ddpm_step, dpm_solver_timesteps,
                                             dpmpp_2m_init, dpmpp_2m_step, guided_denoise_fn,
                                             inference_timesteps, sample)
from videoldm_jax.diffusion.schedules import (NoiseSchedule, SamplingConfig, alpha_sigma,
                                              alphas_cumprod_at, make_schedule, q_sample,
                                              rescale_zero_terminal_snr,
                                              schedule_from_betas,
                                              schedule_from_diffusers_config, snr)
