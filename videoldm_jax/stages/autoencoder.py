"""Autoencoder stage: train the image KL autoencoder (all of it) with a 2-D patch
discriminator on video frames as images, as Stable Diffusion's autoencoder was trained
(taming-transformers' `LPIPSWithDiscriminator`). The paper trains its driving model's
autoencoder on its own data before the latent models; this stage is that step.

A batch is {'video': uint8 (B, T, H, W, 3)}; its B*T frames are independent images.
Generator loss (autoencoder):
  mean |x - x_rec|  (+ perceptual_weight * LPIPS(x, x_rec))
  + kl_weight * KL(posterior || N(0, I)) / (H * W * 3)
  + lambda * disc_factor(step) * -mean(D(x_rec))
and the discriminator's: disc_factor(step) * hinge(D(x), D(sg(x_rec))); lambda is the
adaptive weight (train/gan.py) and disc_factor is 0 before `loss.disc_start`.
Per-pixel means instead of taming's per-image sums: the KL is divided by the pixels of
an image, so kl_weight keeps taming's meaning (SD: 1e-6) relative to the L1 term.

Parameters {'vae': AutoencoderKL, 'discriminator': PatchDiscriminator[, 'lpips': VGG16
features (frozen)]}. The export is the image model (config.image_model, or the random
config.random_image_model) with the trained autoencoder: a `pretrained` folder the
latent stages (image_ldm, keyframe, ...) and the decoder stage start from.

The loss helpers here are shared with the decoder stage (stages/decoder.py).
"""

import dataclasses
import functools
import sys
from pathlib import Path
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from videoldm_jax import pretrained
from videoldm_jax.data import inputs
from videoldm_jax.data.procedural import make_clip
from videoldm_jax.models import discriminator as disc_lib
from videoldm_jax.models import params as params_lib
from videoldm_jax.models import partition
from videoldm_jax.models import perceptual
from videoldm_jax.models import vae as vae_lib
from videoldm_jax.models.vae import AutoencoderKL, VAEConfig, kl_divergence
from videoldm_jax.stages import keyframe
from videoldm_jax.stages.base import StageSetup, init_where
from videoldm_jax.train import gan, optim
from videoldm_jax.train.step import Stage
from videoldm_jax.video_ldm import dtype_named

ParamPath = tuple[str, ...]


@dataclasses.dataclass(frozen=True)
class LossOptions:
  """config.loss of the autoencoder stages (see configs/decoder_base.py)."""
  kl_weight: float = 1e-6
  perceptual_weight: float = 0.0
  perceptual_weights_path: str = ""
  disc_start: int = 0           # steps before the adversarial terms switch on
  disc_weight: float = 0.5      # factor on the adaptive weight (taming's disc_weight)
  disc_factor: float = 1.0      # factor on both adversarial terms once on

  @classmethod
  def from_config(cls, loss: ml_collections.ConfigDict) -> "LossOptions":
    options = cls(**dict(loss))
    if options.perceptual_weight and not options.perceptual_weights_path:
      raise ValueError("config.loss.perceptual_weight > 0 needs "
                       "config.loss.perceptual_weights_path: a safetensors file of "
                       "torchvision's vgg16().features (see models/perceptual.py; "
                       "nothing is downloaded)")
    return options


def frames_to_images(video_u8: jax.Array) -> jax.Array:
  """uint8 (B, T, H, W, 3) -> float32 (B*T, H, W, 3) in [-1, 1]."""
  x = video_u8.reshape((-1,) + video_u8.shape[2:]).astype(jnp.float32)
  return x / 127.5 - 1.0


def get_leaf(tree: dict, path: ParamPath) -> Any:
  for p in path:
    tree = tree[p]
  return tree


def with_leaf(tree: dict, path: ParamPath, value: Any) -> dict:
  """A copy of the nested dict `tree` with the leaf at `path` replaced."""
  if not path:
    return value
  return {**tree, path[0]: with_leaf(tree[path[0]], path[1:], value)}


def reconstruction_gan_losses(
    options: LossOptions, *, x: jax.Array, features: jax.Array, vae_params: dict,
    head: Callable[[dict, jax.Array], jax.Array], last_layer: ParamPath,
    disc: Callable[[dict, jax.Array], jax.Array], disc_params: dict,
    to_disc: Callable[[jax.Array], jax.Array], lpips_params: Optional[dict],
    step: jax.Array) -> tuple[jax.Array, jax.Array, dict]:
  """The reconstruction + adversarial terms shared by the autoencoder stages.

  x: targets (N, H, W, 3) in [-1, 1]; features: the decoder's features before its last
  layers, (N, H, W, C0); head(vae_params, features) -> reconstructions (N, H, W, 3);
  last_layer: path in vae_params of the kernel the adaptive weight is computed on;
  disc(disc_params, to_disc(images)) -> logits (to_disc folds images into the
  discriminator's layout, e.g. videos). Returns (generator loss without KL,
  discriminator loss, metrics): the generator's term sees the discriminator through
  stop_gradient, the discriminator's sees stop-gradiented reconstructions.
  """
  def rec_loss_of(rec):
    l1 = jnp.mean(jnp.abs(x - rec))
    if lpips_params is None:
      return l1, (l1, jnp.float32(0.0))
    p = jnp.mean(perceptual.distance(lpips_params, x, rec))
    return l1 + options.perceptual_weight * p, (l1, p)

  disc_frozen = jax.lax.stop_gradient(disc_params)
  gen_loss_of = lambda rec: gan.generator_loss(disc(disc_frozen, to_disc(rec)))
  rec = head(vae_params, features)
  rec_loss, (l1, p_loss) = rec_loss_of(rec)
  g_loss = gen_loss_of(rec)
  factor = gan.disc_factor(step, options.disc_start, options.disc_factor)

  def adaptive():
    vp, feats = jax.lax.stop_gradient(vae_params), jax.lax.stop_gradient(features)
    return gan.last_layer_weight(
        lambda w: head(with_leaf(vp, last_layer, w), feats), get_leaf(vp, last_layer),
        lambda r: (rec_loss_of(r)[0], gen_loss_of(r)), options.disc_weight)

  # Before disc_start the weight multiplies 0: skip its two extra pullbacks.
  d_weight = jax.lax.cond(jnp.asarray(step) >= options.disc_start, adaptive,
                          lambda: jnp.float32(0.0))
  # Real and fake through D as one batch (GroupNorm: no cross-example statistics).
  logits = disc(disc_params, to_disc(jnp.concatenate([x, jax.lax.stop_gradient(rec)])))
  logits_real, logits_fake = jnp.split(logits, 2)
  d_loss = factor * gan.hinge_d_loss(logits_real, logits_fake)
  gen = rec_loss + d_weight * factor * g_loss
  # reconstruction_loss ranks checkpoints (StageSetup.best_metric): the total loss
  # jumps by the discriminator's hinge loss (~1) at disc_start.
  metrics = {"rec_loss": l1, "perceptual_loss": p_loss, "reconstruction_loss": rec_loss,
             "g_loss": g_loss,
             "d_loss": d_loss, "d_weight": d_weight, "disc_factor": factor,
             "logits_real": jnp.mean(logits_real), "logits_fake": jnp.mean(logits_fake)}
  return gen, d_loss, metrics


def group(path: ParamPath) -> str:
  """Optimiser group of a trainable leaf."""
  return "discriminator" if path[0] == "discriminator" else "generator"


def make_stage(vae: AutoencoderKL, disc: disc_lib.PatchDiscriminator,
               options: LossOptions) -> Stage:
  """The autoencoder stage: every VAE and discriminator leaf trains; 'lpips' is frozen."""
  def loss_fn(params, batch, key, step):
    x = frames_to_images(batch["video"])
    vp = params["vae"]
    mean, logvar = vae.apply({"params": vp}, x, method=AutoencoderKL.encode)
    z = mean + jnp.exp(0.5 * logvar) * jax.random.normal(key, mean.shape, mean.dtype)
    feats = vae.apply({"params": vp}, z, method=AutoencoderKL.decode_features)
    gen, d_loss, metrics = reconstruction_gan_losses(
        options, x=x, features=feats, vae_params=vp,
        head=lambda p, f: vae.apply({"params": p}, f, method=AutoencoderKL.decode_head),
        last_layer=("decoder", "conv_out", "kernel"),
        disc=lambda p, y: disc.apply({"params": p}, y), disc_params=params["discriminator"],
        to_disc=lambda y: y, lpips_params=params.get("lpips"), step=step)
    kl = jnp.mean(kl_divergence(mean, logvar)) / np.prod(x.shape[1:])
    metrics["kl_loss"] = kl
    return gen + options.kl_weight * kl + d_loss, metrics

  return Stage("autoencoder", lambda path: path[0] in ("vae", "discriminator"), loss_fn,
               group=group)


# ---------------------------------------------------------------------------------------
# The trainer's view (stages/base.py), shared with the decoder stage.

def lpips_params(options: LossOptions) -> Optional[dict]:
  """The frozen VGG16 weights of the perceptual term (None when it is off)."""
  if not options.perceptual_weight:
    return None
  return perceptual.load_vgg16(options.perceptual_weights_path)


def with_lpips(abstract: dict, axes: dict, lpips: Optional[dict]) -> tuple[dict, dict]:
  if lpips is None:
    return abstract, axes
  shapes = jax.tree_util.tree_map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), lpips)
  return {**abstract, "lpips": shapes}, {**axes, "lpips": perceptual.logical_axes(lpips)}


def optimizer(config: ml_collections.ConfigDict):
  """The generator's and the discriminator's optimisers; the discriminator's updates are
  zero before loss.disc_start (its weights stay at their initialisation: its gradient is
  zero then, but AdamW's weight decay would still shrink them)."""
  return optim.make_grouped_optimizer(
      {"generator": config.optim, "discriminator": config.disc_optim}, group,
      fields={"generator": "optim", "discriminator": "disc_optim"},
      start_at={"discriminator": int(config.loss.get("disc_start", 0))})


def lr_schedules(config: ml_collections.ConfigDict) -> dict:
  """The logged learning rates of `optimizer`'s two networks."""
  return {"lr": optim.learning_rate(config.optim),
          "lr/discriminator": optim.learning_rate(config.disc_optim)}


def make_batch(host: dict) -> dict:
  """Only the pixels: captions and labels play no part in autoencoder training."""
  return {"video": host["video"]}


def check_frame_size(config: ml_collections.ConfigDict, disc: disc_lib.PatchDiscriminator,
                     options: LossOptions, vae_config: VAEConfig) -> None:
  """Refuses frames (config.data.height x width) the autoencoder cannot reconstruct at
  their size (not multiples of its factor: a shape error inside the traced step) or too
  small for the discriminator or LPIPS: an empty logits map has a NaN mean, which makes
  every step's loss NaN (even before disc_start: 0 * NaN), and every update skipped."""
  d, video = config.data, disc.video
  f = vae_config.downsample_factor
  if d.height % f or d.width % f:
    raise ValueError(f"config.data: {d.height}x{d.width} frames: height and width must be "
                     f"multiples of the autoencoder's factor {f}")
  shape = (1, d.num_frames, d.height, d.width, 3) if video else (1, d.height, d.width, 3)
  logits, _ = jax.eval_shape(lambda x: disc.init_with_output(jax.random.key(0), x),
                             jax.ShapeDtypeStruct(shape, jnp.float32))
  if 0 in logits.shape:
    raise ValueError(
        f"config.data: {d.height}x{d.width} frames are too small for the discriminator "
        f"(config.discriminator.num_layers={config.discriminator.num_layers}): its logits "
        f"would have shape {logits.shape}; use larger frames or fewer layers")
  if options.perceptual_weight and min(d.height, d.width) < perceptual.MIN_SIZE:
    raise ValueError(f"config.data: {d.height}x{d.width} frames are too small for the "
                     f"perceptual loss (VGG16 LPIPS needs >= {perceptual.MIN_SIZE} "
                     "pixels a side); set loss.perceptual_weight=0 or use larger frames")


def pixel_iterator(config: ml_collections.ConfigDict, workdir: Path):
  """() -> the input pipeline's iterator; these stages need pixels, not a latent cache."""
  if config.data.kind == "latent_cache":
    raise ValueError(f"config.stage={config.stage!r} trains on pixels: data.kind "
                     "'latent_cache' holds latents only; use a video source")
  return lambda: inputs.make_iterator(config, workdir, {})


def reconstruction_sampler(config: ml_collections.ConfigDict,
                           reconstruct: Callable[[dict, np.ndarray], np.ndarray]):
  """(params, step) -> uint8 (N, T, 2H, W, 3): fixed procedural clips (top) over their
  reconstructions (bottom); reconstruct(params, uint8 clips) -> float clips in [-1, 1]."""
  s, d = config.sample, config.data

  # Made at the first sample, not at setup: a run without samples needs none.
  @functools.cache
  def fixed_clips() -> np.ndarray:
    return np.stack([make_clip(i, d.num_frames, d.height, d.width, seed=12345)[0]
                     for i in range(s.get("num_clips", 2))])

  def sample(params: dict, step: int) -> np.ndarray:
    del step
    clips = fixed_clips()
    rec = np.asarray(reconstruct(params, clips))
    rec = np.clip(np.round((rec + 1.0) * 127.5), 0, 255).astype(np.uint8)
    return np.concatenate([clips, rec], axis=2)
  return sample


# config.latent_normalization: what the export's VAE config scales latents by.
LATENT_NORMALIZATIONS = ("keep", "std", "mean_std")
# Clips of training data whose latents give the statistics (`latent_statistics`).
LATENT_STATISTICS_CLIPS = 64


def latent_statistics(config: ml_collections.ConfigDict, workdir: Path,
                      vae_config: VAEConfig, vae_params: dict) -> tuple[float, float, int]:
  """(mean, std, count) of the autoencoder's latents, posterior samples before any
  shift or scaling, over the first LATENT_STATISTICS_CLIPS clips of the training data
  in its seeded order, read by this process alone: the same at any process and device
  count (each clip's noise follows its index). The LDM paper estimates the scale from
  one batch; the mean is for the shift SD3 added. Encoded a training step's
  per-device share of clips at a time, on this process's first device."""
  vae = AutoencoderKL(vae_config)

  @jax.jit
  def sample(params, video_u8, keys):
    mean, logvar = vae.apply({"params": params}, frames_to_images(video_u8),
                             method=vae.encode)
    # Each clip's frames drawn from its own key.
    t = video_u8.shape[1]
    noise = jax.vmap(lambda k: jax.random.normal(k, (t,) + mean.shape[1:]))(keys)
    return mean + jnp.exp(0.5 * logvar) * noise.reshape(mean.shape)

  per_call = max(1, config.data.batch_size // jax.device_count())
  vae_params = jax.device_put(vae_params)  # once, not at every call (host arrays here)
  it = inputs.make_iterator(config, workdir, {}, alone=True)
  total, total_sq, count, clips = 0.0, 0.0, 0, 0
  key = jax.random.key(config.seed)
  while clips < LATENT_STATISTICS_CLIPS:
    video = next(it)["video"][:LATENT_STATISTICS_CLIPS - clips]
    for i in range(0, len(video), per_call):
      chunk = video[i:i + per_call]
      keys = jax.vmap(lambda j: jax.random.fold_in(key, j))(clips + np.arange(len(chunk)))
      z = np.asarray(sample(vae_params, chunk, keys), np.float64)
      total, total_sq, count = total + z.sum(), total_sq + np.square(z).sum(), count + z.size
      clips += len(chunk)
  mean = total / count
  return mean, float(np.sqrt(max(total_sq / count - mean * mean, 0.0))), count


def latent_normalization(config: ml_collections.ConfigDict) -> str:
  """config.latent_normalization, checked (at setup: it is used at the export)."""
  how = config.get("latent_normalization", "keep")
  if how not in LATENT_NORMALIZATIONS:
    raise ValueError(f"config.latent_normalization={how!r}: expected one of "
                     f"{LATENT_NORMALIZATIONS}")
  return how


def normalized_vae_config(config: ml_collections.ConfigDict, workdir: Path,
                          vae_config: VAEConfig, vae_params: dict) -> VAEConfig:
  """`vae_config` with the scaling (and shift) of config.latent_normalization: "keep"
  (an autoencoder fine-tuned for an existing UNet keeps its factors), "std" (scaling
  1 / std, as the LDM paper rescales a new autoencoder's latents for the diffusion
  model) or "mean_std" (also shifted by the mean: zero-mean, unit-variance latents)."""
  how = latent_normalization(config)
  if how == "keep":
    return vae_config
  mean, std, count = latent_statistics(config, workdir, vae_config, vae_params)
  if not np.isfinite(std) or std <= 0:
    raise ValueError(f"config.latent_normalization={how!r}: the latents of "
                     f"{LATENT_STATISTICS_CLIPS} clips have std {std}; the autoencoder "
                     "has collapsed or diverged")
  shift = mean if how == "mean_std" else 0.0
  print(f"latent_normalization={how}: latents of {LATENT_STATISTICS_CLIPS} clips "
        f"({count} values) have mean {mean:.4g}, std {std:.4g}: scaling_factor "
        f"{1 / std:.6g}, shift_factor {shift:.6g} (were {vae_config.scaling_factor:.6g}, "
        f"{vae_config.shift_factor:.6g})", file=sys.stderr, flush=True)
  return dataclasses.replace(vae_config, scaling_factor=float(1 / std),
                             shift_factor=float(shift))


def model_exporter(config: ml_collections.ConfigDict, workdir: Path,
                   vae_temporal: Optional[vae_lib.VAETemporalConfig]):
  """(out_dir, params) -> the image model of the config with params['vae'] replaced (and
  `vae_temporal_config` set for a video decoder), as a `pretrained` folder. The rest
  of the image model is re-read here, so the trainer never holds it. The autoencoder
  stage's latent factors follow config.latent_normalization (`normalized_vae_config`)."""
  def export(out: Path, params: dict) -> None:
    # On process 0 alone (no collective): the setup wrote the random model's tokenizer.
    image, _, tok_dir = keyframe.load_image_model(config, workdir, sync=False)
    if config.stage == "autoencoder":
      image.vae_config = normalized_vae_config(config, workdir, image.vae_config,
                                               params["vae"])
    image.params = {**image.params, "vae": params["vae"]}
    image.source = str(workdir)
    image.vae_temporal_config = vae_temporal
    # image.training stays: the UNet's record when the image model is a UNet stage's
    # export, which this folder still holds.
    image.decoder_training = pretrained.training_record(config)
    pretrained.save(out, image, tok_dir if image.text_config is not None else None)
  return export


def image_model_vae(config: ml_collections.ConfigDict, workdir: Path):
  """(VAEConfig, the image model's VAE params, its VAETemporalConfig or None: a
  decoder-stage export keeps its video decoder here)."""
  image, _, _ = keyframe.load_image_model(config, workdir, keep_video_decoder=True)
  return image.vae_config, image.params["vae"], image.vae_temporal_config


def setup(config: ml_collections.ConfigDict, workdir: Path) -> StageSetup:
  """The autoencoder stage of `config` (configs/autoencoder_tiny.py)."""
  latent_normalization(config)
  disc_config = disc_lib.DiscriminatorConfig.from_config(  # before the image model
      config.discriminator, "config.discriminator").validate("config.discriminator")
  vae_config, vae_params, vae_temporal = image_model_vae(config, workdir)
  if vae_temporal is not None:
    # Keep the image autoencoder: the video decoder's temporal layers are dropped.
    vae_params, _ = partition.split(vae_params)
  dtype = dtype_named(config.train.compute_dtype)
  vae = AutoencoderKL(vae_config, dtype=dtype, remat_policy=config.train.remat_policy)
  disc = disc_lib.PatchDiscriminator(disc_config, dtype=dtype)
  options = LossOptions.from_config(config.loss)
  check_frame_size(config, disc, options, vae_config)
  lpips = lpips_params(options)
  vae_in, disc_in = vae_lib.example_inputs(vae_config), disc_lib.example_inputs(disc_config,
                                                                                 False)
  abstract, axes = with_lpips(
      {"vae": params_lib.abstract_params(vae, *vae_in),
       "discriminator": params_lib.abstract_params(disc, *disc_in)},
      {"vae": params_lib.logical_axes(vae, *vae_in),
       "discriminator": params_lib.logical_axes(disc, *disc_in)}, lpips)
  holder = {"vae": vae_params}

  def init_params(need: Optional[Callable[[tuple], bool]] = None) -> dict:
    out = {"vae": holder.pop("vae"),
           "discriminator": params_lib.init_params(
               disc, config.seed, *disc_in, where=init_where(need, "discriminator"))}
    return out if lpips is None else {**out, "lpips": lpips}

  @jax.jit
  def reconstruct(params, clips_u8):
    b, t = clips_u8.shape[:2]
    x = frames_to_images(clips_u8)
    return vae.apply({"params": params["vae"]}, x).reshape((b, t) + x.shape[1:])

  return StageSetup(
      stage=make_stage(vae, disc, options), abstract_params=abstract, logical_axes=axes,
      init_params=init_params,
      make_iterator=pixel_iterator(config, workdir), make_batch=make_batch,
      optimizer=optimizer(config),
      lr_schedule=lr_schedules(config),
      export=model_exporter(config, workdir, None),
      samples_per_step=config.data.batch_size * config.data.num_frames,
      sample=reconstruction_sampler(config, reconstruct),
      best_metric="reconstruction_loss")
