"""Upsampler stage (Video LDM Sec. 3.4): a `scale`x super-resolution diffusion model on
video, conditioned on the noise-augmented low-resolution clip, with temporal layers.

Each step, for a batch of clips `video` uint8 (B, T, H, W, 3):
  1. low-res clip = `scale`x area-downsampling of the clip;
  2. it is noised with q(x_s | x) of the augmentation schedule at a level s drawn
     uniformly in [0, max_noise_level), ONE s per video, shared by its frames; s is
     the UNet's class label. As in SD's x4 upscaler, the noise is drawn per low-res
     pixel (noise drawn after upsampling would be independent within each scale x
     scale block, and the model could average it away);
  3. conditioning c = the noised clip upsampled back to H x W (nearest or bilinear),
     i.e. exactly what full-frame sampling sees; one random patch_size x patch_size
     window per video (the same for all its frames, offsets on the low-res grid) is
     cut from the clip and from c: training runs on patches, sampling on full frames
     with the same weights (the UNet is fully convolutional);
  4. latent space only: both go through the frozen VAE (x0 a posterior sample, c the
     mean). The patch is encoded alone, so near its edges the encoder sees less
     surround than it does encoding the whole frame at sampling (in pixel space the
     cond is exactly the sampled one's);
  5. the usual denoising loss on x0 with tau per video, v-prediction by default.

mode 'full' trains the whole UNet, mode 'temporal' only phi with theta taken from an
image upsampler folder (`config.image_upsampler`, e.g. the export of this stage run
with `temporal_layers=False`). At toy scale there is no pretrained image upsampler,
so configs/upsampler_tiny.py trains everything from a random init.
"""

from pathlib import Path
from typing import Callable, Optional

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import traverse_util

from videoldm_jax import pretrained
from videoldm_jax import upsampler_model as um
from videoldm_jax.data import inputs, procedural
from videoldm_jax.diffusion.losses import denoising_loss
from videoldm_jax.diffusion.schedules import NoiseSchedule, gaussian_noise, q_sample
from videoldm_jax.models import params as params_lib
from videoldm_jax.models import partition
from videoldm_jax.models import vae as vae_lib
from videoldm_jax.models.temporal import TemporalConfig
from videoldm_jax.models.vae import AutoencoderKL, VAEConfig
from videoldm_jax.pipelines import upsampling
from videoldm_jax.pipelines.sampling import to_uint8
from videoldm_jax.stages import base
from videoldm_jax.stages.base import StageSetup, init_where
from videoldm_jax.train.state import merge
from videoldm_jax.stages.keyframe import is_trainable_fn
from videoldm_jax.train import optim
from videoldm_jax.train.step import Stage
from videoldm_jax.video_ldm import dtype_named

# Sample clips are procedural clips from this index on: far beyond what a run trains on.
SAMPLE_CLIP_INDEX = 10_000_000


def random_patches(key: jax.Array, videos: tuple[jax.Array, ...], patch_size: int,
                   grid: int) -> tuple[jax.Array, ...]:
  """Cuts the same random patch_size x patch_size window out of every array in
  `videos` (each (B, T, H, W, C), equal B, H, W): one window per video, the same for all
  its frames, its offsets multiples of `grid` (so low-res pixels are not split).
  Returns arrays (B, T, patch_size, patch_size, C)."""
  b, _, h, w, _ = videos[0].shape
  if patch_size > h or patch_size > w:
    raise ValueError(f"patch_size {patch_size} is larger than the {h}x{w} frames")
  ky, kx = jax.random.split(key)
  oy = jax.random.randint(ky, (b,), 0, (h - patch_size) // grid + 1) * grid
  ox = jax.random.randint(kx, (b,), 0, (w - patch_size) // grid + 1) * grid

  def cut(v, y, x):  # one video (T, H, W, C)
    return jax.lax.dynamic_slice(v, (0, y, x, 0), (v.shape[0], patch_size, patch_size,
                                                   v.shape[-1]))
  return tuple(jax.vmap(cut)(v, oy, ox) for v in videos)


def noise_augment(aug_schedule: NoiseSchedule, lowres: jax.Array, key: jax.Array,
                  max_noise_level: int) -> tuple[jax.Array, jax.Array]:
  """Low-res clips (B, T, h, w, C) -> (alpha_s x + sigma_s eps, s (B,) int32), with s
  drawn uniformly in [0, max_noise_level) once per video: every frame of a video gets
  the same level (q_sample broadcasts the (B,) coefficients over T, h, w, C)."""
  k_level, k_noise = jax.random.split(key)
  level = jax.random.randint(k_level, (lowres.shape[0],), 0, max_noise_level, jnp.int32)
  return q_sample(aug_schedule, lowres, level, gaussian_noise(k_noise, lowres.shape)), level


def prepare_batch(model: um.UpsamplerConfig, aug_schedule: NoiseSchedule,
                  vae_params: Optional[dict], video: jax.Array, key: jax.Array,
                  patch_size: int) -> dict:
  """Steps 1-4 of the module docstring: uint8 clips (B, T, H, W, 3) -> dict of
    x0          (B, T, p, p, C) the high-res patch (or its latent; p = patch_size / f)
    cond        (B, T, p, p, C) the noise-augmented low-res patch, upsampled (or its
                latent): the UNet's extra input
    noise_level (B,) int32 the augmentation level of each video (its class label)
    lowres      (B, T, H/scale, W/scale, 3) the whole clean low-res clips
  """
  k_crop, k_vae, k_aug = jax.random.split(key, 3)
  hr = um.to_float(video)
  lowres = um.area_downsample(hr, model.scale)
  noisy, level = noise_augment(aug_schedule, lowres, k_aug, model.max_noise_level)
  up = um.upsample(noisy, model.scale, model.upsample_method)
  hr_patch, up_patch = random_patches(k_crop, (hr, up), patch_size, model.scale)
  if model.space == "latent":
    x0 = um.encode(model.vae, vae_params, hr_patch, k_vae)
    cond = um.encode(model.vae, vae_params, up_patch, None)
  else:
    x0, cond = hr_patch, up_patch
  return {"x0": x0, "cond": cond, "noise_level": level, "lowres": lowres}


def make_stage(model: um.UpsamplerConfig, mode: str, patch_size: int,
               min_snr_gamma: Optional[float] = None, dtype=jnp.float32,
               remat_policy: str = "none") -> Stage:
  """The upsampler's trainable mask ('temporal': phi, 'full': the UNet) and loss.

  loss_fn(params {'unet'[, 'vae']}, batch {'video' uint8 (B, T, H, W, 3)[,
  'image_only' (B, T)]}, key, step) -> (loss, metrics)."""
  model.validate()
  if min_snr_gamma is not None and not min_snr_gamma > 0:  # (else refused at the trace)
    raise ValueError(f"config.min_snr_gamma={min_snr_gamma}: expected > 0, or None for no "
                     "Min-SNR weighting")
  unet = model.unet_module(dtype, remat_policy)
  # Built here, outside any trace: reading a scheduler config needs concrete values.
  schedule, sampling, aug_schedule = model.schedules()
  m = model.size_multiple
  if patch_size % m:
    raise ValueError(f"patch_size {patch_size} must be a multiple of {m} (VAE factor x "
                     "UNet downsampling, and of the scale)")

  def loss_fn(params, batch, key, step=None):
    k_prep, k_diff = jax.random.split(key)
    prep = prepare_batch(model, aug_schedule, params.get("vae"), batch["video"], k_prep,
                         patch_size)
    cond, level = prep["cond"], prep["noise_level"]

    def model_fn(x_t, t):
      return unet.apply({"params": params["unet"]}, um.model_input(x_t, cond), t, None,
                        level, batch.get("image_only"))

    per_video = denoising_loss(model_fn, prep["x0"], k_diff, schedule,
                               sampling.prediction_type, min_snr_gamma)
    loss = jnp.mean(per_video)
    return loss, {"denoise_loss": loss}

  return Stage("upsampler", is_trainable_fn(mode), loss_fn)


# ---------------------------------------------------------------------------------------
# The trainer's view (stages/base.py).

def _vae(config: ml_collections.ConfigDict) -> tuple[VAEConfig, dict]:
  """The frozen VAE of a latent-space upsampler: that of `config.image_model` (a
  converted image-LDM folder) or a random one of `config.random_vae`; under
  `base.abstract_setup()` the config alone (params None: nothing read or allocated)."""
  if base.is_abstract():
    if not config.image_model:
      return VAEConfig.from_config(config.random_vae, "config.random_vae"), None
    return VAEConfig.from_dict(pretrained.load_index(config.image_model)["vae"],
                               config.image_model), None
  if config.image_model:
    image = pretrained.load(config.image_model)
    # A decoder-stage export: its frame-wise autoencoder (the upsampler encodes and
    # decodes frame by frame).
    return image.vae_config, partition.split(image.params["vae"])[0]
  cfg = VAEConfig.from_config(config.random_vae, "config.random_vae")
  return cfg, params_lib.init_params(AutoencoderKL(cfg), config.seed,
                                     *vae_lib.example_inputs(cfg))


def build_model(config: ml_collections.ConfigDict
                ) -> tuple[um.UpsamplerConfig, Optional[um.PretrainedUpsampler], Optional[dict]]:
  """(model config, image upsampler or None, VAE params or None) from a stage config.

  With `config.image_upsampler` the architecture (UNet, space, VAE, scale, schedules,
  upsample method) is that folder's, plus this config's temporal layers and noise
  levels; otherwise everything comes from this config."""
  if config.get("space") not in um.SPACES:  # (before a VAE is looked for)
    raise ValueError(f"config.space={config.get('space')!r}: expected one of {um.SPACES}")
  temporal = (TemporalConfig.from_config(config.temporal, "config.temporal").validate(
      "config.temporal") if config.temporal_layers else None)
  levels = dict(max_noise_level=config.max_noise_level, noise_level=config.noise_level)
  if config.image_upsampler:
    image = um.load(config.image_upsampler, read_params=not base.is_abstract())
    trained = image.config.max_noise_level
    if config.mode == "temporal" and config.max_noise_level > trained:
      # Theta (the noise-level embedding table included) stays frozen: levels the image
      # upsampler never trained would get their random initial embeddings.
      raise ValueError(f"config.max_noise_level={config.max_noise_level}: the image "
                       f"upsampler {config.image_upsampler} was trained on levels "
                       f"[0, {trained}), and mode 'temporal' freezes its noise-level "
                       f"embeddings; set --config.max_noise_level={trained} or lower")
    model = image.config.replace(temporal=temporal, **levels).validate()
    return model, image, image.params.get("vae")
  vae_cfg, vae_params = (None, None)
  if config.space == "latent":
    vae_cfg, vae_params = _vae(config)
  channels = 3 if config.space == "pixel" else vae_cfg.latent_channels
  aug_levels = int(config.noise_aug_scheduler.get("num_train_timesteps", 1000))
  model = um.UpsamplerConfig(
      unet=um.unet_config(dict(config.unet), channels, aug_levels), temporal=temporal,
      scheduler=dict(config.scheduler), noise_aug_scheduler=dict(config.noise_aug_scheduler),
      space=config.space, vae=vae_cfg, scale=config.scale,
      upsample_method=config.upsample_method, **levels).validate()
  return model, None, vae_params


def _check(config: ml_collections.ConfigDict, model: um.UpsamplerConfig) -> None:
  if config.mode not in ("temporal", "full"):
    raise ValueError(f"config.mode must be 'temporal' or 'full', got {config.mode!r}")
  if config.mode == "temporal":
    if model.temporal is None:
      raise ValueError("mode 'temporal' trains the temporal layers: set temporal_layers=True")
    if not config.image_upsampler:
      raise ValueError("mode 'temporal' freezes theta, which must come from a trained image "
                       "upsampler (config.image_upsampler); with a random theta use mode "
                       "'full'")
  if config.data.kind == "latent_cache":
    raise ValueError("the upsampler trains on pixels (it makes its own low-res input): "
                     "data.kind 'latent_cache' cannot feed it")
  m, d = model.size_multiple, config.data
  for name, v in (("data.height", d.height), ("data.width", d.width)):
    if v % m:
      raise ValueError(f"config.{name}={v} must be a multiple of {m} (full-frame samples)")
  if not 0 < config.patch_size <= min(d.height, d.width):
    # Found only when the step was traced (random_patches), after the models loaded.
    raise ValueError(f"config.patch_size={config.patch_size} must be in [1, "
                     f"{min(d.height, d.width)}] (the {d.height}x{d.width} frames)")


def init_params_fn(model: um.UpsamplerConfig, image: Optional[um.PretrainedUpsampler],
                   vae_params: Optional[dict], seed: int, source: str = ""):
  """(need=None) -> {'unet'[, 'vae']} host arrays at step 0: theta from the image
  upsampler when given (structure checked; `source` names it in errors), every other
  UNet leaf freshly initialised (only those `need` selects; StageSetup.init_params)."""
  def init_params(need: Optional[Callable[[tuple], bool]] = None) -> dict:
    if image is None:
      unet = um.init_unet_params(model, seed, where=init_where(need, "unet"))
    else:
      theta, _ = partition.split(image.params["unet"])
      expected, _ = partition.split(um.abstract_params(model)["unet"])
      partition.check_same_structure(expected, theta, what="image upsampler UNet",
                                     source=source or "config.image_upsampler")
      have = frozenset(traverse_util.flatten_dict(theta))
      unet = merge(theta, um.init_unet_params(model, seed,
                                              where=init_where(need, "unet", have)))
    out = {"unet": unet}
    if vae_params is not None:
      out["vae"] = vae_params
    return out
  return init_params


def sampler_fn(model: um.UpsamplerConfig, config: ml_collections.ConfigDict):
  """(params, step) -> uint8 (N, T, H, 3W, 3): per clip, side by side, the low-res input
  (nearest), the upsampled sample at the model's noise level, and the ground truth;
  the low-res inputs are full frames of held-out procedural clips."""
  s, d = config.sample, config.data

  def sample(params: dict, step: int) -> np.ndarray:
    del step  # the same clips and seed every time, so samples are comparable over steps
    hr = np.stack([procedural.make_clip(SAMPLE_CLIP_INDEX + i, s.num_frames, d.height,
                                        d.width, config.seed)[0]
                   for i in range(s.num_clips)])
    lowres = um.area_downsample(um.to_float(hr), model.scale)
    out = upsampling.upsample(model, {k: params[k] for k in ("unet", "vae") if k in params},
                              lowres, steps=s.steps, sampler=s.sampler, seed=config.seed)
    grid = jnp.concatenate([um.upsample(lowres, model.scale, "nearest"), out,
                            um.to_float(hr)], axis=3)
    return to_uint8(grid)
  return sample


def setup(config: ml_collections.ConfigDict, workdir: Path) -> StageSetup:
  """The upsampler stage of `config` (configs/upsampler_*.py)."""
  model, image, vae_params = build_model(config)
  _check(config, model)
  dtype = dtype_named(config.train.compute_dtype)
  unet = model.unet_module(dtype, config.train.remat_policy)
  stage = make_stage(model, config.mode, config.patch_size, config.get("min_snr_gamma"),
                     dtype, config.train.remat_policy)

  def make_batch(host: dict) -> dict:
    return {k: host[k] for k in ("video", "image_only") if k in host}

  def export(out: Path, params: dict) -> None:
    keep = {k: params[k] for k in ("unet", "vae") if k in params}
    um.save(out, um.PretrainedUpsampler(model, keep, source=str(workdir),
                                        training=pretrained.training_record(config)))

  return StageSetup(
      stage=stage, abstract_params=um.abstract_params(model, unet),
      logical_axes=um.logical_axes(model, unet),
      init_params=init_params_fn(model, image, vae_params, config.seed,
                                 config.image_upsampler),
      make_iterator=lambda: inputs.make_iterator(config, workdir, {}),
      make_batch=make_batch,
      optimizer=optim.make_optimizer(config.optim),
      lr_schedule=optim.learning_rate(config.optim),
      export=export, samples_per_step=config.data.batch_size,
      sample=sampler_fn(model, config), extra={"model": model})
