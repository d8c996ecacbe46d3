"""The temporal layers phi of Video LDM (Blattmann et al. 2023, Sec. 3.1, Fig. 4).

Each temporal layer follows a spatial layer of the frozen image UNet and is blended
with it: out = alpha * x_spatial + (1 - alpha) * x_temporal, alpha = sigmoid(m) with
one learned scalar m per site. Frames flagged "image only" (joint image/video batches)
use alpha = 1, which makes the video UNet the image UNet exactly: bitwise in float32.
In bfloat16 the two are different XLA programs, and XLA's excess-precision rewrites
(dropping bf16 -> f32 -> bf16 round trips where it fuses) differ between them: the
outputs then differ by bf16 rounding (seen: 0.13 on outputs of magnitude 3), and are
equal again with XLA_FLAGS=--xla_allow_excess_precision=false.

Every module and parameter created here has a name starting with `temporal_` (or lives
inside such a module): `partition.is_temporal` relies on it to split phi from theta.
Spatial layers see frames as a batch (B*T, H, W, C); temporal layers reshape to
(B, T, H, W, C) or, for attention over each pixel's frames, (B, T, H*W, C).
"""

import dataclasses
import math
from typing import Callable, Optional

import einops
import flax.linen as nn
from flax import struct
import jax
import jax.numpy as jnp

from videoldm_jax.models import attention, conv, layers
from videoldm_jax.models.attention import Attention, FeedForward
from videoldm_jax.models.config_base import JsonConfig
from videoldm_jax.models.matmul import dense_matmul


@dataclasses.dataclass(frozen=True)
class TemporalConfig(JsonConfig):
  """Which temporal layers the video UNet gets, and how they start."""
  resblocks: bool = True             # a temporal ResBlock after every spatial ResBlock
  attention: bool = True             # temporal attention after every transformer block
  conv_kernel: tuple[int, int, int] = (3, 1, 1)  # (t, h, w) of the Conv3d; or (3, 3, 3)
  cross_attention: bool = False      # temporal blocks also attend to the text context
  mix_init: float = 0.5              # initial logit m of every mixing site (as sgm)
  max_period: float = 10000.0        # of the sinusoidal frame-index encoding
  # Context frames (prediction / interpolation models, paper eq. 3): the UNet takes
  # cond = (m * z, m) (B, T, h, w, C+1) through `temporal_context_encoder`, whose
  # features at each resolution are added (zero-initialised projections) to the input
  # of every temporal layer. theta and conv_in are untouched.
  context_frames: bool = False
  # Encoder width per UNet level; () = the UNet's block_out_channels.
  context_channels: tuple[int, ...] = ()

  def validate(self, where: str = "TemporalConfig") -> "TemporalConfig":
    """`self`, or a ValueError naming the field as `where`.field (`where`: the config
    section it came from, e.g. config.temporal)."""
    k = self.conv_kernel
    if (not isinstance(k, (tuple, list)) or len(k) != 3
        or any(not isinstance(x, int) or x < 1 or x % 2 == 0 for x in k)):
      raise ValueError(f"{where}.conv_kernel must be three odd sizes, got {k!r}")
    # (max_period <= 0: a NaN frame encoding, and through alpha * x + (1 - alpha) * NaN
    # every output NaN, image-only frames included; a non-finite mix_init likewise.)
    if not (math.isfinite(self.max_period) and self.max_period > 1):
      raise ValueError(f"{where}.max_period must be a finite number > 1, got "
                       f"{self.max_period}")
    if not math.isfinite(self.mix_init):
      raise ValueError(f"{where}.mix_init must be finite, got {self.mix_init}")
    if self.cross_attention and not self.attention:
      # The temporal cross-attention lives in the temporal transformer block, which
      # attention=False leaves out: the flag would add nothing, silently.
      raise ValueError(f"{where}.cross_attention needs attention=True (it is part "
                       "of the temporal attention block)")
    if self.context_channels and not self.context_frames:
      raise ValueError(f"{where}.context_channels is set but context_frames is False")
    if any(not isinstance(c, int) or c < 1 for c in self.context_channels):
      raise ValueError(f"{where}.context_channels must be positive widths, got "
                       f"{self.context_channels}")
    return self


class Frames(struct.PyTreeNode):
  """How a (B*T, ...) batch of frames folds into videos, passed to every layer (a pytree,
  so that it crosses `nn.remat` boundaries).

  image_only: (B*T,) bool, True where a frame is a still image (alpha forced to 1).
  context: (B*T, h, w, C_ctx) features of the context frames at the resolution of the
    layers that receive this Frames (models with `context_frames`), or None.
  """
  num_frames: int = struct.field(pytree_node=False)
  image_only: Optional[jax.Array] = None
  context: Optional[jax.Array] = None

  def with_context(self, context: Optional[jax.Array]) -> "Frames":
    return self.replace(context=context)


def mix(x_spatial: jax.Array, x_temporal: jax.Array, m: jax.Array,
        image_only: Optional[jax.Array]) -> jax.Array:
  """alpha * x_spatial + (1 - alpha) * x_temporal with alpha = sigmoid(m), (N, ...).

  The sigmoid comes first and the image-only override after it: overriding m instead
  would give sigmoid(1) = 0.73, not 1.
  """
  alpha = jax.nn.sigmoid(m.astype(jnp.float32))
  if image_only is not None:
    alpha = jnp.where(image_only.reshape((-1,) + (1,) * (x_spatial.ndim - 1)), 1.0, alpha)
  # Blended in float32, cast once: dL/dm is the small difference of two large sums
  # (the temporal branch starts near the identity), lost when each is rounded to bf16.
  out = alpha * x_spatial.astype(jnp.float32) + (1 - alpha) * x_temporal.astype(jnp.float32)
  return out.astype(x_spatial.dtype)


def mix_param(module: nn.Module, init: float) -> jax.Array:
  """The learned blend scalar m (shape (1,), logical axis 'scalar') of `module`'s site:
  `mix_factor`, initialised to `init` (also the video decoder's)."""
  init_fn = layers.param_init(layers.Init("constant", init), ("scalar",))
  return module.param("mix_factor", init_fn, (1,))


class TimeOnlyConv(nn.Module):
  """A (kt, 1, 1) 3-D convolution on (B, T, H, W, C) with 'same' zero padding for a
  CPU target. With the C++ kernels (models/conv.py) it is a (kt, 1) 2-D convolution of
  (B, T, H*W, C), each frame read in place; without them, one dense matmul: the kt
  time-shifted copies of the input side by side (B, T, H, W, kt*C) times the kernel
  reshaped to (kt*C, features). The parameters (`kernel` (kt, 1, 1, C, features),
  `bias`) are those of `nn.Conv`, so checkpoints are shared.

  Why not `nn.Conv`: XLA:CPU runs this conv's gradients at 33-99 GFLOP/s on our shapes
  (its weight gradient in Eigen, asynchronously); as a matmul whose weight gradient
  takes YNNPACK's path (models/matmul.py), forward + both gradients run at 52-159
  GFLOP/s, 1.4-1.9x, at the cost of kt x the input's memory for the backward pass
  (bench/README.md); the C++ kernels need neither. `conv3d` picks it only when
  compiling for a CPU.
  """
  features: int
  kernel_size: tuple[int, int, int]
  kernel_init: Callable
  bias_init: Callable
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x_BxTxHxWxC: jax.Array) -> jax.Array:
    kt = self.kernel_size[0]
    channels = x_BxTxHxWxC.shape[-1]
    kernel = self.param("kernel", self.kernel_init, (*self.kernel_size, channels,
                                                     self.features), jnp.float32)
    bias = self.param("bias", self.bias_init, (self.features,), jnp.float32)
    x, kernel = nn.dtypes.promote_dtype(x_BxTxHxWxC, kernel, dtype=self.dtype)
    b, frames, h, w, _ = x.shape
    # With the C++ convolution: (B, T, H*W, C) convolved with a (kt, 1) kernel, each
    # frame read in place (no shifted copies).
    x_BxTxSxC = x.reshape(b, frames, h * w, channels)
    kernel_4d = kernel.reshape(kt, 1, channels, self.features)
    if conv.USE_NATIVE_CONV and conv.takes(x_BxTxSxC, kernel_4d):
      y = conv.conv_same(x_BxTxSxC, kernel_4d)
      return layers.add_bias(y.reshape(b, frames, h, w, self.features), bias)
    pad = kt // 2
    x = jnp.pad(x, ((0, 0), (pad, pad), (0, 0), (0, 0), (0, 0)))
    # Tap i of a cross-correlation reads frame t + i - pad: padded frame t + i.
    shifted = jnp.concatenate([x[:, i:i + frames] for i in range(kt)], axis=-1)
    return layers.add_bias(dense_matmul(shifted, kernel.reshape(kt * channels, self.features)),
                           bias)


def conv3d(features: int, kernel: tuple[int, int, int], *, name: str, zero_init: bool = False,
           init: Optional[layers.Init] = None, dtype=jnp.float32) -> nn.Module:
  """3-D convolution on (B, T, H, W, C) with 'same' zero padding (`TimeOnlyConv` for a
  (kt, 1, 1) kernel on CPU, `nn.Conv` otherwise; the same parameters either way). The
  kernel starts from `init`, else zeros (`zero_init`) or fan-in normal."""
  if init is None:
    init = layers.ZEROS if zero_init else layers.FAN_IN_NORMAL
  axes = ("conv_kt", "conv_kh", "conv_kw", "conv_in", "conv_out")
  if tuple(kernel[1:]) == (1, 1) and attention.target_platform() == "cpu":
    return TimeOnlyConv(features, tuple(kernel), layers.param_init(init, axes),
                        layers.param_init(layers.ZEROS, ("conv_out",)), dtype=dtype,
                        name=name)
  return layers.conv_layer(
      features, kernel, padding=tuple((k // 2, k // 2) for k in kernel), dtype=dtype,
      kernel_init=layers.param_init(init, axes),
      bias_init=layers.param_init(layers.ZEROS, ("conv_out",)), name=name)


def add_context(x: jax.Array, frames: Frames) -> jax.Array:
  """x (N, ..., C) + a zero-initialised, bias-free projection of `frames.context`
  (N, h, w, C_ctx), reshaped to x's shape (x is (B*T, h, w, C) or tokens (B*T, h*w, C));
  x itself when there is no context.

  Bias-free and zero-initialised: at init a context model is the model it was built from,
  and an all-zero cond (no context frame) adds exactly zero at any weights, so the
  unconditional branch of context guidance is the context-free model.
  """
  if frames.context is None:
    return x
  proj = nn.Dense(x.shape[-1], use_bias=False, dtype=x.dtype, param_dtype=jnp.float32,
                  dot_general=layers.dense_dot_general,
                  kernel_init=layers.param_init(layers.ZEROS, ("conv_in", "conv_out")),
                  name="context_proj")
  return x + proj(frames.context.astype(x.dtype)).reshape(x.shape)


class TemporalResBlock(nn.Module):
  """GroupNorm-SiLU-Conv3d, + per-frame timestep embedding, GroupNorm-SiLU-Conv3d whose
  weights start at zero (so the block starts as the identity), identity skip; then the
  blend with its input. (B*T, H, W, C), temb (B*T, E) -> (B*T, H, W, C).

  With context features in `frames`, their projection is added to the temporal branch's
  input (residual stream included, so the projection gets gradients from step one)."""
  config: TemporalConfig
  norm_num_groups: int = 32
  eps: float = 1e-5
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, temb: jax.Array, frames: Frames) -> jax.Array:
    c = self.config
    channels = x.shape[-1]
    # GroupNorm over (T, H, W) and the channel group: the video is the instance.
    v = einops.rearrange(add_context(x, frames), "(b t) h w c -> b t h w c",
                         t=frames.num_frames)
    gn = lambda name: layers.group_norm(self.norm_num_groups, self.eps, name=name,
                                        dtype=self.dtype)
    h = conv3d(channels, c.conv_kernel, name="conv1", dtype=self.dtype)(nn.silu(gn("norm1")(v)))
    t = layers.dense(channels, ("embed", "conv_out"), name="time_emb_proj",
                     dtype=self.dtype)(nn.silu(temb))
    # (add_bias: t's gradient, summed over the pixels, in float32 under bf16 compute)
    h = layers.add_bias(h, einops.rearrange(t, "(b t) c -> b t 1 1 c", t=frames.num_frames))
    h = conv3d(channels, c.conv_kernel, name="conv2", zero_init=True, dtype=self.dtype)(
        nn.silu(gn("norm2")(h)))
    x_temporal = einops.rearrange(v + h, "b t h w c -> (b t) h w c")
    return mix(x, x_temporal, mix_param(self, c.mix_init), frames.image_only)


class TemporalTransformerBlock(nn.Module):
  """Attention over the frames of each pixel, after a spatial transformer block.

  Tokens (B*T, S, C) -> S per-pixel sequences of T frames, plus a sinusoidal frame-index
  embedding (through Linear-SiLU-Linear) on this branch only; pre-LN self-attention
  over time, optional cross-attention to the context, GEGLU feed-forward, all
  residual; then the blend with the spatial tokens. The encoding is a function of the
  frame index, so any number of frames works, more than seen in training included.
  Context features (if any) are projected and added to this branch's tokens, next to the
  frame-index embedding.
  """
  config: TemporalConfig
  num_heads: int
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x_NxSxC: jax.Array, context_NxLxE: Optional[jax.Array],
               frames: Frames) -> jax.Array:
    c, t = self.config, frames.num_frames
    width = x_NxSxC.shape[-1]
    pos = layers.timestep_embedding(jnp.arange(t), width, True, 0.0, c.max_period)
    pos = layers.dense(4 * width, ("embed", "mlp"), name="pos_linear_1", dtype=self.dtype)(
        pos.astype(self.dtype))
    pos = layers.dense(width, ("mlp", "embed"), name="pos_linear_2", dtype=self.dtype)(
        nn.silu(pos))
    # (B, T, S, C): each pixel's frames are a sequence along axis 1. The layout of the
    # spatial layers, a reshape of their (B*T, S, C); norms, projections and the
    # feed-forward act per token, and the attention takes the S sequences as they lie.
    h = einops.rearrange(add_context(x_NxSxC, frames), "(b t) s c -> b t s c", t=t)
    h = layers.add_bias(h, pos[None, :, None])  # (summed over B and S: in float32)
    ln = lambda name: layers.layer_norm(1e-5, name=name, dtype=self.dtype)
    attn = lambda name: Attention(self.num_heads, dtype=self.dtype, name=name)
    h = h + attn("attn1")(ln("norm1")(h))
    if c.cross_attention and context_NxLxE is not None:
      # One context per video (that of its first frame), shared by all its pixels: the
      # video's T*S tokens as one query sequence attend to it (each query attends on
      # its own, so this equals every pixel's sequence attending to a copy).
      ctx = einops.rearrange(context_NxLxE, "(b t) l e -> b t l e", t=t)[:, 0]
      q = einops.rearrange(ln("norm2")(h), "b t s c -> b (t s) c")
      h = h + attn("attn2")(q, ctx).reshape(h.shape)
    h = h + FeedForward(dtype=self.dtype, name="ff")(ln("norm3")(h))
    x_temporal = einops.rearrange(h, "b t s c -> (b t) s c")
    return mix(x_NxSxC, x_temporal, mix_param(self, c.mix_init), frames.image_only)
