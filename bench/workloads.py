"""The benchmark workloads W1 and W2 and every stage's train step built on them.

The shapes are those of the SVD-style video UNet our users compare against (issue 8):
  W1: latents 4 x 32 x 32, T = 8, batch 2; levels (64, 128), one ResBlock per level
      (two on the way up), spatial + temporal attention at level 0 and in the middle
      block, heads (2, 4), cross-attention dim 64, context length 1.
  W2: latents 4 x 32 x 32, T = 8, batch 1; levels (128, 256, 256), two ResBlocks per
      level, attention at levels 0, 1 and in the middle block, heads (4, 8, 8),
      cross-attention dim 128.
  SD15: the SD 1.5-sized key-frame config of the accelerator runs (configs/
      keyframe_sd15.py): latents 4 x 40 x 64 (320 x 512 frames), T = 16, batch 1
      (one clip per device, as configs/keyframe_sd15_8xh100.py); SD 1.5's UNet
      (320, 640, 1280, 1280), 8 heads, context 77 x 768.
Temporal layers (a temporal ResBlock after every ResBlock, a temporal transformer after
every spatial one) are the library's defaults.

Stages on a workload (each the library's own `Stage`, built by the stage module):
  keyframe      the latent video UNet on cached latents and context (eq. 2)
  predictor     + context encoder, 0-2 known first frames (eq. 3)
  interpolator  + context encoder, every 4th frame known
  upsampler     the same UNet in pixel space on 32 x 32 crops of 4x upsampling: x_t (3)
                ++ the noise-augmented, bilinearly upsampled low-res clip (3), level
                embedding; the batch is uint8 video
  decoder       the video decoder of a KL autoencoder with the workload's widths,
                latents 4 x 32 x 32 -> frames 64 x 64 (encoder frozen), L1 + hinge GAN
                with the 3-D patch discriminator
Modes: 'temporal' trains phi only (theta frozen, no weight gradient for it); 'full'
trains the whole UNet (decoder: the whole decoder, `train_spatial_decoder`).
"""

import dataclasses
from typing import Callable, Optional

import numpy as np
import ml_collections
import optax
from flax import traverse_util

from videoldm_jax import upsampler_model as um
from videoldm_jax.models import discriminator as disc_lib
from videoldm_jax.models import params as params_lib
from videoldm_jax.models import vae as vae_lib
from videoldm_jax.models.temporal import TemporalConfig
from videoldm_jax.models.unet import UNetConfig
from videoldm_jax.models.vae import AutoencoderKL, VAEConfig, VAETemporalConfig
from videoldm_jax.stages import autoencoder as ae
from videoldm_jax.stages import context as context_stage
from videoldm_jax.stages import decoder as decoder_stage
from videoldm_jax.stages import interpolator, keyframe, predictor
from videoldm_jax.stages import upsampler as upsampler_stage
from videoldm_jax.train import optim
from videoldm_jax.train.state import split
from videoldm_jax.train.step import Stage
from videoldm_jax.video_ldm import DTYPES, VideoLDM

STAGES = ("keyframe", "predictor", "interpolator", "upsampler", "decoder")
MODES = ("temporal", "full")

# SD's training schedule (diffusers scheduler-config fields).
SD_SCHEDULER = dict(num_train_timesteps=1000, beta_schedule="scaled_linear",
                    beta_start=0.00085, beta_end=0.012, prediction_type="epsilon")
UPSAMPLER_SCHEDULER = dict(num_train_timesteps=1000, beta_schedule="scaled_linear",
                           beta_start=0.0001, beta_end=0.02, prediction_type="v_prediction")


@dataclasses.dataclass(frozen=True)
class Workload:
  name: str
  unet: UNetConfig
  batch: int
  frames: int = 8
  latent_size: int = 32             # latent height (and width unless latent_width)
  context_len: int = 1
  latent_width: Optional[int] = None

  @property
  def latent_hw(self) -> tuple[int, int]:
    return self.latent_size, self.latent_width or self.latent_size

  @property
  def latent_text(self) -> str:
    h, w = self.latent_hw
    return f"{self.frames}x{h}x{w}x4"

  def vae(self) -> VAEConfig:
    """The decoder stage's autoencoder: the workload's widths, 2x downsampling per level."""
    return VAEConfig(block_out_channels=self.unet.block_out_channels,
                     layers_per_block=self.unet.layers_per_block, latent_channels=4)


WORKLOADS = {
    "W1": Workload("W1", UNetConfig(
        block_out_channels=(64, 128), layers_per_block=1, attention_levels=(True, False),
        num_heads=(2, 4), cross_attention_dim=64), batch=2),
    "W2": Workload("W2", UNetConfig(
        block_out_channels=(128, 256, 256), layers_per_block=2,
        attention_levels=(True, True, False), num_heads=(4, 8, 8),
        cross_attention_dim=128), batch=1),
    "SD15": Workload("SD15", UNetConfig(), batch=1, frames=16, latent_size=40,
                     latent_width=64, context_len=77),
}


@dataclasses.dataclass
class Case:
  """A built benchmark case: the stage, its full parameter tree and one batch."""
  stage: Stage
  params: dict
  batch: dict
  samples: int      # videos per step
  description: str
  axes: dict        # logical axis names of every parameter (the params tree's structure)


def video_ldm(w: Workload, temporal: TemporalConfig, dtype: str, remat: str) -> VideoLDM:
  # The VAE config is never run (batches are cached latents); the text encoder is absent
  # (the context comes with the batch, as from a latent cache).
  return VideoLDM(w.unet, VAEConfig(block_out_channels=(32,), layers_per_block=1),
                  None, SD_SCHEDULER, temporal, DTYPES[dtype], remat)


def latent_batch(w: Workload, rng: np.random.Generator) -> dict:
  """One key-frame batch of `w`: latents (B, T, H, W, 4), context (B, S, E), float32."""
  h, wd = w.latent_hw
  return {"latents": rng.standard_normal((w.batch, w.frames, h, wd, w.unet.in_channels),
                                         np.float32),
          "context": rng.standard_normal((w.batch, w.context_len, w.unet.cross_attention_dim),
                                         np.float32)}


def build(workload: str, stage: str, mode: str, dtype: str = "float32",
          remat: str = "none", seed: int = 0, batch: Optional[int] = None) -> Case:
  """The `stage` train-step case of `workload` in `mode` (`batch` overrides the
  workload's videos per step)."""
  if workload not in WORKLOADS:
    raise ValueError(f"workload must be one of {sorted(WORKLOADS)}, got {workload!r}")
  if mode not in MODES:
    raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
  w, rng = WORKLOADS[workload], np.random.default_rng(seed)
  if batch is not None:
    w = dataclasses.replace(w, batch=batch)
  options = keyframe.KeyframeOptions(mode=mode)
  if stage == "keyframe":
    ldm = video_ldm(w, TemporalConfig(), dtype, remat)
    return Case(keyframe.make_stage(ldm, options, None),
                {"unet": ldm.init_unet_params(seed)}, latent_batch(w, rng), w.batch,
                f"{w.name} key-frame UNet, latents {w.latent_text}",
                {"unet": ldm.logical_axes()["unet"]})
  if stage in ("predictor", "interpolator"):
    ldm = video_ldm(w, TemporalConfig(context_frames=True), dtype, remat)
    mask = (predictor.mask_fn((1.0, 1.0, 1.0)) if stage == "predictor"
            else interpolator.mask_fn(4))
    return Case(context_stage.make_context_stage(stage, ldm, options, None, mask),
                {"unet": ldm.init_unet_params(seed)}, latent_batch(w, rng), w.batch,
                f"{w.name} UNet + context encoder, latents {w.latent_text}",
                {"unet": ldm.logical_axes()["unet"]})
  if stage in ("upsampler", "decoder") and w.latent_hw[0] != w.latent_hw[1]:
    raise ValueError(f"stage {stage!r} runs on square workloads (W1, W2); {w.name} has "
                     f"latents {w.latent_text}")
  if stage == "upsampler":
    arch = {k: v for k, v in w.unet.to_dict().items()
            if k not in ("in_channels", "out_channels", "num_class_embeds")}
    model = um.UpsamplerConfig(
        unet=um.unet_config(arch, 3, 1000), temporal=TemporalConfig(),
        scheduler=UPSAMPLER_SCHEDULER, noise_aug_scheduler=dict(UPSAMPLER_SCHEDULER))
    s = w.latent_size
    video = rng.integers(0, 256, (w.batch, w.frames, s, s, 3), dtype=np.uint8)
    return Case(upsampler_stage.make_stage(model, mode, s, dtype=DTYPES[dtype],
                                           remat_policy=remat),
                {"unet": um.init_unet_params(model, seed)}, {"video": video}, w.batch,
                f"{w.name} pixel upsampler UNet on {s}^2 crops (x_t ++ 4x-upsampled cond)",
                um.logical_axes(model))
  if stage == "decoder":
    vcfg = w.vae()
    vae = AutoencoderKL(vcfg, VAETemporalConfig(), dtype=DTYPES[dtype], remat_policy=remat)
    dcfg = disc_lib.DiscriminatorConfig(base_channels=32, num_layers=2)
    disc = disc_lib.VideoPatchDiscriminator(dcfg, dtype=DTYPES[dtype])
    vae_in, disc_in = vae_lib.example_inputs(vcfg, video=True), disc_lib.example_inputs(dcfg, True)
    params = {"vae": params_lib.init_params(vae, seed, *vae_in),
              "discriminator": params_lib.init_params(disc, seed, *disc_in)}
    axes = {"vae": params_lib.logical_axes(vae, *vae_in),
            "discriminator": params_lib.logical_axes(disc, *disc_in)}
    size = w.latent_size * vcfg.downsample_factor
    video = rng.integers(0, 256, (w.batch, w.frames, size, size, 3), dtype=np.uint8)
    return Case(decoder_stage.make_stage(vae, disc, ae.LossOptions(), mode == "full"),
                params, {"video": video}, w.batch,
                f"{w.name} video decoder, latents {w.latent_size}^2x4 -> {size}^2 frames", axes)
  raise ValueError(f"stage must be one of {STAGES}, got {stage!r}")


OPTIM = ml_collections.ConfigDict(dict(lr=1e-4, warmup_steps=100, total_steps=10000,
                                          b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.01,
                                          grad_clip=1.0))


def optimizer(case: Case) -> optax.GradientTransformation:
  """The trainer's optimiser (clipping + AdamW + schedule), one per group if grouped."""
  if case.stage.group is None:
    return optim.make_optimizer(OPTIM)
  trainable, _ = split(case.params, case.stage.is_trainable)
  groups = {case.stage.group(k) for k in traverse_util.flatten_dict(trainable)}
  return optim.make_grouped_optimizer({g: OPTIM for g in groups}, case.stage.group)


def params_count(tree: dict, where: Callable = lambda path: True) -> int:
  return int(sum(np.size(v) for k, v in traverse_util.flatten_dict(tree).items() if where(k)))
