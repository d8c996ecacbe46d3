"""Low-resolution video -> `scale`x higher resolution with a trained upsampler.

The UNet is fully convolutional in space (and its temporal layers in time), so a
model trained on small patches of short clips runs here on whole frames of any size
that is a multiple of `UpsamplerConfig.size_multiple` and on any number of frames.
All frames of a video are denoised jointly, which is what makes a temporally aligned
upsampler (the temporal layers) consistent over time (Video LDM, Sec. 3.4).
"""

import dataclasses
import functools
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from videoldm_jax import upsampler_model as um
from videoldm_jax.diffusion import samplers
from videoldm_jax.diffusion.schedules import gaussian_noise, q_sample
from videoldm_jax.pipelines import sampling as sampling_lib
from videoldm_jax.upsampler_model import PretrainedUpsampler, UpsamplerConfig


@functools.lru_cache(maxsize=8)
def _jitted(config: UpsamplerConfig):
  """Jitted (UNet, conditioning, decode) functions of one model config: the training
  loop samples repeatedly, and this keeps one compilation per input shape. (The
  schedules are not part of the config's hash, so they are passed as arguments.)"""
  unet = config.unet_module()

  def denoise(params, x_t, cond, t, labels):
    return unet.apply({"params": params}, um.model_input(x_t, cond), t, None, labels)

  def cond_fn(aug_schedule, vae_params, lowres, level, noise):
    # Noised at low resolution, then upsampled (and encoded), as in training.
    return um.conditioning(config, vae_params, q_sample(aug_schedule, lowres, level, noise))

  decode = lambda vae_params, z: um.decode(config.vae, vae_params, z)
  return jax.jit(denoise), jax.jit(cond_fn), jax.jit(decode)


def _noise(key: jax.Array, shape: tuple, first_frame: Optional[int]) -> jax.Array:
  """Standard normal (B, T, ...): for the clip as a whole, or frame by frame from
  fold_in(key, first_frame + t) (see `upsample`)."""
  if first_frame is None:
    return gaussian_noise(key, shape)
  frames = jnp.arange(shape[1]) + first_frame
  per_frame = jax.vmap(lambda i: gaussian_noise(jax.random.fold_in(key, i),
                                                (shape[0],) + shape[2:]))(frames)
  return jnp.swapaxes(per_frame, 0, 1)


def upsample(model: UpsamplerConfig, params: dict, lowres: jax.Array | np.ndarray,
             noise_level: Optional[int] = None, steps: int = 50, sampler: str = "ddim",
             seed: int = 0, eta: float = 0.0, progress: bool = False,
             first_frame: Optional[int] = None) -> jax.Array:
  """Upsamples videos: lowres (B, T, h, w, 3) uint8 or float in [-1, 1] ->
  float32 (B, T, scale h, scale w, 3) in about [-1, 1] (`sampling.to_uint8` for bytes).

  params: {'unet'[, 'vae']} (e.g. `upsampler_model.load(dir).params`).
  noise_level: the augmentation level s of the conditioning (same for every frame and
    video); None takes the model's default. Higher levels let the model invent more
    detail and ignore more of the input's artefacts.
  steps / sampler / eta: the reverse process (`diffusion.samplers.sample`).
  seed: drives the initial noise, the augmentation noise and stochastic samplers.
  first_frame: the index of lowres's first frame in a longer video upsampled in
    overlapping chunks. The initial and augmentation noise of each frame are then drawn
    from (seed, its index in the video), so a frame gets the same noise in every chunk
    that holds it. None: drawn for the clip as a whole. (DDPM's and eta > 0's step
    noise is drawn per call, from the call's first frame: chunks do not repeat it.)
  """
  model.validate()
  lowres = jnp.asarray(lowres)
  if lowres.ndim != 5 or lowres.shape[-1] != 3:
    raise ValueError(f"lowres must be (B, T, h, w, 3), got {lowres.shape}")
  b, t, h, w, _ = lowres.shape
  s = model.scale
  m = model.size_multiple
  if (h * s) % m or (w * s) % m:
    raise ValueError(f"output size {h * s}x{w * s} must be a multiple of {m} for this "
                     f"model (low-res {h}x{w}, scale {s})")
  level = model.noise_level if noise_level is None else int(noise_level)
  if not 0 <= level < model.max_noise_level:
    raise ValueError(f"noise_level must be in [0, max_noise_level={model.max_noise_level}) "
                     f"(the levels the model was trained on), got {level}")
  denoise, cond_fn, decode = _jitted(model)
  schedule, sampling, aug_schedule = model.schedules()
  key = jax.random.key(seed)
  if model.space == "latent" and params.get("vae") is None:
    # (It failed inside Flax: "The first argument passed to an apply function ...".)
    raise ValueError("a latent-space upsampler needs its VAE: params['vae'] is missing "
                     "(upsampler_model.load reads it from the export)")
  # (On the device once, not copied again by each denoising step's call.)
  vae_params = None if params.get("vae") is None else sampling_lib.on_device(params["vae"])
  f = model.vae_factor
  shape = (b, t, h * s // f, w * s // f, model.channels)
  levels = jnp.full((b,), level, jnp.int32)
  # One fixed level for every frame and video, as in training (per video there).
  # Clipped: decoded frames overshoot [-1, 1] a little; training inputs never do.
  cond = cond_fn(aug_schedule, vae_params, jnp.clip(um.to_float(lowres), -1.0, 1.0), levels,
                 _noise(jax.random.fold_in(key, 1), lowres.shape, first_frame))
  x_T = _noise(jax.random.fold_in(key, 0), shape, first_frame)
  unet_params = sampling_lib.on_device(params["unet"])
  denoise_fn = lambda x, tt: denoise(unet_params, x, cond, tt, levels)
  # Every setting the scheduler config gives (as the key-frame and context samplers).
  kw = dataclasses.asdict(sampling)
  step_key = (jax.random.fold_in(key, 2) if first_frame is None
              else jax.random.fold_in(jax.random.fold_in(key, 3), first_frame))
  x0 = samplers.sample(denoise_fn, x_T, schedule, steps, sampler=sampler, key=step_key,
                       progress=progress, eta=eta, **kw)
  if model.space == "latent":
    x0 = decode(vae_params, x0)
  return jnp.clip(x0, -1.0, 1.0)


def upsample_pretrained(model: PretrainedUpsampler, lowres, **kwargs) -> jax.Array:
  """`upsample` with the config and parameters of a loaded folder."""
  return upsample(model.config, model.params, lowres, **kwargs)
