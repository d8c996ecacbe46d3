"""Prediction-model stage (Video LDM Sec. 3.3, eq. 3): the video UNet learns to continue
a clip from S = 0, 1 or 2 known first frames.

Per clip S is drawn from {0, ..., len(probs) - 1} with probabilities
`config.predictor.num_context_probs` (default uniform over {0, 1, 2}); the mask m_S is 1
on the first S frames and the model gets c_S = (m_S * z, m_S) through its context
encoder. S = 0 is the unconditional branch, which makes context guidance
f(z) + s (f(z, c_S) - f(z)) available at sampling time
(`pipelines/context_sampling.py`: `predict`, `extend`). Everything else (batches, loss,
frozen theta, initialisation from a key-frame export) is `stages/context.py`.

  videoldm-train --config=configs/predictor_tiny.py --workdir=work/predictor_tiny
"""

from pathlib import Path
from typing import Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from videoldm_jax.models.context_encoder import first_frames_mask
from videoldm_jax.pipelines import context_sampling
from videoldm_jax.stages import context, keyframe
from videoldm_jax.stages.base import StageSetup

# Context frames of the training-time samples' extensions when config.sample has no
# num_context (the paper's S = 2: the most the stage trains with by default).
SAMPLE_CONTEXT = 2


def sample_context(config: ml_collections.ConfigDict) -> int:
  """config.sample.num_context, or SAMPLE_CONTEXT where the config has none."""
  return config.sample.get("num_context", SAMPLE_CONTEXT)


def mask_fn(num_context_probs: Sequence[float]) -> context.MaskFn:
  """(key, B, T) -> (B, T) masks of the first S frames, S ~ num_context_probs per clip."""
  probs = np.asarray(num_context_probs, np.float64)
  if probs.ndim != 1 or len(probs) < 1 or (probs < 0).any() or probs.sum() <= 0:
    raise ValueError(f"num_context_probs must be non-negative weights of S = 0, 1, ..., "
                     f"got {tuple(num_context_probs)}")
  logits = jnp.log(jnp.asarray(probs / probs.sum(), jnp.float32))
  largest = max_context(num_context_probs)

  def fn(key: jax.Array, batch: int, num_frames: int) -> jax.Array:
    if largest >= num_frames:
      raise ValueError(f"S up to {largest} context frames needs clips longer than "
                       f"{num_frames} frames")
    s = jax.random.categorical(key, logits, shape=(batch,))
    return first_frames_mask(s, num_frames)
  return fn


def max_context(num_context_probs: Sequence[float]) -> int:
  """The largest number of context frames S the stage draws: the last S of nonzero
  weight (a trailing zero weight draws nothing)."""
  return max((s for s, p in enumerate(num_context_probs) if float(p) > 0), default=0)


def check_sample_context(config: ml_collections.ConfigDict) -> None:
  """Training-time samples extend from config.sample.num_context frames: at most what
  the stage trains with and fewer than a clip's frames (else the first sample, steps
  into the run, failed or conditioned on a count the model never saw)."""
  n, s = sample_context(config), max_context(config.predictor.num_context_probs)
  if not config.sample.get("every", 0):
    return
  if not 0 <= n <= s or n >= config.data.num_frames:
    raise ValueError(f"config.sample.num_context={n}: the predictor trains with at most {s} "
                     f"context frames (predictor.num_context_probs="
                     f"{tuple(config.predictor.num_context_probs)}) on clips of "
                     f"data.num_frames={config.data.num_frames}; set it to at most "
                     f"{min(s, config.data.num_frames - 1)} (or sample.every=0: no "
                     "training-time samples)")


def sampler(ldm, tokenizer, config: ml_collections.ConfigDict):
  """(params, step) -> uint8 videos (N, sample.num_frames, H, W, 3): an unconditional
  first clip of data.num_frames (S = 0), extended autoregressively from its last
  `sample.num_context` frames."""
  def sample(params: dict, step: int) -> np.ndarray:
    model = keyframe.pretrained_from(ldm, params)
    cm = context_sampling.ContextModel.from_pretrained(model)
    prompts = list(config.sample.prompts)
    empty = jnp.zeros((len(prompts), 0) + context.latent_shape(ldm, config), jnp.float32)
    latents = context_sampling.extend(
        cm, empty, config.sample.num_frames, config.data.num_frames,
        sample_context(config), context.sample_options(config),
        **context.sample_conditioning(model, tokenizer, config))
    return context.decode_videos(model, latents)
  return sample


def setup(config: ml_collections.ConfigDict, workdir: Path) -> StageSetup:
  """The prediction stage of `config` (configs/predictor_*.py)."""
  check_sample_context(config)
  mask = mask_fn(config.predictor.num_context_probs)
  most = max_context(config.predictor.num_context_probs)
  if most >= config.data.num_frames:  # (else refused at the trace, after the loading)
    raise ValueError(f"config.data.num_frames={config.data.num_frames}: the predictor draws "
                     f"up to {most} context frames (predictor.num_context_probs) and needs "
                     "clips with at least one frame more")
  return context.setup_context_stage(config, workdir, "predictor", mask, sampler)
