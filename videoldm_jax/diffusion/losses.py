"""The denoising objective of Video LDM (Blattmann et al. 2023, eq. 2):

  E_{x0, tau, eps} [ w(tau) || y - f_theta(alpha_tau x0 + sigma_tau eps; c, tau) ||^2 ]

with tau ~ U{0, ..., T-1}, eps ~ N(0, I), y the target of the chosen parametrisation
(eps, v or x0) and w an optional min-SNR-gamma weight. Conditioning c is closed over by
the model function, so one loss serves the image model, the temporal layers and the
upsamplers alike.
"""

from typing import Callable

import jax
import jax.numpy as jnp

from videoldm_jax.diffusion import parametrization as param
from videoldm_jax.diffusion.schedules import (NoiseSchedule, alpha_sigma, gaussian_noise,
                                              per_example, q_sample, snr)

ModelFn = Callable[[jax.Array, jax.Array], jax.Array]


def sample_timesteps(key: jax.Array, batch: int, schedule: NoiseSchedule) -> jax.Array:
  """Uniform integer timesteps (batch,) int32 in [0, num_train_timesteps)."""
  return jax.random.randint(key, (batch,), 0, schedule.num_train_timesteps, dtype=jnp.int32)


def min_snr_weight(snr_t: jax.Array, prediction_type: str, gamma: float) -> jax.Array:
  """Min-SNR-gamma loss weight (Hang et al. 2023) per example; snr_t (B,) -> (B,).

  The weight is chosen so that every parametrisation optimises min(snr, gamma) times the
  x0-error. With x_t = alpha x0 + sigma eps and alpha^2 + sigma^2 = 1:
    eps-pred: x0 - x0_hat = -(sigma/alpha)(eps - eps_hat), so |eps err|^2 = snr |x0 err|^2
              and the weight is min(snr, gamma) / snr;
    v-pred:   x0 = alpha x_t - sigma v, so |x0 err|^2 = sigma^2 |v err|^2 and
              1/sigma^2 = (alpha^2 + sigma^2)/sigma^2 = snr + 1: weight min(snr, gamma)/(snr+1);
    x0-pred:  weight min(snr, gamma).
  """
  param.check_prediction_type(prediction_type)
  if not gamma > 0:  # 0 zeroes every weight, a negative one climbs the loss
    raise ValueError(f"min_snr_gamma={gamma}: expected > 0")
  if prediction_type == "epsilon":
    # min(1, gamma/snr) == min(snr, gamma)/snr, but stays finite (= 1) where snr = 0
    # (the last step of a zero-terminal-SNR schedule).
    return jnp.minimum(1.0, gamma / snr_t)
  clipped = jnp.minimum(snr_t, gamma)
  if prediction_type == "v_prediction":
    return clipped / (snr_t + 1.0)
  return clipped


def diffusion_loss(pred: jax.Array, target: jax.Array, t: jax.Array, schedule: NoiseSchedule,
                   prediction_type: str, min_snr_gamma: float | None = None) -> jax.Array:
  """Per-example (optionally min-SNR-weighted) mean squared error.

  pred, target: (B, ...) of any trailing shape; t: (B,) int. Returns (B,) float32, the
  mean over all non-batch dims, so frame count or latent size does not rescale the loss.
  """
  err = jnp.square(pred.astype(jnp.float32) - target.astype(jnp.float32))
  loss = jnp.mean(err.reshape(err.shape[0], -1), axis=1)
  if min_snr_gamma is not None:
    loss = loss * min_snr_weight(snr(schedule, t), prediction_type, min_snr_gamma)
  return loss


def denoising_loss(model_fn: ModelFn, x0: jax.Array, key: jax.Array, schedule: NoiseSchedule,
                   prediction_type: str = "epsilon",
                   min_snr_gamma: float | None = None) -> jax.Array:
  """Draws tau and eps, noises x0 (B, ...) and scores model_fn(x_t (B, ...), tau (B,))
  -> prediction (B, ...) against the parametrisation's target. Returns (B,) losses."""
  t_key, n_key = jax.random.split(key)
  t = sample_timesteps(t_key, x0.shape[0], schedule)
  noise = gaussian_noise(n_key, x0.shape, x0.dtype)
  x_t = q_sample(schedule, x0, t, noise)
  alpha, sigma = alpha_sigma(schedule, t)
  y = param.target(prediction_type, x0, noise, per_example(alpha, x0), per_example(sigma, x0))
  return diffusion_loss(model_fn(x_t, t), y, t, schedule, prediction_type, min_snr_gamma)


def make_loss_fn(schedule: NoiseSchedule, prediction_type: str = "epsilon",
                 min_snr_gamma: float | None = None
                 ) -> Callable[[ModelFn, jax.Array, jax.Array], jax.Array]:
  """Binds the schedule and objective, giving loss_fn(model_fn, x0 (B, ...), key) ->
  scalar mean loss, the shape a generic train step differentiates."""
  param.check_prediction_type(prediction_type)

  def loss_fn(model_fn: ModelFn, x0: jax.Array, key: jax.Array) -> jax.Array:
    return jnp.mean(denoising_loss(model_fn, x0, key, schedule, prediction_type, min_snr_gamma))

  return loss_fn
