"""Patch discriminators for autoencoder training (channels-last).

`PatchDiscriminator`: taming-transformers' NLayerDiscriminator (pix2pix PatchGAN), used
by Stable Diffusion's KL autoencoder: conv k4 s2 + LeakyReLU(0.2), then `num_layers - 1`
more stride-2 convs and one stride-1 conv, each followed by a normalisation and
LeakyReLU(0.2), and a final conv to one logit per patch. (B, H, W, 3) -> (B, H', W', 1).

`VideoPatchDiscriminator`: the same network with 3-D convolutions (Video LDM's temporal
discriminator for the decoder fine-tuning): Conv3d k=4 s=2 over (T, H, W), so each
logit judges a space-time patch and the network sees motion: it is not equivariant to
reordering frames, unlike a per-frame 2-D discriminator. (B, T, H, W, 3) ->
(B, T', H', W', 1).

Normalisation: GroupNorm, not taming's BatchNorm. Batch statistics would be state
outside the parameter tree (a mutable collection the generic train step does not
carry), would differ between the real and the fake pass of one step, and would depend
on how the batch is sharded over devices; GroupNorm normalises each example on its
own, so the logits are a pure function of (params, input) on any mesh.

Other deliberate differences from taming (otherwise the same function: kernel 4,
padding 1, channels base_channels * min(2^n, max_mult), bias only where no norm
follows; tests/test_video_decoder.py checks it against a torch rebuild of taming's):
- Conv biases start at zero (taming leaves PyTorch's default uniform init).
- 3-D only: the stride-1 layers (the last normalised conv and `conv_out`) use a
  3-tap time kernel, 'same' padded, not 4 taps, so time is not cut by one frame per
  layer; the stride-2 layers pad time 'SAME' (ceil(T / 2) outputs), which equals
  padding 1 for even T and still gives one output for T = 1 or 2 frames.
"""

import dataclasses
from typing import ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp

from videoldm_jax.models import layers
from videoldm_jax.models.config_base import JsonConfig

# DCGAN/taming initialisation of the convolutions: N(0, 0.02^2).
_CONV_INIT = layers.Init("normal", 0.02)


@dataclasses.dataclass(frozen=True)
class DiscriminatorConfig(JsonConfig):
  """Width and depth of a patch discriminator (defaults: taming's, as SD's VAE)."""
  in_channels: int = 3
  base_channels: int = 64   # channels of the first conv (taming's ndf)
  num_layers: int = 3       # stride-2 convolutions (taming's n_layers)
  max_mult: int = 8         # channel multiplier cap: base_channels * min(2^n, max_mult)
  norm_num_groups: int = 32

  def channels(self, n: int) -> int:
    return self.base_channels * min(2 ** n, self.max_mult)

  def validate(self, where: str = "DiscriminatorConfig") -> "DiscriminatorConfig":
    """self, or ValueError naming `where`.field (the config section it came from, e.g.
    config.discriminator)."""
    for name in ("in_channels", "base_channels", "num_layers", "max_mult",
                 "norm_num_groups"):
      # num_layers = 0 would leave out the normalised stride-1 conv that taming's
      # network always has: a different, shallower discriminator without a word.
      if getattr(self, name) < 1:
        raise ValueError(f"{where}.{name}={getattr(self, name)}: expected >= 1")
    for n in range(1, self.num_layers + 1):
      if self.channels(n) % self.norm_num_groups:
        raise ValueError(f"{where}: {self.channels(n)} channels (layer {n}) are not "
                         f"divisible by norm_num_groups={self.norm_num_groups}")
    return self


_SPATIAL_AXES = ("conv_kt", "conv_kh", "conv_kw")


def _conv(features: int, kernel: tuple, padding: tuple, *, name: str, use_bias: bool,
          dtype) -> layers.Conv:
  """Stride-1 conv over the len(kernel) axes after the batch axis."""
  names = _SPATIAL_AXES[3 - len(kernel):] + ("conv_in", "conv_out")
  return layers.conv_layer(features, kernel, padding=padding, use_bias=use_bias,
                          dtype=dtype, kernel_init=layers.param_init(_CONV_INIT, names),
                          bias_init=layers.param_init(layers.ZEROS, ("conv_out",)),
                          name=name)


class StrideTwoConv(nn.Module):
  """A kernel-4, stride-2 conv (parameters `kernel` (4,..., C_in, C_out) and `bias`,
  as nn.Conv's), computed as a kernel-2 stride-1 conv on the space-to-depth input.

  Same function as nn.Conv(strides=2), but XLA:CPU computes the input gradient of a
  strided 3-D conv (an lhs-dilated conv) about 70x slower than this form's (measured:
  0.22 s vs 3 ms for the first layer of a 4x32x32 clip), and the generator's loss
  needs exactly that gradient. (N, *S, C) with padding ((lo, hi),) * len(S) ->
  (N, *S', features), S' = (S + lo + hi - 4) // 2 + 1.
  """
  features: int
  padding: tuple
  use_bias: bool = True
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    nd, c = x.ndim - 2, x.shape[-1]
    kernel = self.param("kernel", layers.param_init(
        _CONV_INIT, _SPATIAL_AXES[3 - nd:] + ("conv_in", "conv_out")),
        (4,) * nd + (c, self.features))
    # Pad to exactly the 2 * (out + 1) rows the outputs read (a trailing row that no
    # output reads is dropped, as the strided conv ignores it).
    pads, keep = [(0, 0)], [slice(None)]
    for size, (lo, hi) in zip(x.shape[1:-1], self.padding):
      need = 2 * ((size + lo + hi - 4) // 2 + 1) + 2
      pads.append((lo, max(need - size - lo, 0)))
      keep.append(slice(0, need))
    x = jnp.pad(x.astype(self.dtype), pads + [(0, 0)])[tuple(keep)]
    # Space-to-depth: (N, 2a_1 + b_1, ..., C) -> (N, a_1, ..., (b_1, ..., C)); the
    # kernel (2a + b, ..., C, F) -> (a, ..., (b, ..., C), F) the same way.
    n, sizes = x.shape[0], x.shape[1:-1]
    x = x.reshape((n,) + sum(((s // 2, 2) for s in sizes), ()) + (c,))
    x = x.transpose((0,) + tuple(range(1, 2 * nd, 2)) + tuple(range(2, 2 * nd + 1, 2))
                    + (2 * nd + 1,))
    x = x.reshape((n,) + tuple(s // 2 for s in sizes) + (2 ** nd * c,))
    k = kernel.reshape((2,) * (2 * nd) + (c, self.features))
    k = k.transpose(tuple(range(0, 2 * nd, 2)) + tuple(range(1, 2 * nd, 2))
                    + (2 * nd, 2 * nd + 1))
    k = k.reshape((2,) * nd + (2 ** nd * c, self.features)).astype(self.dtype)
    spatial = "DHW"[3 - nd:]
    y = jax.lax.conv_general_dilated(
        x, k, (1,) * nd, "VALID",
        dimension_numbers=(f"N{spatial}C", f"{spatial}IO", f"N{spatial}C"))
    if self.use_bias:
      y = layers.add_bias(y, self.param("bias", layers.param_init(layers.ZEROS, ("conv_out",)),
                                        (self.features,)))
    return y


def _time_padding(t: int, kernel: int, stride: int) -> tuple[int, int]:
  """'SAME' padding of the time axis (ceil(t / stride) outputs): equals PyTorch's
  padding=1 for k4 s2 on even t, and still gives one output for clips shorter than
  the network's temporal reduction (t = 1 or 2 frames)."""
  out = -(-t // stride)
  total = max((out - 1) * stride + kernel - t, 0)
  return (total // 2, total - total // 2)


class PatchDiscriminator(nn.Module):
  """2-D PatchGAN: images (B, H, W, C) in [-1, 1] -> patch logits (B, H', W', 1)."""
  config: DiscriminatorConfig = DiscriminatorConfig()
  dtype: jnp.dtype = jnp.float32
  video: ClassVar[bool] = False

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    c = self.config.validate()
    nd = 3 if self.video else 2
    if x.ndim != nd + 2:
      layout = "(B, T, H, W, C)" if self.video else "(B, H, W, C)"
      raise ValueError(f"{type(self).__name__} input must be {layout}, got {x.shape}")

    def conv(h, features, stride, name, use_bias):
      pad = [(1, 1)] * nd
      if stride == 2:
        if self.video:
          pad[0] = _time_padding(h.shape[1], 4, 2)
        return StrideTwoConv(features, tuple(pad), use_bias, dtype=self.dtype, name=name)(h)
      k = (4,) * nd
      if self.video:
        # A stride-1 k4 conv shrinks time by one frame per layer, which short clips
        # cannot afford: the stride-1 layers use a 3-tap time kernel, 'same' padded.
        k = (3, 4, 4)
      return _conv(features, k, tuple(pad), name=name, use_bias=use_bias,
                   dtype=self.dtype)(h)

    act = lambda y: nn.leaky_relu(y, 0.2)
    h = x.astype(self.dtype)
    h = act(conv(h, c.base_channels, 2, "conv_0", True))
    for n in range(1, c.num_layers + 1):
      # The normalisation's bias makes a conv bias redundant (taming: bias=False + BN).
      h = conv(h, c.channels(n), 2 if n < c.num_layers else 1, f"conv_{n}", False)
      h = act(layers.group_norm(c.norm_num_groups, 1e-5, name=f"norm_{n}",
                                dtype=self.dtype)(h))
    return conv(h, 1, 1, "conv_out", True).astype(jnp.float32)


class VideoPatchDiscriminator(PatchDiscriminator):
  """3-D PatchGAN: videos (B, T, H, W, C) in [-1, 1] -> logits (B, T', H', W', 1)."""
  video: ClassVar[bool] = True


def example_inputs(config: DiscriminatorConfig, video: bool, size: int = 32,
                   num_frames: int = 2) -> tuple:
  """Zero inputs for `init` / `jax.eval_shape` (parameter shapes do not depend on them)."""
  shape = (1, num_frames, size, size, config.in_channels) if video else (
      1, size, size, config.in_channels)
  return (jnp.zeros(shape, jnp.float32),)
