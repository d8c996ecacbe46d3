"""What the prediction and interpolation stages share (Video LDM eq. 3).

Both train the video UNet with context frames: for each clip a binary mask m (B, T)
says which frames are known, the model gets c = (m * z, m) built from the clean latents
z through its `temporal_context_encoder` (models/context_encoder.py), and the loss is
the key-frame stage's denoising loss on the whole clip (eps / v as the schedule says;
known frames included, as in eq. 3: at sampling time they are replaced anyway). What
trains is phi: the temporal layers and the context encoder with its projections
(their names start with `temporal_`); theta, the VAE and the text encoder are frozen.
The two stages differ only in the mask (`MaskFn`).

Initialisation (`setup_context_stage`): from a key-frame export (`config.init_from`: a
`pretrained` folder with a temporal_config), whose theta and phi are reused and whose
temporal config wins over config.temporal (phi's shapes must match) and which replaces
config.image_model (a warning says so when that is set too); or, when
init_from is empty, from config.image_model / config.random_image_model with a new phi.
Only the context encoder and projections are new in the first case. At init they are
zero (projections), so the model starts as the key-frame model it came from.
"""

from pathlib import Path
from typing import Callable, Optional

from absl import logging
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from videoldm_jax import pretrained
from videoldm_jax.diffusion.losses import denoising_loss
from videoldm_jax.diffusion.schedules import schedule_from_diffusers_config
from videoldm_jax.models.context_encoder import masked_cond
from videoldm_jax.models.temporal import TemporalConfig
from videoldm_jax.pipelines import context_sampling, sampling
from videoldm_jax.stages import keyframe
from videoldm_jax.stages.base import StageSetup
from videoldm_jax.train.step import Stage
from videoldm_jax.video_ldm import VideoLDM

# mask_fn(key, batch, num_frames) -> (B, T) float32 in {0, 1}: the known frames.
MaskFn = Callable[[jax.Array, int, int], jax.Array]


def make_context_stage(name: str, ldm: VideoLDM, options: keyframe.KeyframeOptions,
                       uncond_tokens: Optional[np.ndarray], mask_fn: MaskFn) -> Stage:
  """A stage whose loss is the key-frame loss with cond = masked_cond(z, mask_fn(...)).

  Batches are the key-frame stage's (video or latents, tokens or context, labels,
  image_only). Metrics: denoise_loss and known_frames (mean number per clip).
  """
  tc = ldm.temporal_config
  if tc is None or not tc.context_frames:
    raise ValueError(f"the {name} stage needs a UNet with context frames "
                     "(TemporalConfig.context_frames=True)")
  unet, vae = ldm.unet(), ldm.vae()
  text = ldm.text_encoder()
  schedule, sampling_cfg = schedule_from_diffusers_config(ldm.scheduler)

  def loss_fn(params, batch, key, step=None):
    k_vae, k_drop, k_mask, k_diff = jax.random.split(key, 4)
    if "latents" in batch:
      latents = batch["latents"].astype(jnp.float32)
    else:
      latents = keyframe.encode_video(vae, params["vae"], batch["video"], k_vae)
    b, t = latents.shape[:2]
    context = keyframe.text_context(text, params, batch, uncond_tokens,
                                    options.cond_drop_prob, k_drop, ldm.compute_dtype,
                                    keyframe.takes_context(ldm))
    mask = mask_fn(k_mask, b, t)
    # Built from the clean latents: the known frames are given, not noised.
    cond = masked_cond(latents, mask)
    labels = keyframe.drop_labels(keyframe.batch_labels(batch), options.null_class_label,
                                  options.cond_drop_prob, k_drop, b)
    image_only = batch.get("image_only")

    def model_fn(x_t, tau):
      return unet.apply({"params": params["unet"]}, x_t, tau, context, labels, image_only,
                        cond=cond)

    loss = jnp.mean(denoising_loss(model_fn, latents, k_diff, schedule,
                                   sampling_cfg.prediction_type, options.min_snr_gamma))
    return loss, {"denoise_loss": loss, "known_frames": jnp.mean(jnp.sum(mask, axis=1))}

  return Stage(name, keyframe.is_trainable_fn(options.mode), loss_fn)


def context_temporal_config(config: ml_collections.ConfigDict) -> TemporalConfig:
  """The temporal config of the context model: the key-frame export's (config.init_from)
  or config.temporal, with context_frames on and config.context_channels (when empty,
  those of an export that has a context encoder already)."""
  if config.get("init_from"):
    index = pretrained.load_index(config.init_from)
    if index.get("temporal") is None:
      raise ValueError(f"config.init_from={config.init_from}: an image model, not a key-frame "
                       "export (no temporal layers); use config.image_model for image models")
    base = TemporalConfig.from_dict(index["temporal"], config.init_from)
  else:
    base = TemporalConfig.from_config(config.temporal, "config.temporal").validate(
        "config.temporal")
  channels = tuple(config.get("context_channels", ()) or ())
  if not channels and base.context_frames:
    # An export that is a context model already (a predictor continued, or the
    # interpolator started from it) keeps its context encoder's widths.
    channels = base.context_channels
  return base.replace(context_frames=True, context_channels=channels).validate()


def setup_context_stage(config: ml_collections.ConfigDict, workdir: Path, name: str,
                        mask_fn: MaskFn,
                        sample_fn: Optional[Callable] = None) -> StageSetup:
  """The StageSetup of a context stage (see the module docstring for the init).

  sample_fn(ldm, tokenizer, config) -> (params, step) -> uint8 videos; None keeps the
  key-frame stage's sampler (unconditional clips, i.e. the S = 0 branch).
  """
  temporal = context_temporal_config(config)
  if config.get("init_from"):
    if config.get("image_model") and config.image_model != config.init_from:
      logging.warning("config.image_model=%s is ignored: config.init_from=%s (a key-frame "
                      "export) holds theta and phi", config.image_model, config.init_from)
    # The export holds theta + phi (+ VAE, text encoder, tokenizer): it is the "image
    # model" of the shared set-up, whose missing leaves (the context encoder) get
    # initialised.
    config = ml_collections.ConfigDict(config.to_dict())
    config.image_model = config.init_from

  def make_stage_fn(ldm, options, uncond):
    return make_context_stage(name, ldm, options, uncond, mask_fn)

  setup = keyframe.setup_video_ldm(config, workdir, temporal, make_stage_fn)
  if sample_fn is not None:
    setup.sample = sample_fn(setup.extra["ldm"], setup.extra["tokenizer"], config)
  return setup


def sample_conditioning(model: pretrained.PretrainedLDM, tokenizer,
                        config: ml_collections.ConfigDict) -> dict:
  """text / uncond_text (N, L, D) of config.sample.prompts and, for a class-conditional
  model, labels (N,) (`keyframe.sample_labels`), for the context samplers."""
  prompts = list(config.sample.prompts)
  out = {}
  null = sampling.null_class_label(model)
  labels = keyframe.sample_labels(model.unet_config, config, null)
  if labels is not None:
    out["labels"] = jnp.asarray(labels, jnp.int32)
    if null is not None:
      out["uncond_labels"] = jnp.full((len(labels),), null, jnp.int32)
  if model.text_config is not None:
    out["text"] = sampling.encode_prompts(model, tokenizer, prompts)
    out["uncond_text"] = sampling.encode_prompts(model, tokenizer, [""] * len(prompts))
  return out


def sample_options(config: ml_collections.ConfigDict) -> context_sampling.ContextSampleOptions:
  s = config.sample
  return context_sampling.ContextSampleOptions(
      num_steps=s.steps, guidance_scale=s.guidance_scale,
      context_scale=s.get("context_scale", 1.0), seed=config.seed)


def latent_shape(ldm: VideoLDM, config: ml_collections.ConfigDict) -> tuple[int, int, int]:
  f = ldm.vae_config.downsample_factor
  return config.data.height // f, config.data.width // f, ldm.vae_config.latent_channels


def decode_videos(model: pretrained.PretrainedLDM, latents: jax.Array) -> np.ndarray:
  """Latents (N, T, h, w, C) -> uint8 videos (N, T, H, W, 3)."""
  return sampling.to_uint8(sampling.decode(model, latents))
