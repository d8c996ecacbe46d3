"""Key-frame stage (Video LDM eq. 2): train the temporal layers phi of the video UNet on
video latents, theta (the image UNet), the VAE and the text encoder frozen.

A batch is a dict of global arrays:
  video   uint8 (B, T, H, W, 3), encoded here by the frozen VAE (a posterior sample), or
  latents float (B, T, h, w, C), already scaled (a latent cache);
  tokens  int32 (B, L) CLIP token ids of the captions (text-conditioned models), or
  context float (B, L, D) their text embeddings (a latent cache);
  labels  int32 (B,) class labels (class-conditional UNets);
  image_only bool (B, T), optional: frames that are still images (alpha = 1).
One diffusion time tau per video, shared by its frames; captions are replaced by the
empty prompt with probability `cond_drop_prob`, which classifier-free guidance needs.
"""

import dataclasses
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from videoldm_jax.diffusion.losses import denoising_loss
from videoldm_jax.diffusion.schedules import schedule_from_diffusers_config
from videoldm_jax.models import partition
from videoldm_jax.models.clip_text import CLIPTextModel
from videoldm_jax.models.unet import UNet
from videoldm_jax.models.vae import AutoencoderKL
from videoldm_jax.train.step import Stage
from videoldm_jax.video_ldm import VideoLDM


def encode_video(vae: AutoencoderKL, vae_params: dict, video_u8: jax.Array,
                 key: Optional[jax.Array]) -> jax.Array:
  """uint8 (B, T, H, W, 3) -> scaled latents (B, T, h, w, C), frame by frame."""
  b, t = video_u8.shape[:2]
  x = video_u8.reshape((b * t,) + video_u8.shape[2:]).astype(jnp.float32) / 127.5 - 1.0
  z = vae.apply({"params": vae_params}, x, key, method=AutoencoderKL.encode_latents)
  return z.reshape((b, t) + z.shape[1:])


@dataclasses.dataclass(frozen=True)
class KeyframeOptions:
  mode: str = "temporal"          # "temporal": phi only; "full": the whole UNet
  cond_drop_prob: float = 0.1
  min_snr_gamma: Optional[float] = None


def is_trainable_fn(mode: str):
  if mode not in ("temporal", "full"):
    raise ValueError(f"mode must be 'temporal' or 'full', got {mode!r}")
  if mode == "temporal":
    return lambda path: path[0] == "unet" and partition.is_temporal(path)
  return lambda path: path[0] == "unet"


def make_stage(ldm: VideoLDM, options: KeyframeOptions,
               uncond_tokens: Optional[np.ndarray]) -> Stage:
  """The key-frame stage for `ldm`; `uncond_tokens` (L,) are the empty prompt's ids."""
  unet, vae = ldm.unet(), ldm.vae()
  text = None if ldm.text_config is None else CLIPTextModel(ldm.text_config,
                                                            dtype=ldm.compute_dtype)
  schedule, sampling = schedule_from_diffusers_config(ldm.scheduler)

  def loss_fn(params, batch, key):
    k_vae, k_drop, k_diff = jax.random.split(key, 3)
    if "latents" in batch:
      latents = batch["latents"].astype(jnp.float32)
    else:
      latents = encode_video(vae, params["vae"], batch["video"], k_vae)
    b = latents.shape[0]
    context = None
    if text is not None:
      if "context" in batch:  # text embeddings from a latent cache
        context = batch["context"].astype(ldm.compute_dtype)
      else:
        context = text.apply({"params": params["text_encoder"]}, batch["tokens"])
      empty = text.apply({"params": params["text_encoder"]}, jnp.asarray(uncond_tokens)[None])
      drop = jax.random.bernoulli(k_drop, options.cond_drop_prob, (b,))
      context = jnp.where(drop[:, None, None], empty, context)
    labels, image_only = batch.get("labels"), batch.get("image_only")

    def model_fn(x_t, t):
      return unet.apply({"params": params["unet"]}, x_t, t, context, labels, image_only)

    per_video = denoising_loss(model_fn, latents, k_diff, schedule, sampling.prediction_type,
                               options.min_snr_gamma)
    loss = jnp.mean(per_video)
    return loss, {"denoise_loss": loss}

  return Stage("keyframe", is_trainable_fn(options.mode), loss_fn)
