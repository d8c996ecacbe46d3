"""The spatial transformer of the SD UNet ("Transformer2DModel"), with optional
temporal blocks for the video UNet."""

from typing import Optional

import einops
import flax.linen as nn
import jax
import jax.numpy as jnp

from videoldm_jax.models import layers
from videoldm_jax.models.attention import BasicTransformerBlock
from videoldm_jax.models.temporal import Frames, TemporalConfig, TemporalTransformerBlock


class SpatialTransformer(nn.Module):
  """The SD "Transformer2DModel": GroupNorm, 1x1-conv or linear proj_in, `depth`
  transformer blocks over the H*W tokens, proj_out, residual. (B,H,W,C) -> same.

  With a `temporal` config and `frames`, each transformer block is followed by a
  `TemporalTransformerBlock` over the frames (the sgm / SVD placement), blended in.
  """
  num_heads: int
  depth: int = 1
  use_linear_projection: bool = False
  norm_num_groups: int = 32
  temporal: Optional[TemporalConfig] = None
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x_BxHxWxC: jax.Array, context_BxSxE: Optional[jax.Array],
               frames: Optional[Frames] = None) -> jax.Array:
    _, height, width, channels = x_BxHxWxC.shape
    h = layers.group_norm(self.norm_num_groups, 1e-6, name="norm", dtype=self.dtype)(x_BxHxWxC)
    # SD 1.x stores proj_in/out as 1x1 convs, SD 2.x as linears: keep the checkpoint's
    # parameter shapes so image checkpoints merge in by tree operations.
    if self.use_linear_projection:
      proj_in = layers.dense(channels, ("embed", "mlp"), name="proj_in", dtype=self.dtype)
      proj_out = layers.dense(channels, ("mlp", "embed"), name="proj_out", dtype=self.dtype)
    else:
      proj_in = layers.conv2d(channels, 1, name="proj_in", dtype=self.dtype)
      proj_out = layers.conv2d(channels, 1, name="proj_out", dtype=self.dtype)
    h = einops.rearrange(proj_in(h), "b h w c -> b (h w) c")
    for i in range(self.depth):
      h = BasicTransformerBlock(self.num_heads, dtype=self.dtype,
                                name=f"transformer_blocks_{i}")(h, context_BxSxE)
      if self.temporal is not None and self.temporal.attention and frames is not None:
        h = TemporalTransformerBlock(self.temporal, self.num_heads, dtype=self.dtype,
                                     name=f"temporal_transformer_blocks_{i}")(
                                         h, context_BxSxE, frames)
    h = einops.rearrange(h, "b (h w) c -> b h w c", h=height, w=width)
    return proj_out(h) + x_BxHxWxC
