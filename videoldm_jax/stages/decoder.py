"""Decoder stage (Video LDM Sec. 3.1, temporal autoencoder fine-tuning): the image
autoencoder's decoder gets temporal layers (models/vae.py, `VAETemporalConfig`) that
are trained on video against a patch-wise 3-D-conv discriminator, which removes the
flicker of frame-wise decoding (paper: FVD 390.88 -> 32.94 on RDS).

The encoder stays frame-wise and frozen: the latent models trained on its latents stay
valid. Each clip is encoded frame by frame (a posterior sample) and decoded as a
video. Trainable: the decoder's temporal layers (`vae/decoder/**/temporal_*`) and the
discriminator; with `train_spatial_decoder` also the spatial decoder (`vae/decoder`,
`vae/post_quant_conv`). Generator loss:
  mean |x - x_rec| (+ perceptual_weight * per-frame LPIPS)
  + lambda * disc_factor(step) * -mean(D3(x_rec)),
discriminator loss disc_factor(step) * hinge(D3(x), D3(sg(x_rec))), with lambda the
adaptive weight on the last decoder layer (`temporal_conv_out`'s kernel, as sgm's
`get_last_layer`); see stages/autoencoder.py for the shared terms.

A batch is {'video': uint8 (B, T, H, W, 3)}. The export is the image model of the
config with the video decoder in params['vae'] and `vae_temporal_config` set.
"""

import dataclasses
from pathlib import Path
from typing import Callable, Optional

import jax
import jax.numpy as jnp
import ml_collections
from flax import traverse_util

from videoldm_jax.models import discriminator as disc_lib
from videoldm_jax.models import params as params_lib
from videoldm_jax.models import partition
from videoldm_jax.models import vae as vae_lib
from videoldm_jax.models.temporal import Frames
from videoldm_jax.models.vae import AutoencoderKL, VAETemporalConfig
from videoldm_jax.stages import autoencoder as ae
from videoldm_jax.stages import keyframe
from videoldm_jax.stages.base import StageSetup, init_where
from videoldm_jax.train.step import Stage
from videoldm_jax.video_ldm import dtype_named

LAST_LAYER = ("decoder", "temporal_conv_out", "conv", "kernel")


def is_trainable_fn(train_spatial_decoder: bool):
  """Path predicate: the decoder's temporal layers and the discriminator (+ the spatial
  decoder and post_quant_conv with `train_spatial_decoder`)."""
  def is_trainable(path) -> bool:
    if path[0] == "discriminator":
      return True
    if path[0] != "vae":
      return False
    if path[1] == "decoder" and partition.is_temporal(path):
      return True
    return train_spatial_decoder and path[1] in ("decoder", "post_quant_conv")
  return is_trainable


def make_stage(vae: AutoencoderKL, disc: disc_lib.VideoPatchDiscriminator,
               options: ae.LossOptions, train_spatial_decoder: bool = False) -> Stage:
  """The decoder stage for a video-decoder `vae` (built with `temporal` set)."""
  if vae.temporal is None:
    raise ValueError("the decoder stage needs AutoencoderKL(config, temporal=...)")

  def loss_fn(params, batch, key, step):
    video = batch["video"]
    t = video.shape[1]
    x = ae.frames_to_images(video)
    vp = params["vae"]
    # The encoder is frozen (closed over by the step): no weight gradient is taken.
    mean, logvar = vae.apply({"params": vp}, x, method=AutoencoderKL.encode)
    z = jax.lax.stop_gradient(
        mean + jnp.exp(0.5 * logvar) * jax.random.normal(key, mean.shape, mean.dtype))
    frames = Frames(t)
    feats = vae.apply({"params": vp}, z, frames, method=AutoencoderKL.decode_features)
    gen, d_loss, metrics = ae.reconstruction_gan_losses(
        options, x=x, features=feats, vae_params=vp,
        head=lambda p, f: vae.apply({"params": p}, f, frames,
                                    method=AutoencoderKL.decode_head),
        last_layer=LAST_LAYER,
        disc=lambda p, y: disc.apply({"params": p}, y), disc_params=params["discriminator"],
        to_disc=lambda y: y.reshape((-1, t) + y.shape[1:]),
        lpips_params=params.get("lpips"), step=step)
    mix = [v for k, v in traverse_util.flatten_dict(vp["decoder"]).items()
           if k[-1] == "mix_factor"]
    metrics["alpha_temporal"] = jnp.mean(jax.nn.sigmoid(jnp.concatenate(mix)))
    return gen + d_loss, metrics

  return Stage("decoder", is_trainable_fn(train_spatial_decoder), loss_fn, group=ae.group)


def setup(config: ml_collections.ConfigDict, workdir: Path) -> StageSetup:
  """The decoder stage of `config` (configs/decoder_*.py)."""
  # The sections first: their errors before the image model loads.
  temporal = VAETemporalConfig.from_config(
      config.vae_temporal, "config.vae_temporal").validate("config.vae_temporal")
  disc_config = disc_lib.DiscriminatorConfig.from_config(
      config.discriminator, "config.discriminator").validate("config.discriminator")
  vae_config, image_vae, image_temporal = ae.image_model_vae(config, workdir)
  # mix_init only starts the blend; a continued decoder takes its blend from the export.
  if (image_temporal is not None
      and dataclasses.replace(image_temporal, mix_init=temporal.mix_init) != temporal):
    # Its temporal layers continue training only in their own layout.
    raise ValueError(f"config.image_model={config.image_model} holds a video decoder "
                     f"with vae_temporal {image_temporal.to_dict()}, config.vae_temporal "
                     f"is {temporal.to_dict()}: set them equal to continue training it, "
                     "or start from the frame-wise image model")
  dtype = dtype_named(config.train.compute_dtype)
  vae = AutoencoderKL(vae_config, temporal, dtype=dtype,
                      remat_policy=config.train.remat_policy)
  disc = disc_lib.VideoPatchDiscriminator(disc_config, dtype=dtype)
  options = ae.LossOptions.from_config(config.loss)
  ae.check_frame_size(config, disc, options, vae_config)
  if config.data.get("image_fraction", 0.0):
    # Still images stacked into a "clip" would be decoded through the temporal layers
    # and shown to the 3-D discriminator as real videos: it would learn that flicker
    # is real, the opposite of what this stage trains.
    raise ValueError(f"config.data.image_fraction={config.data.image_fraction}: the "
                     "decoder stage trains on videos only; set it to 0")
  lpips = ae.lpips_params(options)
  vae_in = vae_lib.example_inputs(vae_config, video=True)
  disc_in = disc_lib.example_inputs(disc_config, True)
  vae_abstract = params_lib.abstract_params(vae, *vae_in)
  abstract, axes = ae.with_lpips(
      {"vae": vae_abstract, "discriminator": params_lib.abstract_params(disc, *disc_in)},
      {"vae": params_lib.logical_axes(vae, *vae_in),
       "discriminator": params_lib.logical_axes(disc, *disc_in)}, lpips)
  holder = {"vae": image_vae}

  def init_params(need: Optional[Callable[[tuple], bool]] = None) -> dict:
    # The spatial decoder (and temporal layers, when the image model already has a
    # video decoder of this layout) come from the image model; the rest is new.
    have = traverse_util.flatten_dict(holder.pop("vae"))
    new = params_lib.init_params(vae, config.seed, *vae_in,
                                 where=init_where(need, "vae", frozenset(have)))
    vae_params = traverse_util.unflatten_dict({**have, **traverse_util.flatten_dict(new)})
    expected = {k: v for k, v in traverse_util.flatten_dict(vae_abstract).items()
                if k in have or need is None or need(("vae",) + k)}  # others left out
    partition.check_same_structure(traverse_util.unflatten_dict(expected), vae_params,
                                   what="autoencoder parameters",
                                   source=keyframe.image_model_source(config))
    out = {"vae": vae_params,
           "discriminator": params_lib.init_params(
               disc, config.seed, *disc_in, where=init_where(need, "discriminator"))}
    return out if lpips is None else {**out, "lpips": lpips}

  @jax.jit
  def reconstruct(params, clips_u8):
    x = clips_u8.astype(jnp.float32) / 127.5 - 1.0
    return vae.apply({"params": params["vae"]}, x)  # posterior mean, decoded as video

  return StageSetup(
      stage=make_stage(vae, disc, options, config.train_spatial_decoder),
      abstract_params=abstract, logical_axes=axes, init_params=init_params,
      make_iterator=ae.pixel_iterator(config, workdir), make_batch=ae.make_batch,
      optimizer=ae.optimizer(config), lr_schedule=ae.lr_schedules(config),
      export=ae.model_exporter(config, workdir, temporal),
      samples_per_step=config.data.batch_size,
      sample=ae.reconstruction_sampler(config, reconstruct),
      best_metric="reconstruction_loss")
