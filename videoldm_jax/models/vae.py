"""AutoencoderKL (the f8 KL autoencoder of Stable Diffusion) in Flax Linen, channels-last,
and its video decoder (Video LDM Sec. 3.1, "temporal autoencoder fine-tuning").

Module names follow diffusers' `AutoencoderKL` (encoder/down_blocks_i/resnets_j,
encoder/mid_block/attentions_0/to_q, quant_conv, ...). Images are (B, H, W, 3) in
[-1, 1]; latents are (B, H/f, W/f, latent_channels) with f = 2 ** (levels - 1).

With `temporal=VAETemporalConfig(...)` the decoder becomes a video decoder (as sgm's
`VideoDecoder`, the same authors' code): a temporal ResBlock `temporal_resnets_j`
after every decoder ResBlock (mid block and up blocks) and a Conv3d
`temporal_conv_out` after the output conv. Frames go through the spatial layers as a
batch of B*T images; the encoder stays per frame. Every temporal module's name starts
with `temporal_`, so `partition.split` separates them from the image autoencoder,
whose parameter tree is unchanged.

Mixing convention of the decoder (sgm's VideoResBlock / diffusers' TemporalDecoder,
the OPPOSITE of the UNet's in models/temporal.py): alpha = sigmoid(mix_factor) weights
the TEMPORAL branch,  out = alpha * x_temporal + (1 - alpha) * x_spatial,  with
mix_factor initialised to 0 (alpha = 0.5). The per-frame image-only override sets
alpha = 0 after the sigmoid, i.e. the spatial branch exactly; so does
mix_factor = -inf. Then the video decoder is the image decoder bitwise.
"""

import dataclasses
from typing import Optional

import einops
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from videoldm_jax.models import layers
from videoldm_jax.models.attention import dot_product_attention
from videoldm_jax.models.config_base import JsonConfig
from videoldm_jax.models.temporal import Frames, conv3d, mix_param
from videoldm_jax.models.unet import ResBlock, with_remat


@dataclasses.dataclass(frozen=True)
class VAEConfig(JsonConfig):
  """Hyper-parameters of the KL autoencoder. Defaults are Stable Diffusion's f8 VAE."""
  in_channels: int = 3
  out_channels: int = 3
  block_out_channels: tuple[int, ...] = (128, 256, 512, 512)
  layers_per_block: int = 2
  latent_channels: int = 4
  norm_num_groups: int = 32
  # Latents seen by the diffusion model are scaling_factor * (z - shift_factor).
  scaling_factor: float = 0.18215
  shift_factor: float = 0.0
  use_quant_conv: bool = True
  use_post_quant_conv: bool = True
  mid_block_add_attention: bool = True

  @property
  def downsample_factor(self) -> int:
    return 2 ** (len(self.block_out_channels) - 1)


# The parameters that decide an autoencoder's latents: a fine-tuned or video decoder
# (the decoder stage trains only the decoder) keeps the latent space.
LATENT_PARTS = ("encoder", "quant_conv")


def latent_params(vae_params: dict) -> dict:
  """The `LATENT_PARTS` of a VAE parameter tree."""
  return {k: vae_params[k] for k in LATENT_PARTS if k in vae_params}


@dataclasses.dataclass(frozen=True)
class VAETemporalConfig(JsonConfig):
  """The temporal layers of the video decoder, and how they start."""
  conv_kernel: tuple[int, int, int] = (3, 1, 1)      # Conv3d of the temporal ResBlocks
  out_conv_kernel: tuple[int, int, int] = (3, 1, 1)  # Conv3d after the output conv
  # Initial logit of every mixing site; alpha = sigmoid(mix_init) weights the temporal
  # branch (sgm initialises its decoder's merge factor to 0: alpha = 0.5).
  mix_init: float = 0.0

  def validate(self, where: str = "VAETemporalConfig") -> "VAETemporalConfig":
    """self, or ValueError naming `where`.field (the config section it came from, e.g.
    config.vae_temporal)."""
    for name in ("conv_kernel", "out_conv_kernel"):
      k = getattr(self, name)
      if len(k) != 3 or any(int(v) % 2 == 0 for v in k):
        raise ValueError(f"{where}.{name} must be three odd sizes, got {k}")
    return self


_EPS = 1e-6  # GroupNorm epsilon of the autoencoder (the UNet uses 1e-5)


def mix_temporal(x_spatial: jax.Array, x_temporal: jax.Array, m: jax.Array,
                 image_only: Optional[jax.Array]) -> jax.Array:
  """alpha * x_temporal + (1 - alpha) * x_spatial, alpha = sigmoid(m), on (N, ...).

  The decoder's convention (alpha weights the temporal branch, see the module doc).
  image_only (N,) bool sets alpha = 0 for those frames AFTER the sigmoid: the result is
  then x_spatial bitwise (0 * x + 1 * y = y for finite x).
  """
  alpha = jax.nn.sigmoid(m.astype(jnp.float32))
  if image_only is not None:
    alpha = jnp.where(image_only.reshape((-1,) + (1,) * (x_spatial.ndim - 1)), 0.0, alpha)
  # In float32, cast once (see models/temporal.py `mix`).
  out = alpha * x_temporal.astype(jnp.float32) + (1 - alpha) * x_spatial.astype(jnp.float32)
  return out.astype(x_spatial.dtype)


@dataclasses.dataclass(frozen=True)
class _DiracInit(layers.Init):
  """Identity kernel of a (t, h, w, C, C) conv: 1 at the centre tap from channel i to i.

  The output Conv3d starts as the identity, so that at init the video decoder computes
  the image decoder's output (the temporal ResBlocks are identities too) and
  fine-tuning starts from it.
  """
  kind: str = "dirac"

  def host(self, rng, shape) -> np.ndarray:
    del rng
    k = np.zeros(shape, np.float32)
    centre = tuple(s // 2 for s in shape[:-2])
    n = min(shape[-2], shape[-1])
    k[centre + (np.arange(n), np.arange(n))] = 1.0
    return k

  def __call__(self, key, shape, dtype=jnp.float32):
    return jnp.asarray(self.host(None, shape), dtype)


class TemporalResBlock3D(nn.Module):
  """sgm's `time_stack` of the video decoder: GroupNorm-SiLU-Conv3d, GroupNorm-SiLU-
  Conv3d (zero-initialised, so the block starts as the identity), identity skip; no
  timestep embedding. Then the blend with its input (decoder convention).

  (B*T, H, W, C) -> (B*T, H, W, C); GroupNorm statistics pool over (T, H, W) and the
  channel group: the video is the instance.
  """
  config: VAETemporalConfig
  norm_num_groups: int = 32
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, frames: Frames) -> jax.Array:
    c, channels = self.config, x.shape[-1]
    v = einops.rearrange(x, "(b t) h w c -> b t h w c", t=frames.num_frames)
    gn = lambda name: layers.group_norm(self.norm_num_groups, _EPS, name=name,
                                        dtype=self.dtype)
    h = conv3d(channels, c.conv_kernel, init=layers.FAN_IN_NORMAL, name="conv1",
               dtype=self.dtype)(nn.silu(gn("norm1")(v)))
    h = conv3d(channels, c.conv_kernel, init=layers.ZEROS, name="conv2", dtype=self.dtype)(
        nn.silu(gn("norm2")(h)))
    x_temporal = einops.rearrange(v + h, "b t h w c -> (b t) h w c")
    return mix_temporal(x, x_temporal, mix_param(self, c.mix_init), frames.image_only)


class TemporalConvOut(nn.Module):
  """The Conv3d over the decoder's RGB output (sgm's `AE3DConv.time_mix_conv`), blended
  with its input like the ResBlocks so that the image decoder stays recoverable.
  Not weight-compatible with released temporal decoders (sgm / SVD,
  diffusers' `time_conv_out`), which apply the Conv3d unblended (mix_factor = +inf
  here) and use GroupNorm eps 1e-5 in their temporal ResBlocks (1e-6 here); no
  converter for them exists.

  (B*T, H, W, C) -> (B*T, H, W, C).
  """
  config: VAETemporalConfig
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, frames: Frames) -> jax.Array:
    c = self.config
    v = einops.rearrange(x, "(b t) h w c -> b t h w c", t=frames.num_frames)
    y = conv3d(x.shape[-1], c.out_conv_kernel, init=_DiracInit(), name="conv",
               dtype=self.dtype)(v)
    x_temporal = einops.rearrange(y, "b t h w c -> (b t) h w c")
    return mix_temporal(x, x_temporal, mix_param(self, c.mix_init), frames.image_only)


def _resnet(config: VAEConfig, temporal: Optional[VAETemporalConfig], channels: int, j: int,
            x: jax.Array, frames: Optional[Frames], dtype) -> jax.Array:
  """Spatial `resnets_j`, then (video decoder) `temporal_resnets_j`. Call from a compact
  module: the blocks become its children."""
  x = ResBlock(channels, config.norm_num_groups, _EPS, dtype=dtype, name=f"resnets_{j}")(x)
  if temporal is not None and frames is not None:
    x = TemporalResBlock3D(temporal, config.norm_num_groups, dtype=dtype,
                           name=f"temporal_resnets_{j}")(x, frames)
  return x


class VAEAttention(nn.Module):
  """Single-head self-attention over H*W with a GroupNorm in front, residual."""
  norm_num_groups: int
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x_BxHxWxC: jax.Array) -> jax.Array:
    b, h, w, c = x_BxHxWxC.shape
    y = layers.group_norm(self.norm_num_groups, _EPS, name="group_norm",
                          dtype=self.dtype)(x_BxHxWxC).reshape(b, h * w, c)
    proj = lambda name, axes: layers.dense(c, axes, name=name, dtype=self.dtype)
    q, k, v = (proj(n, ("embed", "heads"))(y) for n in ("to_q", "to_k", "to_v"))
    y = proj("to_out_0", ("heads", "embed"))(dot_product_attention(q, k, v, num_heads=1))
    return x_BxHxWxC + y.reshape(b, h, w, c)


class VAEMidBlock(nn.Module):
  """ResBlock, attention, ResBlock at the lowest resolution (each ResBlock followed by
  a temporal one in the video decoder; the attention stays spatial, as sgm's
  "conv-only" time mode)."""
  config: VAEConfig
  temporal: Optional[VAETemporalConfig] = None
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, frames: Optional[Frames] = None) -> jax.Array:
    c, tc = self.config, self.temporal
    channels = c.block_out_channels[-1]
    x = _resnet(c, tc, channels, 0, x, frames, self.dtype)
    if c.mid_block_add_attention:
      x = VAEAttention(c.norm_num_groups, dtype=self.dtype, name="attentions_0")(x)
    return _resnet(c, tc, channels, 1, x, frames, self.dtype)


class _Sampler(nn.Module):
  """`downsamplers_0/conv` or `upsamplers_0/conv` (names as in the checkpoints)."""
  down: bool
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    if self.down:
      # Asymmetric padding (right/bottom only) then a valid stride-2 conv, as SD's VAE.
      x = jnp.pad(x, ((0, 0), (0, 1), (0, 1), (0, 0)))
      return layers.conv2d(x.shape[-1], 3, stride=2, padding="VALID", name="conv",
                           dtype=self.dtype)(x)
    return layers.UpsampleConv(x.shape[-1], name="conv", dtype=self.dtype)(x)


class _Level(nn.Module):
  """ResBlocks of one encoder/decoder level plus its resampler."""
  config: VAEConfig
  channels: int
  num_resnets: int
  resample: str | None  # "down", "up" or None
  temporal: Optional[VAETemporalConfig] = None
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, frames: Optional[Frames] = None) -> jax.Array:
    for j in range(self.num_resnets):
      x = _resnet(self.config, self.temporal, self.channels, j, x, frames, self.dtype)
    if self.resample is not None:
      name = "downsamplers_0" if self.resample == "down" else "upsamplers_0"
      x = _Sampler(self.resample == "down", dtype=self.dtype, name=name)(x)
    return x


class Encoder(nn.Module):
  """(B, H, W, 3) -> (B, H/f, W/f, 2 * latent_channels) posterior moments.

  remat_policy: `unet.REMAT_POLICIES`, applied per level and to the middle block.
  """
  config: VAEConfig
  dtype: jnp.dtype = jnp.float32
  remat_policy: str = "none"

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    c = self.config
    n = len(c.block_out_channels)
    x = layers.conv2d(c.block_out_channels[0], 3, name="conv_in", dtype=self.dtype)(x)
    for i, ch in enumerate(c.block_out_channels):
      x = with_remat(_Level, self.remat_policy)(
          c, ch, c.layers_per_block, "down" if i < n - 1 else None, dtype=self.dtype,
          name=f"down_blocks_{i}")(x)
    x = with_remat(VAEMidBlock, self.remat_policy)(c, dtype=self.dtype, name="mid_block")(x)
    x = nn.silu(layers.group_norm(c.norm_num_groups, _EPS, name="conv_norm_out",
                                  dtype=self.dtype)(x))
    return layers.conv2d(2 * c.latent_channels, 3, name="conv_out", dtype=self.dtype)(x)


class Decoder(nn.Module):
  """(B*T, h, w, latent_channels) -> (B*T, h*f, w*f, out_channels).

  `features` and `head` split it before its last layers (for the adaptive GAN weight,
  which needs the gradient w.r.t. the last layer's kernel); __call__ is head(features).
  frames: how the batch folds into videos; None (or an image decoder) decodes every
  frame as an image, skipping the temporal layers. remat_policy: as `Encoder`'s.
  """
  config: VAEConfig
  temporal: Optional[VAETemporalConfig] = None
  dtype: jnp.dtype = jnp.float32
  remat_policy: str = "none"

  def setup(self):
    c, tc = self.config, self.temporal
    n = len(c.block_out_channels)
    self.conv_in = layers.conv2d(c.block_out_channels[-1], 3, name="conv_in",
                                 dtype=self.dtype)
    self.mid_block = with_remat(VAEMidBlock, self.remat_policy)(c, tc, dtype=self.dtype,
                                                           name="mid_block")
    level = with_remat(_Level, self.remat_policy)
    self.up_blocks = [level(c, ch, c.layers_per_block + 1, "up" if i < n - 1 else None,
                            tc, dtype=self.dtype, name=f"up_blocks_{i}")
                      for i, ch in enumerate(reversed(c.block_out_channels))]
    self.conv_norm_out = layers.group_norm(c.norm_num_groups, _EPS, name="conv_norm_out",
                                           dtype=self.dtype)
    self.conv_out = layers.conv2d(c.out_channels, 3, name="conv_out", dtype=self.dtype)
    if tc is not None:
      self.temporal_conv_out = TemporalConvOut(tc, dtype=self.dtype, name="temporal_conv_out")

  def features(self, z: jax.Array, frames: Optional[Frames] = None) -> jax.Array:
    """(B*T, h, w, latent_ch) -> the input of `conv_out`, (B*T, H, W, C0)."""
    x = self.mid_block(self.conv_in(z), frames)
    for level in self.up_blocks:
      x = level(x, frames)
    return nn.silu(self.conv_norm_out(x))

  def head(self, x: jax.Array, frames: Optional[Frames] = None) -> jax.Array:
    """`conv_out` (+ `temporal_conv_out`): (B*T, H, W, C0) -> (B*T, H, W, out_ch)."""
    x = self.conv_out(x)
    if self.temporal is not None and frames is not None:
      x = self.temporal_conv_out(x, frames)
    return x

  def __call__(self, z: jax.Array, frames: Optional[Frames] = None) -> jax.Array:
    return self.head(self.features(z, frames), frames)


class AutoencoderKL(nn.Module):
  """KL autoencoder; with `temporal` set, its decoder is the video decoder.

  Use `apply(..., method=AutoencoderKL.encode / decode / encode_latents /
  decode_latents / decode_video / decode_video_latents / decode_features /
  decode_head)`. `__call__` encodes and decodes the posterior mean (used for init):
  images (B, H, W, 3) -> (B, H, W, 3), or videos (B, T, H, W, 3) -> (B, T, H, W, 3)
  (decoded as videos when `temporal` is set).
  """
  config: VAEConfig
  temporal: Optional[VAETemporalConfig] = None
  dtype: jnp.dtype = jnp.float32
  # Training memory (the autoencoder and decoder stages' train.remat_policy): see
  # unet.REMAT_POLICIES; parameter paths are the same for every policy.
  remat_policy: str = "none"

  def setup(self):
    c = self.config
    if self.temporal is not None:
      self.temporal.validate()
    self.encoder = Encoder(c, dtype=self.dtype, remat_policy=self.remat_policy)
    self.decoder = Decoder(c, self.temporal, dtype=self.dtype,
                           remat_policy=self.remat_policy)
    if c.use_quant_conv:
      self.quant_conv = layers.conv2d(2 * c.latent_channels, 1, name="quant_conv",
                                      dtype=self.dtype)
    if c.use_post_quant_conv:
      self.post_quant_conv = layers.conv2d(c.latent_channels, 1, name="post_quant_conv",
                                           dtype=self.dtype)

  def encode(self, x_BxHxWx3: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Images in [-1, 1] -> posterior (mean, logvar), each (B, H/f, W/f, latent_ch)."""
    moments = self.encoder(x_BxHxWx3.astype(self.dtype))
    if self.config.use_quant_conv:
      moments = self.quant_conv(moments)
    mean, logvar = jnp.split(moments.astype(jnp.float32), 2, axis=-1)
    return mean, jnp.clip(logvar, -30.0, 20.0)

  def decode_features(self, z: jax.Array, frames: Optional[Frames] = None) -> jax.Array:
    """Unscaled latents (B*T, h, w, latent_ch) -> the decoder's features before its last
    layers, (B*T, h*f, w*f, C0); `decode_head` finishes. `frames` as in `decode`."""
    z = z.astype(self.dtype)
    if self.config.use_post_quant_conv:
      z = self.post_quant_conv(z)
    return self.decoder.features(z, frames)

  def decode_head(self, features: jax.Array, frames: Optional[Frames] = None) -> jax.Array:
    """(B*T, H, W, C0) -> (B*T, H, W, out_ch): `decoder/conv_out` and (video decoder)
    `decoder/temporal_conv_out`, the layers whose kernel the adaptive GAN weight uses."""
    return self.decoder.head(features, frames).astype(jnp.float32)

  def decode(self, z: jax.Array, frames: Optional[Frames] = None) -> jax.Array:
    """Unscaled latents (B*T, h, w, latent_ch) -> images (B*T, h*f, w*f, out_ch).

    frames: Frames(num_frames=T, image_only=(B*T,) bool or None) folds the batch into
    B videos of T frames for the temporal layers; None decodes every frame as an image
    (the spatial decoder alone, as the image autoencoder).
    """
    return self.decode_head(self.decode_features(z, frames), frames)

  def decode_video(self, z_BxTxhxwxC: jax.Array,
                   image_only_BxT: Optional[jax.Array] = None) -> jax.Array:
    """Unscaled video latents (B, T, h, w, C) -> videos (B, T, H, W, out_ch), through the
    temporal layers (if any); image_only (B, T) bool frames use the spatial branch."""
    b, t = z_BxTxhxwxC.shape[:2]
    if image_only_BxT is not None and image_only_BxT.shape != (b, t):
      # A (T, B) array reshaped silently, flagging other frames than meant (as the UNet).
      raise ValueError(f"AutoencoderKL.decode_video image_only: expected (B, T) = "
                       f"{(b, t)}, got {image_only_BxT.shape}")
    image_only = None if image_only_BxT is None else image_only_BxT.reshape(b * t)
    x = self.decode(z_BxTxhxwxC.reshape((b * t,) + z_BxTxhxwxC.shape[2:]),
                    Frames(t, image_only))
    return x.reshape((b, t) + x.shape[1:])

  def encode_latents(self, x_BxHxWx3: jax.Array, key: jax.Array | None = None) -> jax.Array:
    """Images -> diffusion latents: a posterior sample (or the mean if key is None),
    shifted and scaled by the config's shift/scaling factors."""
    mean, logvar = self.encode(x_BxHxWx3)
    z = mean
    if key is not None:
      z = mean + jnp.exp(0.5 * logvar) * jax.random.normal(key, mean.shape, mean.dtype)
    return (z - self.config.shift_factor) * self.config.scaling_factor

  def decode_latents(self, z_scaled: jax.Array) -> jax.Array:
    """Diffusion latents -> images (inverse of the scaling in `encode_latents`)."""
    return self.decode(z_scaled / self.config.scaling_factor + self.config.shift_factor)

  def decode_video_latents(self, z_scaled_BxTxhxwxC: jax.Array,
                           image_only_BxT: Optional[jax.Array] = None) -> jax.Array:
    """Diffusion video latents (B, T, h, w, C) -> videos (B, T, H, W, out_ch) in [-1, 1]
    (roughly), through the video decoder's temporal layers."""
    return self.decode_video(
        z_scaled_BxTxhxwxC / self.config.scaling_factor + self.config.shift_factor,
        image_only_BxT)

  def __call__(self, x: jax.Array) -> jax.Array:
    if x.ndim == 5:
      b, t = x.shape[:2]
      mean, _ = self.encode(x.reshape((b * t,) + x.shape[2:]))
      return self.decode_video(mean.reshape((b, t) + mean.shape[1:]))
    mean, _ = self.encode(x)
    return self.decode(mean)


def kl_divergence(mean: jax.Array, logvar: jax.Array) -> jax.Array:
  """KL(N(mean, exp(logvar)) || N(0, 1)) summed over non-batch dims, (B, ...) -> (B,)."""
  kl = 0.5 * (jnp.square(mean) + jnp.exp(logvar) - 1.0 - logvar)
  return jnp.sum(kl.reshape(kl.shape[0], -1), axis=-1)


def example_inputs(config: VAEConfig, batch: int = 1, video: bool = False) -> tuple:
  """Zero inputs of the right shape for `AutoencoderKL.init` / `jax.eval_shape`:
  images (batch, f, f, C), or with `video` two-frame clips (batch, 2, f, f, C), which
  a video decoder needs for its temporal layers to be created."""
  size = config.downsample_factor
  shape = (batch, 2, size, size, config.in_channels) if video else (
      batch, size, size, config.in_channels)
  return (jnp.zeros(shape, jnp.float32),)
