"""The Stable Diffusion 1.x / 2.x UNet in Flax Linen, channels-last.

Structure and module names follow diffusers' `UNet2DConditionModel` (conv_in,
time_embedding, down_blocks_i/{resnets_j, attentions_j, downsamplers_0}, mid_block,
up_blocks_i/..., conv_norm_out, conv_out), which is what SD checkpoints hold.
"""

import dataclasses
from typing import Optional

import einops
import flax.linen as nn
from flax import traverse_util
import jax
import jax.numpy as jnp

from videoldm_jax.models import layers
from videoldm_jax.models.context_encoder import ContextEncoder
from videoldm_jax.models.transformer2d import SpatialTransformer
from videoldm_jax.models.config_base import JsonConfig
from videoldm_jax.models.temporal import Frames, TemporalConfig, TemporalResBlock


@dataclasses.dataclass(frozen=True)
class UNetConfig(JsonConfig):
  """Hyper-parameters of the image UNet. Defaults are Stable Diffusion 1.5.

  Exactly one of `num_heads` / `head_dim` sets the attention heads per level:
  SD 1.x uses 8 heads everywhere, SD 2.x a head dim of 64.
  """
  in_channels: int = 4
  out_channels: int = 4
  block_out_channels: tuple[int, ...] = (320, 640, 1280, 1280)
  layers_per_block: int = 2
  attention_levels: tuple[bool, ...] = (True, True, True, False)
  num_heads: Optional[int | tuple[int, ...]] = 8
  head_dim: Optional[int] = None
  transformer_depth: int | tuple[int, ...] = 1
  cross_attention_dim: int = 768
  use_linear_projection: bool = False
  norm_num_groups: int = 32
  norm_eps: float = 1e-5
  flip_sin_to_cos: bool = True
  freq_shift: int = 0
  # Discrete labels (class-conditional models, the x4 upscaler's noise level) embedded
  # and added to the timestep embedding; None disables.
  num_class_embeds: Optional[int] = None

  @property
  def num_levels(self) -> int:
    return len(self.block_out_channels)

  @property
  def time_embed_dim(self) -> int:
    return 4 * self.block_out_channels[0]

  def heads_per_level(self) -> tuple[int, ...]:
    """Attention heads at each level (down order); the middle block uses the last."""
    if (self.num_heads is None) == (self.head_dim is None):
      raise ValueError("UNetConfig: set exactly one of num_heads and head_dim "
                       f"(got num_heads={self.num_heads}, head_dim={self.head_dim})")
    if self.head_dim is not None:
      for c in self.block_out_channels:
        if c % self.head_dim:
          raise ValueError(f"UNetConfig: channels {c} not divisible by head_dim "
                           f"{self.head_dim}")
      return tuple(c // self.head_dim for c in self.block_out_channels)
    heads = layers.per_level(self.num_heads, self.num_levels, "num_heads")
    attention = layers.per_level(self.attention_levels, self.num_levels, "attention_levels")
    for lvl, (c, n) in enumerate(zip(self.block_out_channels, heads)):
      # Levels with attention, and the last (the middle block's transformer): the
      # heads split the channels there, and a remainder failed inside a reshape.
      if not (attention[lvl] or lvl == self.num_levels - 1):
        continue
      if not isinstance(n, int) or n < 1 or c % n:
        raise ValueError(f"UNetConfig: num_heads at level {lvl} must be a positive "
                         f"divisor of its {c} channels, got {n!r}")
    return heads

  def depth_per_level(self) -> tuple[int, ...]:
    return layers.per_level(self.transformer_depth, self.num_levels, "transformer_depth")

  def validate(self) -> "UNetConfig":
    layers.per_level(self.attention_levels, self.num_levels, "attention_levels")
    self.heads_per_level()
    self.depth_per_level()
    for c in self.block_out_channels:
      if c % self.norm_num_groups:
        raise ValueError(f"UNetConfig: channels {c} not divisible by norm_num_groups "
                         f"{self.norm_num_groups}")
    return self


class ResBlock(nn.Module):
  """GroupNorm-SiLU-Conv, + projected timestep embedding, GroupNorm-SiLU-Conv, skip.

  (B, H, W, C_in), temb (B, E) -> (B, H, W, out_channels).
  """
  out_channels: int
  norm_num_groups: int = 32
  eps: float = 1e-5
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, temb_BxE: Optional[jax.Array] = None) -> jax.Array:
    gn = lambda name: layers.group_norm(self.norm_num_groups, self.eps, name=name,
                                        dtype=self.dtype)
    h = layers.conv2d(self.out_channels, 3, name="conv1", dtype=self.dtype)(
        nn.silu(gn("norm1")(x)))
    if temb_BxE is not None:
      t = layers.dense(self.out_channels, ("embed", "conv_out"), name="time_emb_proj",
                       dtype=self.dtype)(nn.silu(temb_BxE))
      h = layers.add_bias(h, t[:, None, None, :])  # (its gradient summed in float32)
    h = layers.conv2d(self.out_channels, 3, name="conv2", dtype=self.dtype)(
        nn.silu(gn("norm2")(h)))
    if x.shape[-1] != self.out_channels:
      x = layers.conv2d(self.out_channels, 1, name="conv_shortcut", dtype=self.dtype)(x)
    return x + h


class Downsample(nn.Module):
  """Stride-2 3x3 conv with symmetric padding 1: (B, H, W, C) -> (B, H/2, W/2, C)."""
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    return layers.conv2d(x.shape[-1], 3, stride=2, name="conv", dtype=self.dtype)(x)


class Upsample(nn.Module):
  """Nearest 2x then 3x3 conv: (B, H, W, C) -> (B, 2H, 2W, C)."""
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    return layers.UpsampleConv(x.shape[-1], name="conv", dtype=self.dtype)(x)


class TimestepEmbedding(nn.Module):
  """Linear-SiLU-Linear on the sinusoidal embedding: (B, C0) -> (B, E)."""
  dim: int
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    x = layers.dense(self.dim, ("embed", "mlp"), name="linear_1", dtype=self.dtype)(x)
    return layers.dense(self.dim, ("mlp", "embed"), name="linear_2",
                        dtype=self.dtype)(nn.silu(x))


class DownBlock(nn.Module):
  """One encoder level: ResBlocks (+ spatial transformers), optional downsampler.

  Returns the output and the skip activations the decoder concatenates.
  """
  config: UNetConfig
  level: int
  temporal: Optional[TemporalConfig] = None
  remat_policy: str = "none"
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, h, temb, context, frames):
    c, lvl, tc, rp = self.config, self.level, self.temporal, self.remat_policy
    skips = []
    for j in range(c.layers_per_block):
      h = _res(c, tc, c.block_out_channels[lvl], self.dtype, j, h, temb, frames, rp)
      if c.attention_levels[lvl]:
        h = _attn(c, tc, lvl, self.dtype, f"attentions_{j}", rp)(h, context, frames)
      skips.append(h)
    if lvl < c.num_levels - 1:
      h = Downsample(dtype=self.dtype, name="downsamplers_0")(h)
      skips.append(h)
    return h, skips


class MidBlock(nn.Module):
  """ResBlock, spatial transformer, ResBlock at the lowest resolution."""
  config: UNetConfig
  temporal: Optional[TemporalConfig] = None
  remat_policy: str = "none"
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, h, temb, context, frames):
    c, tc, rp = self.config, self.temporal, self.remat_policy
    h = _res(c, tc, c.block_out_channels[-1], self.dtype, 0, h, temb, frames, rp)
    h = _attn(c, tc, c.num_levels - 1, self.dtype, "attentions_0", rp)(h, context, frames)
    return _res(c, tc, c.block_out_channels[-1], self.dtype, 1, h, temb, frames, rp)


class UpBlock(nn.Module):
  """One decoder level: layers_per_block + 1 ResBlocks, each fed a concatenated skip."""
  config: UNetConfig
  level: int
  temporal: Optional[TemporalConfig] = None
  remat_policy: str = "none"
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, h, skips, temb, context, frames):
    """`skips` are this level's encoder activations in encoder order; consumed last first."""
    c, lvl, tc, rp = self.config, self.level, self.temporal, self.remat_policy
    skips = list(skips)
    for j in range(c.layers_per_block + 1):
      h = jnp.concatenate([h, skips.pop()], axis=-1)
      h = _res(c, tc, c.block_out_channels[lvl], self.dtype, j, h, temb, frames, rp)
      if c.attention_levels[lvl]:
        h = _attn(c, tc, lvl, self.dtype, f"attentions_{j}", rp)(h, context, frames)
    if lvl > 0:
      h = Upsample(dtype=self.dtype, name="upsamplers_0")(h)
    return h


REMAT_POLICIES = {
    "none": None,                # keep every activation
    "full": "full",              # keep only block inputs, recompute the rest
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,  # keep matmul outputs
}


def with_remat(cls, policy: str):
  """`cls`, rematerialised per block under the named policy (parameter paths unchanged)."""
  if policy not in REMAT_POLICIES:
    raise ValueError(f"remat_policy must be one of {sorted(REMAT_POLICIES)}, got {policy!r}")
  if REMAT_POLICIES[policy] is None:
    return cls
  return nn.remat(cls, policy=None if policy == "full" else REMAT_POLICIES[policy])


def _res(c: UNetConfig, tc: Optional[TemporalConfig], channels: int, dtype, j: int,
         h: jax.Array, temb: jax.Array, frames: Optional[Frames], remat: str) -> jax.Array:
  """Spatial ResBlock `resnets_j`, then (video UNet) temporal ResBlock `temporal_resnets_j`.

  Must be called from a compact module: the blocks become its children.
  """
  h = with_remat(ResBlock, remat)(channels, c.norm_num_groups, c.norm_eps,
                              dtype=dtype, name=f"resnets_{j}")(h, temb)
  if tc is not None and tc.resblocks and frames is not None:
    h = with_remat(TemporalResBlock, remat)(tc, c.norm_num_groups, c.norm_eps, dtype=dtype,
                                        name=f"temporal_resnets_{j}")(h, temb, frames)
  return h


def _attn(c: UNetConfig, tc: Optional[TemporalConfig], level: int, dtype,
          name: str, remat: str) -> SpatialTransformer:
  return with_remat(SpatialTransformer, remat)(
      c.heads_per_level()[level], c.depth_per_level()[level], c.use_linear_projection,
      c.norm_num_groups, temporal=tc, dtype=dtype, name=name)


class UNet(nn.Module):
  """The SD UNet, and with `temporal` set the Video LDM UNet.

  Image: x (B, H, W, C_in), timesteps (B,), context (B, S, E), optional class labels
  (B,) -> (B, H, W, C_out).
  Video: x (B, T, H, W, C_in) with the same per-video timesteps, context and labels
  (context and labels may also be given per frame, (B*T, ...), or once for all, (1, ...)),
  and optional image_only (B, T) bool -> (B, T, H, W, C_out). Frames go through the
  spatial layers as a batch of B*T images; the temporal layers (names `temporal_*`)
  follow every spatial ResBlock and transformer block. image_only sets alpha = 1 for
  the frames it flags; flag whole videos (as the data pipeline does): a flagged frame
  inside an unflagged video still enters the temporal layers' outputs of the others.
  Context frames (temporal.context_frames): optional cond (B, T, H, W, C_in + 1) =
  (m * z, m) (`context_encoder.masked_cond`), encoded by `temporal_context_encoder` to
  every level and added to the temporal layers' inputs. cond=None skips the encoder: the
  model without context, which an all-zero cond (S = 0) reproduces exactly (every added
  term is exactly 0; only XLA's fusion of the two jitted programs may round differently).
  """
  config: UNetConfig
  temporal: Optional[TemporalConfig] = None
  dtype: jnp.dtype = jnp.float32
  remat_policy: str = "none"  # see REMAT_POLICIES

  @nn.compact
  def __call__(self, x: jax.Array, timesteps_B: jax.Array,
               context_BxSxE: Optional[jax.Array] = None,
               class_labels_B: Optional[jax.Array] = None,
               image_only_BxT: Optional[jax.Array] = None,
               cond: Optional[jax.Array] = None) -> jax.Array:
    c = self.config.validate()
    if self.temporal is not None:
      self.temporal.validate()
    video = x.ndim == 5
    if not video and x.ndim != 4:
      raise ValueError(f"UNet input must be (B, H, W, C) or (B, T, H, W, C), got {x.shape}")
    f = 2 ** (c.num_levels - 1)
    if x.shape[-3] % f or x.shape[-2] % f:
      # (Each level halves the size and the way up doubles it: an odd size fails to
      # concatenate with its skip, deep inside, as a TypeError.)
      raise ValueError(f"UNet input of {x.shape[-3]}x{x.shape[-2]} latents: both must be "
                       f"multiples of {f} (2 ** (levels - 1))")
    batch = x.shape[0]
    if jnp.ndim(timesteps_B) > 1 or jnp.size(timesteps_B) not in (1, batch):
      raise ValueError(f"UNet timesteps: expected one per {'video' if video else 'image'}, "
                       f"({batch},), or one for all, got shape {jnp.shape(timesteps_B)}")
    timesteps_B = jnp.broadcast_to(timesteps_B, (batch,))
    frames = None
    if video:
      t = x.shape[1]
      x_BxHxWxC = einops.rearrange(x, "b t h w c -> (b t) h w c")

      def per_frame(a, name):
        # Per video (B, ...) repeated for its frames, or given per frame (B*T, ...): the
        # frames of an image example come from different clips. One for all videos
        # (1, ...), as the image model takes it.
        if a is None or a.shape[0] == batch * t:
          return a
        if a.shape[0] == 1:
          a = jnp.broadcast_to(a, (batch, *a.shape[1:]))
        if a.shape[0] != batch:
          raise ValueError(f"UNet {name}: leading size {a.shape[0]}, expected {batch} (per "
                           f"video), {batch * t} (per frame) or 1")
        return jnp.repeat(a, t, axis=0)

      timesteps_B, context_BxSxE, class_labels_B = (
          per_frame(timesteps_B, "timesteps"), per_frame(context_BxSxE, "context"),
          per_frame(class_labels_B, "class_labels"))
      image_only = None
      if image_only_BxT is not None:
        if image_only_BxT.shape != (batch, t):
          # (Reshaped to B*T, a (T, B) array put the flags on other frames, silently.)
          raise ValueError(f"UNet image_only: expected (B, T) = {(batch, t)}, got "
                           f"{image_only_BxT.shape}")
        image_only = image_only_BxT.reshape(-1)
      frames = Frames(t, image_only)
    else:
      x_BxHxWxC = x
      for name, a in (("context", context_BxSxE), ("class_labels", class_labels_B)):
        if a is not None and a.shape[0] not in (1, batch):  # (else XLA's broadcast error)
          raise ValueError(f"UNet {name}: leading size {a.shape[0]}, expected {batch} (per "
                           "image) or 1")
    frames_per_level = self._context_frames(x, cond, frames)
    t = layers.timestep_embedding(timesteps_B, c.block_out_channels[0], c.flip_sin_to_cos,
                                  c.freq_shift)
    temb = TimestepEmbedding(c.time_embed_dim, dtype=self.dtype, name="time_embedding")(
        t.astype(self.dtype))
    if c.num_class_embeds is not None:
      if class_labels_B is None:
        raise ValueError("this UNet is class-conditional (num_class_embeds="
                         f"{c.num_class_embeds}): pass class_labels")
      temb = temb + layers.embedding(c.num_class_embeds, c.time_embed_dim,
                                     name="class_embedding")(class_labels_B).astype(temb.dtype)
    if context_BxSxE is not None:
      context_BxSxE = context_BxSxE.astype(self.dtype)

    h = layers.conv2d(c.block_out_channels[0], 3, name="conv_in", dtype=self.dtype)(
        x_BxHxWxC.astype(self.dtype))
    skips = [h]
    tc = self.temporal
    for level in range(c.num_levels):
      h, level_skips = DownBlock(c, level, tc, self.remat_policy, dtype=self.dtype,
                                 name=f"down_blocks_{level}")(
                                     h, temb, context_BxSxE, frames_per_level[level])
      skips += level_skips
    h = MidBlock(c, tc, self.remat_policy, dtype=self.dtype, name="mid_block")(
        h, temb, context_BxSxE, frames_per_level[-1])
    n = c.layers_per_block + 1
    for up, level in enumerate(reversed(range(c.num_levels))):
      skips, level_skips = skips[:-n], skips[-n:]
      h = UpBlock(c, level, tc, self.remat_policy, dtype=self.dtype,
                  name=f"up_blocks_{up}")(h, level_skips, temb, context_BxSxE,
                                          frames_per_level[level])
    h = nn.silu(layers.group_norm(c.norm_num_groups, c.norm_eps, name="conv_norm_out",
                                  dtype=self.dtype)(h))
    out = layers.conv2d(c.out_channels, 3, name="conv_out", dtype=self.dtype)(h)
    out = out.astype(jnp.float32)
    if video:
      out = einops.rearrange(out, "(b t) h w c -> b t h w c", b=batch)
    return out

  def _context_frames(self, x: jax.Array, cond: Optional[jax.Array],
                      frames: Optional[Frames]) -> list[Optional[Frames]]:
    """`frames` for each level, carrying that level's context features (if any)."""
    c, tc = self.config, self.temporal
    levels = [frames] * c.num_levels
    if tc is None or not tc.context_frames:
      if cond is not None:
        raise ValueError("cond (context frames) given, but this UNet has no context "
                         "encoder (TemporalConfig.context_frames=False)")
      return levels
    if frames is None:
      if cond is not None:
        raise ValueError("cond (context frames) needs video input (B, T, H, W, C)")
      return levels
    if cond is None and self.is_initializing():
      # Create the encoder and projections (the parameter tree must not depend on
      # whether the example inputs carried a cond).
      cond = jnp.zeros(x.shape[:-1] + (c.in_channels + 1,), jnp.float32)
    if cond is None:
      return levels
    expected = x.shape[:-1] + (c.in_channels + 1,)
    if tuple(cond.shape) != expected:
      raise ValueError(f"cond must be (m * z, m) of shape {expected}, got {cond.shape}")
    widths = tc.context_channels or c.block_out_channels
    if len(widths) != c.num_levels:
      raise ValueError(f"TemporalConfig.context_channels {widths} needs one width per "
                       f"UNet level ({c.num_levels})")
    features = ContextEncoder(tuple(widths), dtype=self.dtype, name="temporal_context_encoder")(
        einops.rearrange(cond, "b t h w c -> (b t) h w c"))
    return [frames.with_context(f) for f in features]


def called_with_context(config: UNetConfig, has_text_encoder: bool) -> bool:
  """Whether a model's UNet gets a cross-attention context: from its text encoder, or,
  without one, from outside (an image embedding as in SVD, a latent cache's context);
  a class-conditional model without a text encoder is conditioned by its labels alone
  and called without one."""
  return has_text_encoder or config.num_class_embeds is None


def context_attention(unet_params: dict) -> Optional[tuple[str, tuple, tuple]]:
  """The first attn2 of `unet_params` (spatial or temporal) whose keys take another
  width than its queries, i.e. that needs a context of that width and cannot attend to
  its own tokens as a model called without a context does: ('path of its to_k kernel',
  to_k shape, to_q shape). None when every attn2 can run without a context."""
  flat = traverse_util.flatten_dict(unet_params)
  for path, k in flat.items():
    if "attn2" in path and path[-2:] == ("to_k", "kernel"):
      q = flat.get(path[:-2] + ("to_q", "kernel"))
      if q is not None and k.shape[0] != q.shape[0]:
        return "/".join(path), tuple(k.shape), tuple(q.shape)
  return None


def example_inputs(config: UNetConfig, batch: int = 1, size: int | None = None,
                   context_len: int = 1, text: bool = True) -> tuple:
  """Zero inputs of the right shapes for `UNet.init` / `jax.eval_shape`. text=False (a
  model always called without a context: `called_with_context`): no context, so every
  attn2 attends to its own tokens and its key / value widths are the level's channels
  (one cross_attention_dim cannot fit levels of different widths)."""
  size = size or 2 ** (config.num_levels - 1)
  x = jnp.zeros((batch, size, size, config.in_channels), jnp.float32)
  t = jnp.zeros((batch,), jnp.int32)
  ctx = (jnp.zeros((batch, context_len, config.cross_attention_dim), jnp.float32)
         if text else None)
  labels = None if config.num_class_embeds is None else jnp.zeros((batch,), jnp.int32)
  return x, t, ctx, labels
