"""AutoencoderKL (the f8 KL autoencoder of Stable Diffusion) in Flax Linen, channels-last.

Module names follow diffusers' `AutoencoderKL` (encoder/down_blocks_i/resnets_j,
encoder/mid_block/attentions_0/to_q, quant_conv, ...). Images are (B, H, W, 3) in
[-1, 1]; latents are (B, H/f, W/f, latent_channels) with f = 2 ** (levels - 1).
"""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp

from videoldm_jax.models import layers
from videoldm_jax.models.attention import dot_product_attention
from videoldm_jax.models.config_base import JsonConfig
from videoldm_jax.models.unet import ResBlock


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


_EPS = 1e-6  # GroupNorm epsilon of the autoencoder (the UNet uses 1e-5)


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
  """ResBlock, attention, ResBlock at the lowest resolution."""
  config: VAEConfig
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    c = self.config
    channels = c.block_out_channels[-1]
    x = ResBlock(channels, c.norm_num_groups, _EPS, dtype=self.dtype, name="resnets_0")(x)
    if c.mid_block_add_attention:
      x = VAEAttention(c.norm_num_groups, dtype=self.dtype, name="attentions_0")(x)
    return ResBlock(channels, c.norm_num_groups, _EPS, dtype=self.dtype, name="resnets_1")(x)


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
    return layers.conv2d(x.shape[-1], 3, name="conv", dtype=self.dtype)(
        layers.upsample_nearest_2x(x))


class _Level(nn.Module):
  """ResBlocks of one encoder/decoder level plus its resampler."""
  config: VAEConfig
  channels: int
  num_resnets: int
  resample: str | None  # "down", "up" or None
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    for j in range(self.num_resnets):
      x = ResBlock(self.channels, self.config.norm_num_groups, _EPS, dtype=self.dtype,
                   name=f"resnets_{j}")(x)
    if self.resample is not None:
      name = "downsamplers_0" if self.resample == "down" else "upsamplers_0"
      x = _Sampler(self.resample == "down", dtype=self.dtype, name=name)(x)
    return x


class Encoder(nn.Module):
  """(B, H, W, 3) -> (B, H/f, W/f, 2 * latent_channels) posterior moments."""
  config: VAEConfig
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    c = self.config
    n = len(c.block_out_channels)
    x = layers.conv2d(c.block_out_channels[0], 3, name="conv_in", dtype=self.dtype)(x)
    for i, ch in enumerate(c.block_out_channels):
      x = _Level(c, ch, c.layers_per_block, "down" if i < n - 1 else None,
                 dtype=self.dtype, name=f"down_blocks_{i}")(x)
    x = VAEMidBlock(c, dtype=self.dtype, name="mid_block")(x)
    x = nn.silu(layers.group_norm(c.norm_num_groups, _EPS, name="conv_norm_out",
                                  dtype=self.dtype)(x))
    return layers.conv2d(2 * c.latent_channels, 3, name="conv_out", dtype=self.dtype)(x)


class Decoder(nn.Module):
  """(B, h, w, latent_channels) -> (B, h*f, w*f, out_channels)."""
  config: VAEConfig
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, z: jax.Array) -> jax.Array:
    c = self.config
    n = len(c.block_out_channels)
    x = layers.conv2d(c.block_out_channels[-1], 3, name="conv_in", dtype=self.dtype)(z)
    x = VAEMidBlock(c, dtype=self.dtype, name="mid_block")(x)
    for i, ch in enumerate(reversed(c.block_out_channels)):
      x = _Level(c, ch, c.layers_per_block + 1, "up" if i < n - 1 else None,
                 dtype=self.dtype, name=f"up_blocks_{i}")(x)
    x = nn.silu(layers.group_norm(c.norm_num_groups, _EPS, name="conv_norm_out",
                                  dtype=self.dtype)(x))
    return layers.conv2d(c.out_channels, 3, name="conv_out", dtype=self.dtype)(x)


class AutoencoderKL(nn.Module):
  """KL autoencoder. `__call__` encodes and decodes the posterior mean (used for init).

  Use `apply(..., method=AutoencoderKL.encode / decode / encode_latents /
  decode_latents)`.
  """
  config: VAEConfig
  dtype: jnp.dtype = jnp.float32

  def setup(self):
    c = self.config
    self.encoder = Encoder(c, dtype=self.dtype)
    self.decoder = Decoder(c, dtype=self.dtype)
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

  def decode(self, z: jax.Array) -> jax.Array:
    """Unscaled latents (B, h, w, latent_ch) -> images (B, h*f, w*f, out_ch)."""
    z = z.astype(self.dtype)
    if self.config.use_post_quant_conv:
      z = self.post_quant_conv(z)
    return self.decoder(z).astype(jnp.float32)

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

  def __call__(self, x_BxHxWx3: jax.Array) -> jax.Array:
    mean, _ = self.encode(x_BxHxWx3)
    return self.decode(mean)


def kl_divergence(mean: jax.Array, logvar: jax.Array) -> jax.Array:
  """KL(N(mean, exp(logvar)) || N(0, 1)) summed over non-batch dims, (B, ...) -> (B,)."""
  kl = 0.5 * (jnp.square(mean) + jnp.exp(logvar) - 1.0 - logvar)
  return jnp.sum(kl.reshape(kl.shape[0], -1), axis=-1)


def example_inputs(config: VAEConfig, batch: int = 1) -> tuple:
  """Zero images of the right shape for `AutoencoderKL.init` / `jax.eval_shape`."""
  size = config.downsample_factor
  return (jnp.zeros((batch, size, size, config.in_channels), jnp.float32),)
