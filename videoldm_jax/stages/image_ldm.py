"""Image LDM stage: train (or fine-tune) the whole image UNet theta on video frames.

The paper fine-tunes SD on its video frames (and trains its driving model's image LDM
from scratch) before adding temporal layers; this stage is that step. Every frame of a
batch of clips becomes an independent image with its own diffusion time: clips
(B, T, ...) are refolded into B*T one-frame clips and scored by the key-frame loss on a
UNet without temporal layers, all of whose parameters train.
"""

import dataclasses
from pathlib import Path
from typing import Optional

import ml_collections
import numpy as np

from videoldm_jax.stages import keyframe
from videoldm_jax.stages.base import StageSetup
from videoldm_jax.train.step import Stage
from videoldm_jax.video_ldm import VideoLDM


def frames_as_images(batch: dict) -> dict:
  """(B, T, ...) clips -> (B*T, 1, ...) one-frame clips; per-clip fields repeat T times,
  unless given per frame ('frame_tokens', 'frame_labels': an image example's frames come
  from different clips, each with its own caption and label)."""
  t = (batch["latents"] if "latents" in batch else batch["video"]).shape[1]
  out = {}
  for k, v in batch.items():
    if k in ("video", "latents", "frame_tokens", "frame_labels"):
      v = v.reshape((v.shape[0] * t,) + v.shape[2:])
      if k in ("video", "latents"):
        out[k] = v[:, None]
      else:
        out[k.removeprefix("frame_")] = v
    elif k in ("tokens", "context", "labels"):
      out.setdefault(k, v.repeat(t, axis=0))
  return out  # image_only is moot: there are no temporal layers


def _check_mode(mode: str):
  # There are no temporal layers: "temporal" would train nothing (it trained in full).
  if mode != "full":
    raise ValueError(f"the image_ldm stage trains the whole image UNet: config.mode must be "
                     f"'full', got {mode!r}")


def make_stage(ldm: VideoLDM, options: keyframe.KeyframeOptions,
               uncond_tokens: Optional[np.ndarray]) -> Stage:
  if ldm.temporal_config is not None:
    raise ValueError("the image_ldm stage trains the image UNet: build the model with "
                     "temporal=None")
  _check_mode(options.mode)
  inner = keyframe.make_stage(ldm, options, uncond_tokens)
  return Stage("image_ldm", inner.is_trainable,
               lambda params, batch, key, step=None: inner.loss_fn(params, frames_as_images(batch),
                                                                   key, step))


def setup(config: ml_collections.ConfigDict, workdir: Path) -> StageSetup:
  """The image LDM stage of `config` (configs/image_ldm_tiny.py): no temporal layers."""
  _check_mode(config.mode)  # before the image model loads
  # Each frame is an image with its own caption (the frames of an image example come
  # from different clips).
  setup_ = keyframe.setup_video_ldm(config, workdir, None, make_stage, frame_tokens=True)
  # A step scores batch_size * num_frames images (samples/s counted clips).
  return dataclasses.replace(
      setup_, samples_per_step=config.data.batch_size * config.data.num_frames)
