"""Reverse-process samplers: timestep grids, single steps and a sampling loop.

Every step is a pure function of (schedule, model output, t, t_next, x_t) on channels-last
latents x (B, ...). Timesteps t are integers, either a scalar shared by the batch or (B,);
t_next < 0 means "after the last step", where abar = final_alpha_cumprod (1.0 lands on the
data itself). The grids reproduce diffusers' `set_timesteps` so that checkpoints trained
with it are sampled at the same timesteps.
"""

from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from videoldm_jax.diffusion import parametrization as param
from videoldm_jax.diffusion.schedules import (NoiseSchedule, alphas_cumprod_at, gaussian_noise,
                                              per_example)

SAMPLERS = ("ddim", "ddpm", "dpmpp_2m")
DenoiseFn = Callable[[jax.Array, jax.Array], jax.Array]


# --- timestep grids ------------------------------------------------------------------

def inference_timesteps(num_train: int, num_steps: int, spacing: str = "leading",
                        steps_offset: int = 0) -> np.ndarray:
  """Descending int64 timesteps (num_steps,) of DDIMScheduler / DDPMScheduler.set_timesteps.

  'leading': multiples of num_train // num_steps from 0, plus steps_offset;
  'trailing': round(num_train - k * num_train / num_steps) - 1, so the grid starts at T-1;
  'linspace': round(linspace(0, num_train - 1, num_steps)). (Lin et al. 2024, Table 2.)
  """
  if not 0 < num_steps <= num_train:
    raise ValueError(f"num_steps must be in [1, {num_train}], got {num_steps}")
  if spacing == "leading":
    ts = np.arange(num_steps) * (num_train // num_steps) + steps_offset
  elif spacing == "trailing":
    # diffusers' grid, whose float step gives num_steps + 1 values for 62 step counts
    # of 1000 (61, 103, ...; the last one -1): its first num_steps are the grid.
    ts = np.round(np.arange(num_train, 0, -num_train / num_steps)[:num_steps]) - 1
  elif spacing == "linspace":
    ts = np.round(np.linspace(0, num_train - 1, num_steps))
  else:
    raise ValueError(f"spacing must be 'leading', 'trailing' or 'linspace', got {spacing!r}")
  return np.sort(ts.astype(np.int64))[::-1].copy()


def dpm_solver_timesteps(num_train: int, num_steps: int, spacing: str = "linspace",
                         steps_offset: int = 0) -> np.ndarray:
  """Descending int64 timesteps (num_steps,) of DPMSolverMultistepScheduler.set_timesteps.

  Unlike the DDIM grids, 'linspace' and 'leading' split [0, T) into num_steps + 1 points
  and drop t = 0, whose model evaluation the solver never needs ('trailing' is as DDIM).
  """
  if not 0 < num_steps <= num_train:
    raise ValueError(f"num_steps must be in [1, {num_train}], got {num_steps}")
  if spacing == "linspace":
    ts = np.round(np.linspace(0, num_train - 1, num_steps + 1))[1:]
  elif spacing == "leading":
    ts = np.arange(1, num_steps + 1) * (num_train // (num_steps + 1)) + steps_offset
  elif spacing == "trailing":
    return inference_timesteps(num_train, num_steps, "trailing")
  else:
    raise ValueError(f"spacing must be 'leading', 'trailing' or 'linspace', got {spacing!r}")
  return np.sort(ts.astype(np.int64))[::-1].copy()


# --- single steps --------------------------------------------------------------------

def _alpha_sigma_abar(schedule, t, x, final_alpha_cumprod):
  abar = per_example(alphas_cumprod_at(schedule, t, final_alpha_cumprod), x)
  return jnp.sqrt(abar), jnp.sqrt(1.0 - abar), abar


def _predict(model_output, x_t, alpha, sigma, prediction_type, clip_sample):
  x0 = param.to_x0(model_output, x_t, alpha, sigma, prediction_type)
  # eps is taken before clipping, as DDIM does: clipping repairs x0, not the direction.
  eps = param.to_eps(model_output, x_t, alpha, sigma, prediction_type)
  if clip_sample is not None:
    x0 = jnp.clip(x0, -clip_sample, clip_sample)
  return x0, eps


def _step_noise(key, noise, x):
  if noise is not None:
    return noise
  if key is None:
    raise ValueError("a stochastic step needs `key` or `noise`")
  return gaussian_noise(key, x.shape, x.dtype)


def ddim_step(schedule: NoiseSchedule, model_output: jax.Array, t, t_prev, x_t: jax.Array,
              prediction_type: str = "epsilon", eta: float = 0.0, key: jax.Array | None = None,
              final_alpha_cumprod=1.0, clip_sample: float | None = None,
              noise: jax.Array | None = None) -> jax.Array:
  """One DDIM step (Song et al. 2021, eq. 12) from x_t to x_{t_prev}; arrays (B, ...).

  eta (a Python float) = 0 is the deterministic sampler, eta = 1 the DDPM-like one; its
  noise is drawn from `key` unless `noise` (B, ...) is given.
  """
  alpha, sigma, abar = _alpha_sigma_abar(schedule, t, x_t, 1.0)
  _, _, abar_prev = _alpha_sigma_abar(schedule, t_prev, x_t, final_alpha_cumprod)
  x0, eps = _predict(model_output, x_t, alpha, sigma, prediction_type, clip_sample)
  if eta == 0.0:
    return jnp.sqrt(abar_prev) * x0 + jnp.sqrt(1.0 - abar_prev) * eps
  # sigma_eta^2 = eta^2 (1 - abar_prev) / (1 - abar_t) (1 - abar_t / abar_prev).
  std = eta * jnp.sqrt((1.0 - abar_prev) / (1.0 - abar) * (1.0 - abar / abar_prev))
  # Clamped at 0: with eta = 1 the radicand is 0 up to rounding and could turn NaN.
  direction = jnp.sqrt(jnp.maximum(1.0 - abar_prev - std ** 2, 0.0)) * eps
  return jnp.sqrt(abar_prev) * x0 + direction + std * _step_noise(key, noise, x_t)


def ddpm_step(schedule: NoiseSchedule, model_output: jax.Array, t, t_prev, x_t: jax.Array,
              prediction_type: str = "epsilon", key: jax.Array | None = None,
              final_alpha_cumprod=1.0, clip_sample: float | None = None,
              noise: jax.Array | None = None) -> jax.Array:
  """One ancestral DDPM step: a draw from q(x_{t_prev} | x_t, x0_hat) (Ho et al. 2020,
  eqs. 6-7) with the 'fixed_small' posterior variance; arrays (B, ...).

  With strided t -> t_prev the single-step beta is 1 - abar_t / abar_prev. No noise is
  added at t = 0. Noise comes from `key` unless `noise` (B, ...) is given.
  """
  _, sigma, abar = _alpha_sigma_abar(schedule, t, x_t, 1.0)
  alpha = jnp.sqrt(abar)
  _, _, abar_prev = _alpha_sigma_abar(schedule, t_prev, x_t, final_alpha_cumprod)
  x0, _ = _predict(model_output, x_t, alpha, sigma, prediction_type, clip_sample)
  alpha_step = abar / abar_prev
  beta_step = 1.0 - alpha_step
  mean = (jnp.sqrt(abar_prev) * beta_step / (1.0 - abar)) * x0 + (
      jnp.sqrt(alpha_step) * (1.0 - abar_prev) / (1.0 - abar)) * x_t
  var = (1.0 - abar_prev) / (1.0 - abar) * beta_step
  std = jnp.where(per_example(jnp.asarray(t), x_t) > 0, jnp.sqrt(var), 0.0)
  return mean + std * _step_noise(key, noise, x_t)


class DPMSolverState(NamedTuple):
  """Memory of DPM-Solver++(2M): the data prediction (B, ...) and half-log-SNR lambda
  (scalar, or (B, 1, ..., 1) for per-example t) of the previous model evaluation."""
  x0_prev: jax.Array
  lambda_prev: jax.Array


def dpmpp_2m_init(x_T: jax.Array) -> DPMSolverState:
  """An empty solver memory for latents x_T (B, ...); the first step must be first order."""
  return DPMSolverState(jnp.zeros_like(x_T), jnp.zeros((), jnp.float32))


def _half_log_snr(alpha, sigma):
  return jnp.log(alpha) - jnp.log(sigma)


def dpmpp_2m_step(schedule: NoiseSchedule, model_output: jax.Array, t, t_next, x_t: jax.Array,
                  state: DPMSolverState, prediction_type: str = "epsilon",
                  first_order: bool = False, final_alpha_cumprod=1.0,
                  clip_sample: float | None = None) -> tuple[jax.Array, DPMSolverState]:
  """One step of DPM-Solver++(2M) (Lu et al. 2022, Alg. 2, midpoint form) from x_t to
  x_{t_next}; arrays (B, ...). Returns (x_next, new state).

  With lambda = log(alpha / sigma), h = lambda_next - lambda_t and the data prediction D,
    x_next = (sigma_next / sigma_t) x_t + alpha_next (1 - e^{-h}) D,
  where D = x0_t (first order, i.e. DDIM) or x0_t + (x0_t - x0_prev) / (2 r),
  r = (lambda_t - lambda_prev) / h (second order). `first_order` is static: use it for the
  first step (no memory yet) and for the last one when t_next < 0, where sigma_next = 0
  and h is infinite.
  """
  alpha, sigma, _ = _alpha_sigma_abar(schedule, t, x_t, 1.0)
  alpha_n, sigma_n, _ = _alpha_sigma_abar(schedule, t_next, x_t, final_alpha_cumprod)
  x0, _ = _predict(model_output, x_t, alpha, sigma, prediction_type, clip_sample)
  lam = _half_log_snr(alpha, sigma)
  data = x0
  if not first_order:
    h = _half_log_snr(alpha_n, sigma_n) - lam
    r = (lam - state.lambda_prev) / h
    data = x0 + (x0 - state.x0_prev) / (2.0 * r)
  # alpha_n (1 - e^{-h}) = alpha_n - alpha_t sigma_n / sigma_t: no logarithm of sigma_n,
  # so the final step to sigma_n = 0 returns D exactly.
  ratio = sigma_n / sigma
  x_next = ratio * x_t + (alpha_n - alpha * ratio) * data
  return x_next, DPMSolverState(x0, lam)


# --- guidance ------------------------------------------------------------------------

def classifier_free_guidance(uncond: jax.Array, cond: jax.Array, scale) -> jax.Array:
  """Classifier-free guidance (Ho & Salimans 2022): uncond + scale (cond - uncond), on
  model outputs (B, ...). Written as a lerp so that scale 1 returns `cond` and scale 0
  returns `uncond` bit for bit."""
  return (1.0 - scale) * uncond + scale * cond


def guided_denoise_fn(model_fn: Callable, cond, uncond, scale: float) -> DenoiseFn:
  """Wraps model_fn(x (B, ...), t (B,), c) -> output (B, ...) into denoise_fn(x, t) that
  evaluates the conditional and unconditional branches in ONE forward pass of batch 2B.
  cond / uncond are pytrees of arrays with leading dim B (e.g. text embeddings). With
  scale == 1 the unconditional pass is skipped. Scales below 1 combine the branches
  too (0: the unconditional output), where diffusers' pipelines take the conditional
  output alone for any scale <= 1."""
  if isinstance(scale, (int, float)) and scale == 1.0:
    return lambda x, t: model_fn(x, t, cond)
  both = jax.tree_util.tree_map(lambda c, u: jnp.concatenate([c, u], axis=0), cond, uncond)

  def denoise_fn(x: jax.Array, t: jax.Array) -> jax.Array:
    out = model_fn(jnp.concatenate([x, x], axis=0), jnp.concatenate([t, t], axis=0), both)
    out_cond, out_uncond = jnp.split(out, 2, axis=0)
    return classifier_free_guidance(out_uncond, out_cond, scale)

  return denoise_fn


# --- sampling loop -------------------------------------------------------------------

_ddim_jit = jax.jit(ddim_step, static_argnames=("prediction_type", "eta", "clip_sample"))
_ddpm_jit = jax.jit(ddpm_step, static_argnames=("prediction_type", "clip_sample"))
_dpm_jit = jax.jit(dpmpp_2m_step,
                   static_argnames=("prediction_type", "first_order", "clip_sample"))


def timestep_grid(num_train: int, num_steps: int, sampler: str = "ddim",
                  timestep_spacing: str | None = None, steps_offset: int = 0,
                  timesteps=None, alphas_cumprod=None,
                  prediction_type: str = "epsilon") -> list[int]:
  """The timesteps `sample` visits (`timesteps` itself when given), checked: each in
  [0, num_train) (a gather past the schedule clamps silently), descending; for dpmpp_2m, none
  repeated (a step of h = 0: the next 2nd-order step divides by it); with the schedule's
  `alphas_cumprod` (T,), that an epsilon model's DDIM/DDPM does not start where abar is
  0. ValueError otherwise, so a caller can check a run's step counts before sampling
  anything."""
  if timesteps is None:
    grid = dpm_solver_timesteps if sampler == "dpmpp_2m" else inference_timesteps
    default = "linspace" if sampler == "dpmpp_2m" else "leading"
    timesteps = grid(num_train, num_steps, timestep_spacing or default, steps_offset)
  timesteps = [int(t) for t in timesteps]
  bad = [t for t in timesteps if not 0 <= t < num_train]
  if bad:
    raise ValueError(f"timesteps {bad} lie outside the schedule's [0, {num_train}); lower "
                     "steps_offset or num_steps")
  rising = [(a, b) for a, b in zip(timesteps, timesteps[1:]) if a < b]
  if rising:
    # Each step goes from one entry to the next: an ascending pair runs the process
    # forwards (DDPM's posterior variance goes negative: all NaN).
    raise ValueError(f"timesteps must descend (noisy to clean); {rising[0][0]} is "
                     f"followed by {rising[0][1]}")
  if sampler == "dpmpp_2m" and len(set(timesteps)) != len(timesteps):
    raise ValueError(f"dpmpp_2m: the timestep grid of {len(timesteps)} steps repeats "
                     f"timesteps ({timestep_spacing or 'linspace'} spacing over "
                     f"{num_train}); use fewer steps")
  if (alphas_cumprod is not None and sampler != "dpmpp_2m" and prediction_type == "epsilon"
      and float(alphas_cumprod[timesteps[0]]) == 0.0):
    # x0 = (x_t - sigma eps) / alpha with alpha = 0: NaN from the first step on.
    raise ValueError(f"{sampler}: an epsilon-prediction model cannot start at t = "
                     f"{timesteps[0]}, where the schedule's abar is 0 (zero terminal SNR, "
                     "rescale_betas_zero_snr): use a v_prediction model, dpmpp_2m, or "
                     "'leading' spacing")
  return timesteps


def sample(denoise_fn: DenoiseFn, x_T: jax.Array, schedule: NoiseSchedule, num_steps: int,
           sampler: str = "ddim", prediction_type: str = "epsilon", key: jax.Array | None = None,
           progress: bool = True, eta: float = 0.0, timestep_spacing: str | None = None,
           steps_offset: int = 0, final_alpha_cumprod: float = 1.0,
           clip_sample: float | None = None, timesteps=None) -> jax.Array:
  """Runs the reverse process from x_T (B, ...) and returns x_0 (B, ...).

  denoise_fn(x (B, ...), t (B,) int32) -> model output (B, ...) of `prediction_type`;
  guidance belongs inside it (see `guided_denoise_fn`). The loop runs in Python over
  jitted steps, so the model call is whatever the caller made it (jitted, sharded, ...).
  sampler: 'ddim' (eta for stochasticity), 'ddpm' or 'dpmpp_2m'. key is needed for ddpm
  and ddim with eta > 0. timestep_spacing defaults to diffusers' per-scheduler default
  ('leading' for ddim/ddpm, 'linspace' for dpmpp_2m); `timesteps` overrides the grid.
  Each step goes to the next grid point. (diffusers' DDIMScheduler instead steps to
  t - T // num_steps: the same for 'leading', and for 'trailing' when num_steps divides
  T, up to one timestep off for 'trailing' otherwise, and off the grid for 'linspace',
  whose points are (T - 1) / (num_steps - 1) apart: 999 -> 899 where the grid's next
  point is 888 at 10 steps.)
  The remaining keywords match `schedules.SamplingConfig`'s fields. final_alpha_cumprod
  (diffusers' set_alpha_to_one) is a DDIM setting: DDPM and DPM-Solver always end at
  abar = 1, on x_0 itself, as diffusers' DDPMScheduler and DPM-Solver
  (final_sigmas_type="zero") do, whatever the scheduler config says; clip_sample is
  ignored by DPM-Solver, as by diffusers' DPMSolverMultistepScheduler.
  """
  if sampler not in SAMPLERS:
    raise ValueError(f"sampler must be one of {SAMPLERS}, got {sampler!r}")
  param.check_prediction_type(prediction_type)
  if not eta >= 0:
    raise ValueError(f"eta must be >= 0 (0: deterministic DDIM), got {eta}")
  stochastic = sampler == "ddpm" or (sampler == "ddim" and eta > 0)
  if stochastic and key is None:
    raise ValueError(f"sampler {sampler!r} with eta={eta} needs a PRNG key")
  timesteps = timestep_grid(schedule.num_train_timesteps, num_steps, sampler,
                            timestep_spacing, steps_offset, timesteps,
                            schedule.alphas_cumprod, prediction_type)
  nexts = timesteps[1:] + [-1]
  n = len(timesteps)
  batch = x_T.shape[0]
  if sampler != "ddim":
    final_alpha_cumprod = 1.0
  final = jnp.float32(final_alpha_cumprod)
  if sampler == "dpmpp_2m":
    # A zero-terminal-SNR schedule (rescale_betas_zero_snr) has abar = 0 at T - 1: an
    # infinite log-SNR, which drops the second step's 2nd-order term. diffusers'
    # DPMSolverMultistepScheduler puts 2^-24 there; other schedules keep their value
    # (the cosine schedule's 2.4e-9 is below 2^-24).
    abar = schedule.alphas_cumprod
    schedule = schedule.replace(alphas_cumprod=abar.at[-1].set(
        jnp.where(abar[-1] > 0, abar[-1], 2.0 ** -24)))
    # DPMSolverMultistepScheduler never clips x0, whatever a DDIM config it is built
    # from says (clip_sample is a DDIM / DDPM setting).
    clip_sample = None
  x, state = x_T, dpmpp_2m_init(x_T)
  for i in tqdm(range(n), desc=sampler, disable=not progress):
    t, t_next = jnp.int32(timesteps[i]), jnp.int32(nexts[i])
    out = denoise_fn(x, jnp.full((batch,), timesteps[i], jnp.int32))
    step_key = jax.random.fold_in(key, i) if stochastic else None
    if sampler == "ddim":
      x = _ddim_jit(schedule, out, t, t_next, x, prediction_type=prediction_type, eta=eta,
                    key=step_key, final_alpha_cumprod=final, clip_sample=clip_sample)
    elif sampler == "ddpm":
      x = _ddpm_jit(schedule, out, t, t_next, x, prediction_type=prediction_type,
                    key=step_key, final_alpha_cumprod=final, clip_sample=clip_sample)
    else:
      # As diffusers' lower_order_final: the last step, which ends at sigma = 0 (where
      # the 2nd-order ratio r is 0), is first order.
      last_first_order = i == n - 1
      x, state = _dpm_jit(schedule, out, t, t_next, x, state, prediction_type=prediction_type,
                          first_order=(i == 0 or last_first_order),
                          final_alpha_cumprod=final, clip_sample=clip_sample)
  return x
