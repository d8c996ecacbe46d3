"""Discrete-time variance-preserving noise schedules.

The forward process is q(x_t | x_0) = N(alpha_t x_0, sigma_t^2 I) with
alpha_t = sqrt(abar_t), sigma_t = sqrt(1 - abar_t), abar_t = prod_{s<=t} (1 - beta_s)
and integer t in [0, num_train_timesteps). Latents are channels-last of any shape
(B, ...); every per-example quantity is (B,) and is broadcast over the trailing dims.
"""

import dataclasses
import json
import math
import numbers
import os
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from videoldm_jax.diffusion.parametrization import PREDICTION_TYPES

SCHEDULE_KINDS = ("scaled_linear", "linear", "cosine")
TIMESTEP_SPACINGS = ("leading", "trailing", "linspace")


@struct.dataclass
class NoiseSchedule:
  """A discrete schedule as a pytree: `betas` and `alphas_cumprod` are float32 (T,)
  leaves, so jitted code that takes a schedule never recompiles when it changes."""
  betas: jax.Array
  alphas_cumprod: jax.Array
  num_train_timesteps: int = struct.field(pytree_node=False)


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
  """Inference-time settings read from a scheduler config; field names match the
  keyword arguments of `samplers.sample`, so `sample(..., **dataclasses.asdict(cfg))`.

  final_alpha_cumprod: abar used after the last step (1.0 lands exactly on x_0).
  clip_sample: clip predicted x_0 to [-c, c], or None for no clipping.
  timestep_spacing: None when the config does not set it: each sampler then takes its
    diffusers default ('leading' for DDIM/DDPM, 'linspace' for DPM-Solver), as
    diffusers' `from_config` does when switching schedulers.
  """
  prediction_type: str = "epsilon"
  timestep_spacing: str | None = None
  steps_offset: int = 0
  final_alpha_cumprod: float = 1.0
  clip_sample: float | None = None


def check_betas(betas: np.ndarray, what: str) -> np.ndarray:
  """Returns `betas` (T,) if each lies in [0, 1) (1 only last: zero terminal SNR);
  raises ValueError naming `what`, the first bad values and their steps otherwise."""
  if betas.ndim != 1 or betas.size == 0:
    raise ValueError(f"{what}: expected a non-empty 1-D array, got shape {betas.shape}")
  bad = ~np.isfinite(betas) | (betas < 0) | (betas > 1)
  bad[:-1] |= betas[:-1] >= 1
  if bad.any():
    i = np.flatnonzero(bad)
    raise ValueError(f"{what}: every beta must lie in [0, 1) (1 only at the last step), "
                     f"got {betas[i[:3]].tolist()} at steps {i[:3].tolist()}")
  return betas


def schedule_from_betas(betas, what: str = "betas") -> NoiseSchedule:
  """Builds a schedule from betas (T,). The betas are rounded to float32 first, so abar
  is exactly the schedule the stored betas describe; its cumulative product is then taken
  in float64 and rounded once, so abar carries no accumulated float32 error. Betas
  outside [0, 1) (1 only last: zero terminal SNR) or NaN raise ValueError naming `what`:
  their abar is negative or NaN, and training would skip every step as non-finite."""
  b32 = check_betas(np.asarray(betas, np.float32), what)
  abar = np.cumprod(1.0 - b32.astype(np.float64))
  return NoiseSchedule(betas=jnp.asarray(b32),
                       alphas_cumprod=jnp.asarray(abar, jnp.float32),
                       num_train_timesteps=int(b32.shape[0]))


def _cosine_betas(num_train_timesteps: int, max_beta: float = 0.999) -> np.ndarray:
  # Nichol & Dhariwal 2021 ("squaredcos_cap_v2"): abar(s) = cos^2((s + 0.008) / 1.008 * pi/2),
  # beta_i = 1 - abar((i+1)/T) / abar(i/T), capped because the last ratio tends to 0.
  def abar(s):
    return math.cos((s + 0.008) / 1.008 * math.pi / 2) ** 2
  n = num_train_timesteps
  return np.array([min(1.0 - abar((i + 1) / n) / abar(i / n), max_beta) for i in range(n)])


def make_schedule(kind: str, num_train_timesteps: int = 1000, beta_start: float = 0.00085,
                  beta_end: float = 0.012, rescale_zero_snr: bool = False) -> NoiseSchedule:
  """Returns the schedule `kind` with T = num_train_timesteps (betas, abar: (T,)).

  kind: 'scaled_linear' (Stable Diffusion / Video LDM: beta = linspace(sqrt b0, sqrt b1)^2),
  'linear' (DDPM: beta = linspace(b0, b1)), 'cosine' (squaredcos_cap_v2, betas capped at
  0.999; beta_start / beta_end are ignored).
  """
  if not (isinstance(num_train_timesteps, (int, np.integer)) and num_train_timesteps >= 1):
    raise ValueError(f"num_train_timesteps={num_train_timesteps!r}: expected an integer "
                     ">= 1")
  # Everything is float64 until schedule_from_betas rounds once: torch builds the same
  # betas in float32 and differs from these by < 1e-8.
  if kind == "scaled_linear":
    betas = np.linspace(beta_start ** 0.5, beta_end ** 0.5, num_train_timesteps) ** 2
  elif kind == "linear":
    betas = np.linspace(beta_start, beta_end, num_train_timesteps)
  elif kind == "cosine":
    betas = _cosine_betas(num_train_timesteps)
  else:
    raise ValueError(f"kind must be one of {SCHEDULE_KINDS}, got {kind!r}")
  what = f"a {kind} schedule from beta_start={beta_start}, beta_end={beta_end}"
  if rescale_zero_snr:  # (checked first: the rescale turns bad betas into NaN or others)
    betas = rescale_zero_terminal_snr(check_betas(betas, what))
  return schedule_from_betas(betas, what)


def rescale_zero_terminal_snr(betas) -> np.ndarray:
  """Lin et al. 2024, Alg. 1: shifts and scales sqrt(abar) (T,) so abar_{T-1} = 0
  while abar_0 is unchanged; returns the new betas (T,) (the last one is 1)."""
  if len(betas) < 2:  # (abar_0 = abar_{T-1}: 0 / 0)
    raise ValueError(f"rescale_betas_zero_snr needs at least 2 timesteps, got {len(betas)}")
  sqrt_abar = np.sqrt(np.cumprod(1.0 - np.asarray(betas, np.float64)))
  first, last = sqrt_abar[0], sqrt_abar[-1]
  sqrt_abar = (sqrt_abar - last) * first / (first - last)
  abar = sqrt_abar ** 2
  alphas = np.concatenate([abar[:1], abar[1:] / abar[:-1]])
  return 1.0 - alphas


def per_example(v, x: jax.Array) -> jax.Array:
  """Reshapes a per-example coefficient (B,) to (B, 1, ..., 1) so that it scales every
  trailing dim of x (B, ...); a scalar stays a scalar."""
  v = jnp.asarray(v)
  if v.ndim == 0:
    return v
  return v.reshape(v.shape + (1,) * (x.ndim - v.ndim))


def alpha_sigma(schedule: NoiseSchedule, t) -> tuple[jax.Array, jax.Array]:
  """(sqrt(abar_t), sqrt(1 - abar_t)) for integer t of shape (B,) or (); t in [0, T)."""
  abar = schedule.alphas_cumprod[jnp.asarray(t)]
  return jnp.sqrt(abar), jnp.sqrt(1.0 - abar)


def alphas_cumprod_at(schedule: NoiseSchedule, t, final_alpha_cumprod=1.0) -> jax.Array:
  """abar_t for integer t of shape (B,) or (), where t < 0 means 'after the last
  step' and gives final_alpha_cumprod (a plain index would wrap to abar_{T-1})."""
  t = jnp.asarray(t)
  abar = schedule.alphas_cumprod[jnp.maximum(t, 0)]
  return jnp.where(t >= 0, abar, jnp.asarray(final_alpha_cumprod, abar.dtype))


def snr(schedule: NoiseSchedule, t) -> jax.Array:
  """Signal-to-noise ratio alpha_t^2 / sigma_t^2 = abar / (1 - abar); t (B,) or ()."""
  abar = schedule.alphas_cumprod[jnp.asarray(t)]
  return abar / (1.0 - abar)


def gaussian_noise(key: jax.Array, shape: tuple[int, ...], dtype=jnp.float32) -> jax.Array:
  """Standard normal noise of `shape` (drawn in float32, then cast to dtype)."""
  # Drawn flat and reshaped: with partitionable threefry the values are identical to a
  # shaped draw, but XLA:CPU compiles the rank-1 kernel several times faster than a
  # rank-5 (B, F, H, W, C) one.
  flat = jax.random.normal(key, (math.prod(shape),), jnp.float32)
  return flat.reshape(shape).astype(dtype)


def q_sample(schedule: NoiseSchedule, x0: jax.Array, t, noise: jax.Array) -> jax.Array:
  """Draws x_t = alpha_t x0 + sigma_t noise; x0, noise (B, ...), t (B,) -> (B, ...)."""
  alpha, sigma = alpha_sigma(schedule, t)
  return per_example(alpha, x0) * x0 + per_example(sigma, x0) * noise


# --- diffusers scheduler_config.json -------------------------------------------------

_BETA_SCHEDULES = {"scaled_linear": "scaled_linear", "linear": "linear",
                   "squaredcos_cap_v2": "cosine"}
# Keys whose only supported value is the one given; anything else changes the maths.
_REQUIRED_VALUES = {
    "thresholding": False, "use_karras_sigmas": False, "use_exponential_sigmas": False,
    "use_beta_sigmas": False, "use_lu_lambdas": False, "use_flow_sigmas": False,
    "variance_type": ("fixed_small", None), "algorithm_type": ("dpmsolver++",),
    "solver_type": ("midpoint",), "solver_order": (2,), "final_sigmas_type": ("zero",),
    "euler_at_final": False,
    # DPM-Solver cuts the top of its grid where the half-log-SNR falls below this (the
    # cosine schedule's -5.1): another grid than ours. JSON's -Infinity is the default.
    "lambda_min_clipped": (float("-inf"),),
}


# Keys of schedulers whose noise process is not a discrete beta schedule: the
# continuous-sigma (EDM, consistency) and flow-matching families, and Euler with
# continuous timesteps (the UNet takes 0.25 log sigma, not t). Their configs have no
# beta_schedule, so they read as linear betas and sampled noise, silently.
_OTHER_PROCESSES = {
    "sigma_data": "a continuous-sigma (EDM) scheduler", "shift": "a flow-matching scheduler",
    "use_dynamic_shifting": "a flow-matching scheduler",
    "timestep_type": "continuous timesteps (the UNet takes 0.25 log sigma)",
}


def _check(cfg: Mapping[str, Any], field: str, allowed) -> None:
  if field not in cfg:
    return
  allowed = allowed if isinstance(allowed, tuple) else (allowed,)
  if cfg[field] not in allowed:
    raise ValueError(f"unsupported scheduler config: {field}={cfg[field]!r} "
                     f"(supported: {list(allowed)})")


def schedule_from_diffusers_config(config: Mapping[str, Any] | str | os.PathLike
                                   ) -> tuple[NoiseSchedule, SamplingConfig]:
  """Reads a diffusers scheduler_config.json (a dict or a path to the file) into our
  schedule and sampling settings. Missing keys take DDIMScheduler's defaults, except
  clip_sample (off); keys that do not affect the maths are ignored; unsupported values
  raise ValueError naming the field (e.g. thresholding, Karras sigmas, learned variance)."""
  if not isinstance(config, Mapping):
    with open(config) as f:
      config = json.load(f)
  cfg = dict(config)
  for field, allowed in _REQUIRED_VALUES.items():
    _check(cfg, field, allowed)
  for field, what in _OTHER_PROCESSES.items():
    # (False / None: DPM-Solver's flow switch off; "discrete": Euler's own default.)
    if cfg.get(field) not in (None, False, "discrete"):
      raise ValueError(f"unsupported scheduler config: {field}={cfg[field]!r}: {what}, not "
                       "a discrete-time beta schedule (DDPM / DDIM / DPM-Solver)")
  _check(cfg, "beta_schedule", tuple(_BETA_SCHEDULES))
  _check(cfg, "prediction_type", PREDICTION_TYPES)
  _check(cfg, "timestep_spacing", TIMESTEP_SPACINGS)

  n = cfg.get("num_train_timesteps", 1000)
  if isinstance(n, bool) or not float(n).is_integer():  # (int() cut 1000.5 to 1000)
    raise ValueError(f"unsupported scheduler config: num_train_timesteps={n!r}, expected a "
                     "whole number")
  n = int(n)
  if cfg.get("trained_betas") is not None:
    betas = np.asarray(cfg["trained_betas"], np.float32)
    if betas.shape != (n,):
      raise ValueError(f"unsupported scheduler config: trained_betas has shape {betas.shape}, "
                       f"num_train_timesteps={n}")
    what = "scheduler config trained_betas"
    if cfg.get("rescale_betas_zero_snr", False):  # (checked as written, not rescaled)
      betas = rescale_zero_terminal_snr(check_betas(betas, what))
    schedule = schedule_from_betas(betas, what)
  else:
    schedule = make_schedule(_BETA_SCHEDULES[cfg.get("beta_schedule", "linear")], n,
                             float(cfg.get("beta_start", 0.0001)),
                             float(cfg.get("beta_end", 0.02)),
                             rescale_zero_snr=bool(cfg.get("rescale_betas_zero_snr", False)))
  set_alpha_to_one = bool(cfg.get("set_alpha_to_one", True))
  # Absent means off: DPM-Solver configs have no such key and never clip.
  clip = bool(cfg.get("clip_sample", False))
  clip_range = cfg.get("clip_sample_range", 1.0)
  # (Any real number: a NumPy float32 or integer was refused as "not a finite number".)
  if clip and not (isinstance(clip_range, numbers.Real) and not isinstance(clip_range, bool)
                   and math.isfinite(clip_range) and clip_range > 0):
    # (0 or below collapsed every DDIM / DDPM sample to 0 or -1; NaN made it NaN)
    raise ValueError(f"unsupported scheduler config: clip_sample_range={clip_range!r}, "
                     "expected a finite number > 0")
  offset = cfg.get("steps_offset", 0)
  # (int() cut 1.5 to 1, and took "1" or true: another grid than the file says)
  if isinstance(offset, bool) or not (isinstance(offset, numbers.Real)
                                      and float(offset).is_integer() and offset >= 0):
    raise ValueError(f"unsupported scheduler config: steps_offset={offset!r}, expected a "
                     "whole number >= 0")
  sampling = SamplingConfig(
      prediction_type=cfg.get("prediction_type", "epsilon"),
      timestep_spacing=cfg.get("timestep_spacing"),
      steps_offset=int(offset),
      final_alpha_cumprod=1.0 if set_alpha_to_one else float(schedule.alphas_cumprod[0]),
      clip_sample=float(clip_range) if clip else None)
  return schedule, sampling
