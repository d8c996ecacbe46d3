"""Text (or label) -> image or video with a converted LDM: encode, sample latents, decode.

A model with temporal layers (an exported video LDM) samples videos when
`SampleOptions.num_frames` > 0; the same code path samples images otherwise.
"""

import dataclasses
import functools
import math
from typing import Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from videoldm_jax.diffusion import samplers
from videoldm_jax.diffusion.schedules import schedule_from_diffusers_config
from videoldm_jax.models import attention
from videoldm_jax.models.clip_text import CLIPTextConfig, CLIPTextModel
from videoldm_jax.models.config_base import is_integer, is_seed
from videoldm_jax.models.temporal import TemporalConfig
from videoldm_jax.models.tokenizer import CLIPTokenizer
from videoldm_jax.models.unet import (UNet, UNetConfig, called_with_context,
                                      context_attention)
from videoldm_jax.models.vae import AutoencoderKL, VAEConfig, VAETemporalConfig
from videoldm_jax.pretrained import PretrainedLDM
from videoldm_jax.video_io import to_uint8


@dataclasses.dataclass(frozen=True)
class SampleOptions:
  """What `generate` does; defaults are the usual SD settings."""
  height: int = 512
  width: int = 512
  num_steps: int = 50
  sampler: str = "ddim"          # ddim | ddpm | dpmpp_2m
  guidance_scale: float = 7.5    # 1.0 disables classifier-free guidance
  eta: float = 0.0               # DDIM stochasticity
  seed: int = 0
  progress: bool = True
  num_frames: int = 0            # > 0: a video of this many frames (needs temporal layers)

  def __post_init__(self):
    # (A NaN scale wrote an all-black image, with only NumPy's cast warning.)
    if not math.isfinite(self.guidance_scale):
      raise ValueError(f"guidance_scale must be a finite number, got {self.guidance_scale}")
    if not (math.isfinite(self.eta) and self.eta >= 0):
      raise ValueError(f"eta must be a finite number >= 0, got {self.eta}")
    if not is_seed(self.seed):
      raise ValueError(f"SampleOptions.seed={self.seed!r}: expected a whole number in "
                       "[0, 2^32)")
    if self.sampler not in samplers.SAMPLERS:
      # (Else refused by the sampler, after the prompts had gone through the text encoder.)
      raise ValueError(f"SampleOptions.sampler={self.sampler!r}: expected one of "
                       f"{samplers.SAMPLERS}")
    for field, least in (("height", 1), ("width", 1), ("num_steps", 1), ("num_frames", 0)):
      value = getattr(self, field)
      if not is_integer(value, least):
        raise ValueError(f"SampleOptions.{field}={value!r}: expected a whole number >= "
                         f"{least}")


# Jitted programs are cached per config, not per loaded model: calls (and stages of the
# generation chain) that share a config and input shapes share one compilation (an
# SD-size UNet takes minutes to compile). The attention implementation is part of the
# key because it is read when a program is traced (models/attention.py).

def unet_fn(unet_config: UNetConfig, temporal: Optional[TemporalConfig]) -> Callable:
  """Jitted `UNet(unet_config, temporal).apply`."""
  return _unet_fn(unet_config, temporal, attention.implementation())


@functools.lru_cache(maxsize=16)
def _unet_fn(unet_config, temporal, implementation) -> Callable:
  del implementation  # a cache key only
  return jax.jit(UNet(unet_config, temporal).apply)


@functools.lru_cache(maxsize=4)
def text_fn(text_config: CLIPTextConfig) -> Callable:
  """Jitted `CLIPTextModel(text_config).apply`: token ids (B, L) -> (B, L, D). (CLIP's
  causal attention is its own formula, whatever the attention implementation.)"""
  return jax.jit(CLIPTextModel(text_config).apply)


def decode_fn(vae_config: VAEConfig, temporal: Optional[VAETemporalConfig]) -> Callable:
  """Jitted (vae params, scaled latents (..., h, w, C)) -> pixels (..., H, W, 3): with
  `temporal`, the temporal decoder on clips (B, T, h, w, C); without, the image decoder
  on all frames or images as one batch, whatever the leading axes."""
  return _decode_fn(vae_config, temporal, attention.implementation())


@functools.lru_cache(maxsize=4)
def _decode_fn(vae_config, temporal, implementation) -> Callable:
  del implementation  # a cache key only
  vae = AutoencoderKL(vae_config, temporal)
  if temporal is not None:
    return jax.jit(lambda p, z: vae.apply({"params": p}, z,
                                          method=AutoencoderKL.decode_video_latents))

  def frame_wise(p, z):
    x = vae.apply({"params": p}, z.reshape((-1,) + z.shape[-3:]),
                  method=AutoencoderKL.decode_latents)
    return x.reshape(z.shape[:-3] + x.shape[1:])
  return jax.jit(frame_wise)


def encode_prompts(model: PretrainedLDM, tokenizer: CLIPTokenizer, prompts: Sequence[str]
                   ) -> jax.Array:
  """Prompts -> CLIP context (B, 77, D) from the model's text encoder."""
  if model.text_config is None:
    raise ValueError(f"{model.source}: this model has no text encoder; it cannot take "
                     "prompts")
  ids = jnp.asarray(tokenizer(list(prompts), max_length=model.text_config.max_position_embeddings))
  return text_fn(model.text_config)({"params": on_device(model.params["text_encoder"])}, ids)


def truncation_notes(model: PretrainedLDM, tokenizer: Optional[CLIPTokenizer],
                     prompts: dict[str, str]) -> list[str]:
  """A note per prompt (name -> text) longer than `model`'s text encoder reads
  (max_position_embeddings - 2 tokens: 75 for CLIP), naming the end `encode_prompts`
  cuts off. (It was cut without a word; diffusers warns.)"""
  if model.text_config is None or tokenizer is None:
    return []
  n = model.text_config.max_position_embeddings
  return [f"{name} is longer than the {n - 2} tokens the text encoder reads; its end is "
          f"ignored: {cut!r}" for name, text in prompts.items()
          if (cut := tokenizer.dropped(text, n))]


def on_device(params):
  """`params` (host NumPy, as `pretrained.load` gives them) on the default device, once:
  a jitted call given NumPy arrays copies them to the device on every call (for every
  denoising step, 21 ms per 100 MB on this CPU; the SD UNet is 3.4 GB). Arrays already
  there are kept as they are."""
  return jax.device_put(params)


def missing_context(model: PretrainedLDM) -> Optional[tuple[str, tuple]]:
  """For a model without a text encoder whose UNet still needs a cross-attention context
  (`unet.called_with_context`) from outside: the first attn2 key kernel whose width is
  not its queries', so that it cannot attend to its own tokens as a model without a
  context does ('path', shape). None for a model with a text encoder, or one that runs
  without a context."""
  if model.text_config is not None or not called_with_context(model.unet_config, False):
    return None
  found = context_attention(model.params.get("unet", {}))
  return None if found is None else found[:2]


def check_context_source(model: PretrainedLDM, where: str = "") -> None:
  """Raises ValueError for a model whose UNet needs a context that sampling has no way
  to make (`missing_context`): e.g. a text-to-image file converted with
  --skip_text_encoder (training can still feed it a latent cache's embeddings).
  Sampling failed deep in the UNet on a parameter shape."""
  missing = missing_context(model)
  if missing is not None:
    path, shape = missing
    raise ValueError(
        f"{where or model.source or 'model'}: its UNet's cross-attention takes a context "
        f"of width {shape[0]} (text embeddings; {path}: {shape}), but the model has no "
        "text encoder to make one, so it cannot be sampled; convert it with its text "
        "encoder (videoldm-convert without --skip_text_encoder)")


def size_multiple(unet_config, vae_config) -> int:
  """What frame heights and widths must be multiples of for these models: the VAE's
  factor times one halving per UNet level below the first (skips must match)."""
  return vae_config.downsample_factor * 2 ** (unet_config.num_levels - 1)


def check_sample_options(model: PretrainedLDM, options: SampleOptions) -> None:
  """ValueError for `options` that `model` cannot sample, read from its configs alone
  (`pretrained.load(..., weights=False)` will do: the sampling commands call it before
  the weights load): a height or width that is not a multiple of `size_multiple`, a
  step count whose timestep grid does not fit the model's schedule. (Both were refused
  only once the weights had loaded and the prompts been encoded.)"""
  f = size_multiple(model.unet_config, model.vae_config)
  if options.height % f or options.width % f:
    raise ValueError(f"height and width must be multiples of {f} for this model "
                     f"(got {options.height}x{options.width})")
  check_step_grid(schedule_from_diffusers_config(model.scheduler), options.sampler,
                  options.num_steps, "steps")


def check_step_grid(schedules: tuple, sampler: str, steps: int, what: str) -> None:
  """ValueError naming `what` unless `steps` of `sampler` make a valid timestep grid on
  `schedules` = (NoiseSchedule, SamplingConfig)."""
  schedule, cfg = schedules
  try:
    samplers.timestep_grid(schedule.num_train_timesteps, steps, sampler,
                           cfg.timestep_spacing, cfg.steps_offset,
                           alphas_cumprod=schedule.alphas_cumprod,
                           prediction_type=cfg.prediction_type)
  except ValueError as e:
    raise ValueError(f"{what}={steps}: {e}") from None


def sample_latents(model: PretrainedLDM, tokenizer: Optional[CLIPTokenizer],
                   prompts: Sequence[str], negative_prompt: str = "",
                   options: SampleOptions = SampleOptions(),
                   class_labels: Optional[Sequence[int]] = None,
                   x_T: Optional[jax.Array] = None) -> jax.Array:
  """Runs the sampler: returns scaled latents (B, height/f, width/f, latent_channels).

  Classifier-free guidance runs the conditional and unconditional branches in one
  batched UNet call per step: the prompt and the negative prompt (text encoder), and
  `class_labels` (B,) and the model's null class (`null_class_label`: a class-conditional
  model trained with label dropout; without one, both branches take `class_labels` and
  a model without a text encoder runs unguided). `x_T` replaces the initial noise drawn
  from `options.seed` (e.g. to reproduce another implementation's run).
  """
  unet_cfg, vae_cfg = model.unet_config, model.vae_config
  check_context_source(model)
  check_sample_options(model, options)
  if unet_cfg.in_channels != vae_cfg.latent_channels:
    raise ValueError(f"the UNet takes {unet_cfg.in_channels} input channels but the VAE "
                     f"makes {vae_cfg.latent_channels}: not a text-to-image model "
                     "(inpainting / upscaler UNets need their extra inputs)")
  batch = len(prompts)
  schedule, sampling = schedule_from_diffusers_config(model.scheduler)
  labels = None if class_labels is None else jnp.asarray(class_labels, jnp.int32)
  if labels is not None and labels.shape != (batch,):
    # (The UNet refused it, naming the guided batch of twice the size.)
    raise ValueError(f"class_labels: one per prompt, {batch}, got shape {labels.shape}")
  if options.num_frames and model.temporal_config is None:
    raise ValueError(f"{model.source}: num_frames={options.num_frames} needs a video model "
                     "(temporal layers); this is an image model")
  unet_apply = unet_fn(unet_cfg, model.temporal_config)
  params = {"params": on_device(model.params["unet"])}

  def model_fn(x, t, cond):
    return unet_apply(params, x, t, cond.get("text"), cond.get("labels"))

  cond, uncond = {}, {}
  if model.text_config is not None:
    cond["text"] = encode_prompts(model, tokenizer, prompts)
    uncond["text"] = encode_prompts(model, tokenizer, [negative_prompt] * batch)
  if labels is not None:
    cond["labels"] = labels
    null = null_class_label(model)
    uncond["labels"] = labels if null is None else jnp.full_like(labels, null)
  if guided(model):
    denoise = samplers.guided_denoise_fn(model_fn, cond, uncond, options.guidance_scale)
  else:
    denoise = lambda x, t: model_fn(x, t, cond)

  key = jax.random.key(options.seed)
  frames = (options.num_frames,) if options.num_frames else ()
  shape = (batch, *frames, options.height // vae_cfg.downsample_factor,
           options.width // vae_cfg.downsample_factor, vae_cfg.latent_channels)
  if x_T is None:
    x_T = jax.random.normal(jax.random.fold_in(key, 0), shape, jnp.float32)
  elif tuple(x_T.shape) != shape:
    raise ValueError(f"x_T has shape {tuple(x_T.shape)}, expected {shape}")
  return samplers.sample(
      denoise, jnp.asarray(x_T, jnp.float32), schedule, options.num_steps,
      sampler=options.sampler, key=jax.random.fold_in(key, 1), progress=options.progress,
      eta=options.eta, **dataclasses.asdict(sampling))


def null_class_label(model: PretrainedLDM) -> Optional[int]:
  """The class label of `model`'s unconditional branch (classifier-free guidance of a
  class-conditional model), recorded by the stage that trained it with label dropout;
  None for other models. ValueError for a record outside the class table (a hand-edited
  export would index past it)."""
  classes = model.unet_config.num_class_embeds
  if not classes:
    return None
  null = model.training.get("null_class_label")
  if null is not None and (isinstance(null, bool) or not isinstance(null, int)
                           or not 0 <= null < classes):
    raise ValueError(f"{model.source or 'the model'}: its training record's null_class_label="
                     f"{null!r} is not one of the UNet's classes 0..{classes - 1}")
  return null


def null_class_effect(model: PretrainedLDM) -> str:
  """What sampling `model` with its null class as the label gives: a text-free model's
  samples are unconditional; a text model's are still guided, by the prompt alone."""
  if model.text_config is None:
    return "unconditional samples, unguided"
  return "no class condition; guidance follows the prompt alone"


def guided(model: PretrainedLDM) -> bool:
  """Whether classifier-free guidance applies to `model`: it has a text encoder or a
  null class."""
  return model.text_config is not None or null_class_label(model) is not None


def decode(model: PretrainedLDM, latents: jax.Array) -> jax.Array:
  """Scaled latents (B, [T,] h, w, C) -> images or videos in about [-1, 1]
  (B, [T,] h*f, w*f, 3). Video frames are decoded one by one (as a batch), or by the
  model's video decoder where it has one (`vae_temporal_config`: a decoder-stage
  export built on a video model holds both)."""
  temporal = model.vae_temporal_config if latents.ndim == 5 else None
  return decode_fn(model.vae_config, temporal)(on_device(model.params["vae"]), latents)


def generate(model: PretrainedLDM, tokenizer: Optional[CLIPTokenizer], prompts: Sequence[str],
             negative_prompt: str = "", options: SampleOptions = SampleOptions(),
             class_labels: Optional[Sequence[int]] = None) -> np.ndarray:
  """Prompts -> uint8 images (B, height, width, 3), or videos (B, T, height, width, 3)
  when options.num_frames > 0; see `sample_latents`."""
  latents = sample_latents(model, tokenizer, prompts, negative_prompt, options, class_labels)
  return to_uint8(decode(model, latents))
