"""The temporally aligned upsampler of Video LDM (Sec. 3.4): what the model is, the
conditioning maths it shares between training and sampling, and its on-disk format.

The network is the (video) UNet of `models/unet.py` run on

  concat([x_t, c_s], channels) -> v-prediction for x_t,   x_t, c_s: (B, T, H, W, C)

where x_t is the noisy high-resolution clip and c_s the low-resolution clip, noised with
the forward process q(c_s | c) of a separate augmentation schedule at a level s (per
low-resolution pixel; Sec. 3.4, the SD x4 upscaler's recipe) and then upsampled
`scale`x back to H x W. s is one
integer per video, the same for all its frames, and enters the UNet as the class label
(num_class_embeds = the augmentation schedule's length) added to the timestep
embedding. Training draws s ~ U{0, ..., max_noise_level - 1}; sampling uses a fixed
`noise_level`, so the model never sees a cleaner conditioning than it was trained on.

space 'pixel' (default, the paper's driving upsampler): x and c are RGB in [-1, 1], C = 3.
space 'latent': x is the VAE latent of the high-resolution clip and c the latent of the
noised, upsampled low-resolution clip, both from the same frozen VAE (C = latent
channels): the noise is added to the pixels, before the encoder. (The SD x4 upscaler
instead concatenates the low-resolution PIXELS to the latents of its f4 VAE, whose grid
they match; encoding the upsampled clip works for any VAE factor and keeps
in_channels = 2C.)

On disk (JSON and Orbax only, nothing is unpickled):

  DIR/upsampler_index.json  format tag, configs (unet, temporal, vae), both schedules
                            (diffusers scheduler-config fields), space, scale, levels
  DIR/params/               Orbax checkpoint of {'unet'[, 'vae']}
"""

import dataclasses
import json
from pathlib import Path
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np

from videoldm_jax import pretrained
from videoldm_jax.diffusion.schedules import (NoiseSchedule, SamplingConfig,
                                              schedule_from_diffusers_config)
from videoldm_jax.models import config_base
from videoldm_jax.models import params as params_lib
from videoldm_jax.models import vae as vae_lib
from videoldm_jax.models.temporal import TemporalConfig
from videoldm_jax.models.unet import UNet, UNetConfig
from videoldm_jax.models.vae import AutoencoderKL, VAEConfig

FORMAT = "videoldm-jax/upsampler"
FORMAT_VERSION = 1
INDEX = "upsampler_index.json"
SPACES = ("pixel", "latent")
UPSAMPLE_METHODS = ("nearest", "bilinear")


@dataclasses.dataclass(frozen=True)
class UpsamplerConfig:
  """Everything that defines an upsampler except its parameters.

  unet: in_channels = 2 * channels, out_channels = channels, num_class_embeds = the
    augmentation schedule's num_train_timesteps (see `unet_config`).
  temporal: the temporal layers phi; None for an image upsampler (theta only).
  scheduler: diffusers-style config of the diffusion schedule (v-prediction).
  noise_aug_scheduler: the same for the schedule that noises the conditioning.
  space / vae: 'pixel', or 'latent' with the frozen VAE's config.
  scale: spatial upsampling factor (4 in the paper).
  max_noise_level: training draws augmentation levels in [0, max_noise_level).
  noise_level: the default (fixed) augmentation level at sampling.
  upsample_method: how the low-res clip is brought to the high-res grid before it is
    concatenated: 'bilinear' (half-pixel centres) or 'nearest'.
  """
  unet: UNetConfig
  temporal: Optional[TemporalConfig]
  scheduler: dict = dataclasses.field(hash=False, compare=False, default_factory=dict)
  noise_aug_scheduler: dict = dataclasses.field(hash=False, compare=False,
                                                default_factory=dict)
  space: str = "pixel"
  vae: Optional[VAEConfig] = None
  scale: int = 4
  max_noise_level: int = 350
  noise_level: int = 20
  upsample_method: str = "bilinear"

  @property
  def channels(self) -> int:
    """C: channels of x_t (3 in pixel space, the VAE's latent channels in latent space)."""
    return 3 if self.space == "pixel" else self.vae.latent_channels

  @property
  def vae_factor(self) -> int:
    return 1 if self.space == "pixel" else self.vae.downsample_factor

  @property
  def size_multiple(self) -> int:
    """High-res heights and widths must be multiples of this: the VAE factor times the
    UNet's total downsampling, and a multiple of `scale` (integer low-res sizes)."""
    m = self.vae_factor * 2 ** (self.unet.num_levels - 1)
    return int(np.lcm(m, self.scale))

  def aug_levels(self) -> int:
    return int(self.noise_aug_scheduler.get("num_train_timesteps", 1000))

  def validate(self) -> "UpsamplerConfig":
    if self.space not in SPACES:
      raise ValueError(f"upsampler space must be one of {SPACES}, got {self.space!r}")
    if self.space == "latent" and self.vae is None:
      raise ValueError("a latent-space upsampler needs a VAE config")
    if self.upsample_method not in UPSAMPLE_METHODS:
      raise ValueError(f"upsample_method must be one of {UPSAMPLE_METHODS}, got "
                       f"{self.upsample_method!r}")
    if self.scale < 1:
      raise ValueError(f"scale must be >= 1, got {self.scale}")
    levels = self.aug_levels()
    if not 0 < self.max_noise_level <= levels:
      raise ValueError(f"max_noise_level must be in [1, {levels}], got {self.max_noise_level}")
    if not 0 <= self.noise_level < self.max_noise_level:
      # Training never draws a level of max_noise_level or more: their class
      # embeddings are untrained.
      raise ValueError(f"noise_level must be in [0, max_noise_level={self.max_noise_level}),"
                       f" got {self.noise_level}")
    c, u = self.channels, self.unet
    if (u.in_channels, u.out_channels, u.num_class_embeds) != (2 * c, c, levels):
      raise ValueError(
          f"upsampler UNet must have in_channels={2 * c}, out_channels={c}, "
          f"num_class_embeds={levels} (got {u.in_channels}, {u.out_channels}, "
          f"{u.num_class_embeds}); build it with upsampler_model.unet_config")
    u.validate()
    if self.temporal is not None:
      self.temporal.validate()
    return self

  def unet_module(self, dtype=jnp.float32, remat_policy: str = "none") -> UNet:
    return UNet(self.unet, self.temporal, dtype=dtype, remat_policy=remat_policy)

  def schedules(self) -> tuple[NoiseSchedule, SamplingConfig, NoiseSchedule]:
    """(diffusion schedule, its sampling settings, augmentation schedule)."""
    schedule, sampling = schedule_from_diffusers_config(self.scheduler)
    aug, _ = schedule_from_diffusers_config(self.noise_aug_scheduler)
    return schedule, sampling, aug

  def to_dict(self) -> dict[str, Any]:
    return {"unet": self.unet.to_dict(),
            "temporal": None if self.temporal is None else self.temporal.to_dict(),
            "vae": None if self.vae is None else self.vae.to_dict(),
            "scheduler": dict(self.scheduler),
            "noise_aug_scheduler": dict(self.noise_aug_scheduler),
            "space": self.space, "scale": self.scale,
            "max_noise_level": self.max_noise_level, "noise_level": self.noise_level,
            "upsample_method": self.upsample_method}

  @classmethod
  def from_dict(cls, d: dict[str, Any], source: str = "config") -> "UpsamplerConfig":
    """From `to_dict`'s JSON object; what does not fit is named with `source`."""
    if not isinstance(d.get("unet"), dict):
      raise ValueError(f"{source}: 'unet' must be an object (the UNet's config), got "
                       f"{d.get('unet')!r:.100}")
    d = dict(config_base.check_fields(cls, d, source))
    unet = UNetConfig.from_dict(d.pop("unet"), source)
    temporal, vae = d.pop("temporal", None), d.pop("vae", None)
    return cls(unet=unet,
               temporal=None if temporal is None else TemporalConfig.from_dict(temporal, source),
               vae=None if vae is None else VAEConfig.from_dict(vae, source), **d).validate()

  def replace(self, **kw) -> "UpsamplerConfig":
    return dataclasses.replace(self, **kw)


def unet_config(architecture: dict[str, Any], channels: int, aug_levels: int) -> UNetConfig:
  """The upsampler UNet: `architecture` (UNetConfig fields without in/out channels and
  class embeddings) with in = 2 * channels (x_t ++ c_s), out = channels and one class
  embedding per augmentation level."""
  derived = {"in_channels", "out_channels", "num_class_embeds"}
  given = derived & set(architecture)
  if given:
    raise ValueError(f"config.unet must not set {sorted(given)}: the upsampler derives them")
  return UNetConfig.from_config({**dict(architecture), "in_channels": 2 * channels,
                                 "out_channels": channels, "num_class_embeds": aug_levels},
                                "config.unet").validate()


# --- conditioning maths (shared by training and sampling) ----------------------------

def to_float(video: jax.Array) -> jax.Array:
  """uint8 in [0, 255] -> float32 in [-1, 1]; float input is returned as float32."""
  if jnp.issubdtype(video.dtype, jnp.integer):
    return video.astype(jnp.float32) / 127.5 - 1.0
  return video.astype(jnp.float32)


def area_downsample(x: jax.Array, factor: int) -> jax.Array:
  """Mean over factor x factor blocks: (..., H, W, C) -> (..., H/factor, W/factor, C)."""
  *lead, h, w, c = x.shape
  if h % factor or w % factor:
    raise ValueError(f"area_downsample: {h}x{w} is not divisible by {factor}")
  x = x.reshape((*lead, h // factor, factor, w // factor, factor, c))
  return x.mean(axis=(-4, -2))


def upsample(x: jax.Array, factor: int, method: str) -> jax.Array:
  """(..., h, w, C) -> (..., factor h, factor w, C) by 'nearest' (pixel replication)
  or 'bilinear' (half-pixel centres, edge-clamped, as torch's align_corners=False)."""
  if method == "nearest":
    return jnp.repeat(jnp.repeat(x, factor, axis=-3), factor, axis=-2)
  if method == "bilinear":
    *lead, h, w, c = x.shape
    return jax.image.resize(x, (*lead, h * factor, w * factor, c), "linear")
  raise ValueError(f"upsample method must be one of {UPSAMPLE_METHODS}, got {method!r}")


def encode(vae_config: VAEConfig, vae_params: dict, video: jax.Array,
           key: Optional[jax.Array]) -> jax.Array:
  """Frames in [-1, 1] (B, T, H, W, 3) -> scaled latents (B, T, H/f, W/f, C), frame by
  frame; a posterior sample with `key`, else the mean."""
  b, t = video.shape[:2]
  z = AutoencoderKL(vae_config).apply(
      {"params": vae_params}, video.reshape((b * t,) + video.shape[2:]), key,
      method=AutoencoderKL.encode_latents)
  return z.reshape((b, t) + z.shape[1:])


def decode(vae_config: VAEConfig, vae_params: dict, latents: jax.Array) -> jax.Array:
  """Scaled latents (B, T, h, w, C) -> frames in about [-1, 1] (B, T, h f, w f, 3)."""
  b, t = latents.shape[:2]
  x = AutoencoderKL(vae_config).apply(
      {"params": vae_params}, latents.reshape((b * t,) + latents.shape[2:]),
      method=AutoencoderKL.decode_latents)
  return x.reshape((b, t) + x.shape[1:])


def conditioning(config: UpsamplerConfig, vae_params: Optional[dict],
                 lowres: jax.Array) -> jax.Array:
  """Conditioning c on the model's grid: low-res frames in about [-1, 1] (B, T, h, w, 3),
  already noise-augmented, -> upsampled (B, T, scale h, scale w, 3), or its VAE latent
  (posterior mean, so c is a deterministic function of its input) in latent space."""
  up = upsample(lowres, config.scale, config.upsample_method)
  if config.space == "latent":
    return encode(config.vae, vae_params, up, None)
  return up


def model_input(x_t: jax.Array, cond: jax.Array) -> jax.Array:
  """The UNet input: x_t and the noise-augmented conditioning, (B, T, H, W, C) each ->
  (B, T, H, W, 2C)."""
  return jnp.concatenate([x_t, cond.astype(x_t.dtype)], axis=-1)


# --- parameters ----------------------------------------------------------------------

def _unet_inputs(config: UpsamplerConfig) -> tuple:
  """Example UNet inputs; two frames for a video model so every temporal layer exists.
  No text context: attn2 of every transformer block attends to its own tokens."""
  size = 2 ** (config.unet.num_levels - 1)
  frames = (2,) if config.temporal is not None else ()
  x = jnp.zeros((1, *frames, size, size, config.unet.in_channels), jnp.float32)
  t = jnp.zeros((1,), jnp.int32)
  return x, t, None, jnp.zeros((1,), jnp.int32)


def abstract_params(config: UpsamplerConfig, unet: Optional[UNet] = None) -> dict:
  """{'unet'[, 'vae']} as ShapeDtypeStructs; nothing allocated."""
  unet = unet or config.unet_module()
  out = {"unet": params_lib.abstract_params(unet, *_unet_inputs(config))}
  if config.space == "latent":
    out["vae"] = params_lib.abstract_params(AutoencoderKL(config.vae),
                                            *vae_lib.example_inputs(config.vae))
  return out


def logical_axes(config: UpsamplerConfig, unet: Optional[UNet] = None) -> dict:
  """The same tree of logical-axis PartitionSpecs."""
  unet = unet or config.unet_module()
  out = {"unet": params_lib.logical_axes(unet, *_unet_inputs(config))}
  if config.space == "latent":
    out["vae"] = params_lib.logical_axes(AutoencoderKL(config.vae),
                                         *vae_lib.example_inputs(config.vae))
  return out


def init_unet_params(config: UpsamplerConfig, seed: int, where=None) -> dict:
  """Host-initialised UNet params (only the leaves `where(path)` selects, if given)."""
  return params_lib.init_params(config.unet_module(), seed, *_unet_inputs(config),
                                where=where)


# --- on disk ---------------------------------------------------------------------------

@dataclasses.dataclass
class PretrainedUpsampler:
  """An upsampler's config and parameters {'unet'[, 'vae']} (host arrays)."""
  config: UpsamplerConfig
  params: dict
  source: str = ""
  training: dict = dataclasses.field(default_factory=dict)  # `pretrained.training_record`


def save(out_dir: str | Path, model: PretrainedUpsampler) -> Path:
  """Writes `model` to `out_dir` (created; an existing non-empty folder is an error).
  The folder appears only complete (`pretrained.write_folder`): a failed write left an
  index without weights, which loaded as a config and blocked a retry."""
  out_dir = pretrained.check_new_folder(out_dir)
  model.config.validate()
  expected = {"unet", "vae"} if model.config.space == "latent" else {"unet"}
  if set(model.params) != expected:
    raise ValueError(f"upsampler params must hold exactly {sorted(expected)}, got "
                     f"{sorted(model.params)}")
  index = {"format": FORMAT, "format_version": FORMAT_VERSION, "source": model.source,
           **model.config.to_dict()}
  if model.training:
    index["training"] = model.training

  def write(folder: Path) -> None:
    folder.mkdir()
    (folder / INDEX).write_text(json.dumps(index, indent=2, sort_keys=True))
    pretrained.write_params(folder / "params", model.params)

  out_dir.parent.mkdir(parents=True, exist_ok=True)
  pretrained.write_folder(out_dir, write)
  return out_dir


def load(model_dir: str | Path, read_params: bool = True) -> PretrainedUpsampler:
  """Reads an upsampler folder written by `save` (params as host NumPy arrays; {}
  without `read_params`: the config alone, for a setup that allocates nothing)."""
  model_dir = Path(model_dir).absolute()
  path = model_dir / INDEX
  if not path.is_file():
    raise FileNotFoundError(f"{path}: missing; {model_dir} is not a videoldm-jax upsampler "
                            "(the upsampler stage exports one)")
  index = pretrained.read_index(path, FORMAT, FORMAT_VERSION)
  del index["format"]
  index.pop("format_version", None)
  source, training = index.pop("source", ""), index.pop("training", {})
  config = UpsamplerConfig.from_dict(index, str(path))
  params = pretrained.read_params(model_dir / "params") if read_params else {}
  return PretrainedUpsampler(config, params, source=source, training=training)
