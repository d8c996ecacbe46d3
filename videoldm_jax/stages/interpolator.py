"""Interpolation-model stage (Video LDM Sec. 3.3): the video UNet learns to fill in the
frames between key frames, raising the frame rate T -> 4T.

Clips have `data.num_frames` (= 4T) frames; frames 0, stride, 2 stride, ... are known
(m = 1, stride = `config.interpolator.stride`, 4 in the paper) and the model generates
the rest, with the prediction model's mechanism and loss (`stages/context.py`). With
probability `config.interpolator.context_drop_prob` a clip gets no known frame (an
all-zero cond), which trains the unconditional branch of context guidance. Applied
twice (the same model or a second one) it gives 4T -> 16T
(`pipelines/context_sampling.py`: `interpolate`, `interpolate_twice`).

  videoldm-train --config=configs/interpolator_tiny.py --workdir=work/interpolator_tiny
"""

import dataclasses
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from videoldm_jax.models.context_encoder import strided_mask
from videoldm_jax.pipelines import context_sampling
from videoldm_jax.stages import context, keyframe
from videoldm_jax.stages.base import StageSetup


def mask_fn(stride: int, context_drop_prob: float = 0.0) -> context.MaskFn:
  """(key, B, T) -> (B, T) masks with 1 at frames 0, stride, ...; all-zero per clip with
  probability context_drop_prob."""
  if stride < 2:
    raise ValueError(f"interpolation stride must be >= 2, got {stride}")
  if not 0.0 <= context_drop_prob <= 1.0:
    # (> 1 dropped every clip's key frames: never trained with context; < 0 none: the
    # no-context branch its samples and context guidance use never trained.)
    raise ValueError(f"interpolator.context_drop_prob must be in [0, 1], got "
                     f"{context_drop_prob}")

  def fn(key: jax.Array, batch: int, num_frames: int) -> jax.Array:
    keep = ~jax.random.bernoulli(key, context_drop_prob, (batch,))
    return strided_mask(batch, num_frames, stride) * keep[:, None].astype(jnp.float32)
  return fn


def sampler(ldm, tokenizer, config: ml_collections.ConfigDict):
  """(params, step) -> uint8 videos (N, sample.num_frames, H, W, 3): key frames taken from
  an unconditional clip of the same model (every stride-th frame), then interpolated
  (one call each; other lengths than data.num_frames are convolutional in time)."""
  stride = config.interpolator.stride

  def sample(params: dict, step: int) -> np.ndarray:
    model = keyframe.pretrained_from(ldm, params)
    cm = context_sampling.ContextModel.from_pretrained(model)
    prompts = list(config.sample.prompts)
    cond = context.sample_conditioning(model, tokenizer, config)
    options = context.sample_options(config)
    t = config.sample.get("num_frames") or config.data.num_frames
    shape = (len(prompts), t) + context.latent_shape(ldm, config)
    zeros = jnp.zeros(shape, jnp.float32)
    free = context_sampling.sample_clip(cm, zeros, jnp.zeros(shape[:2]), options, **cond)
    keys = free[:, ::stride]
    # Another seed: with equal shapes (num_frames a multiple of stride) the same one would
    # start the interpolation from the very noise the key frames came from.
    again = dataclasses.replace(options, seed=options.seed + 1)
    latents = context_sampling.interpolate(cm, keys, stride, again, **cond)[:, :t]
    return context.decode_videos(model, latents)
  return sample


def setup(config: ml_collections.ConfigDict, workdir: Path) -> StageSetup:
  """The interpolation stage of `config` (configs/interpolator_*.py)."""
  c = config.interpolator
  mask = mask_fn(c.stride, c.context_drop_prob)  # (checks the stride first)
  if config.data.num_frames % c.stride:
    # The chain calls it on windows of stride frames per key frame, the last key frame
    # followed by stride - 1 new ones; 4T + 1 frames would train another layout (the
    # last frame known) than the one it samples.
    raise ValueError(f"config.data.num_frames={config.data.num_frames} must be a multiple "
                     f"of interpolator.stride={c.stride} (T key frames -> stride * T "
                     "frames)")
  return context.setup_context_stage(config, workdir, "interpolator", mask, sampler)
