"""Pieces shared by the metric networks: inference BatchNorm, precision, input range."""

import flax.linen as nn
import jax
import jax.numpy as jnp

from videoldm_jax.models.layers import ONES, ZEROS, param_init

# Metrics must not depend on an accelerator's default matmul precision (bfloat16
# passes on TPU, TF32 on recent GPUs): the metric networks run in full float32.
PRECISION = jax.lax.Precision.HIGHEST


class EvalBatchNorm(nn.Module):
  """Inference BatchNorm over the last axis: (x - mean) / sqrt(var + eps) * scale + bias.

  Variables: params/bias (C,) and, with `use_scale`, params/scale (C,) (Sonnet v1's
  I3D has no scale, torchvision's BatchNorm2d has one); batch_stats/mean and
  batch_stats/var (C,).
  """
  epsilon: float = 1e-3
  use_scale: bool = False

  @nn.compact
  def __call__(self, x_BxC: jax.Array) -> jax.Array:
    c = x_BxC.shape[-1]
    mean = self.variable("batch_stats", "mean", jnp.zeros, (c,)).value
    var = self.variable("batch_stats", "var", jnp.ones, (c,)).value
    inv = jax.lax.rsqrt(var + self.epsilon)
    if self.use_scale:
      inv = inv * self.param("scale", param_init(ONES, ("norm",)), (c,))
    return (x_BxC - mean) * inv + self.param("bias", param_init(ZEROS, ("norm",)), (c,))


def check_pixels(x) -> None:
  """Frames must be uint8 [0, 255] or float [-1, 1]: other integer types (int64 from
  np.array of Python ints, uint16) would pass through unscaled and give wrong metrics
  without an error."""
  if x.dtype != jnp.uint8 and not jnp.issubdtype(x.dtype, jnp.floating):
    raise ValueError(f"frames of dtype {x.dtype}: expected uint8 in [0, 255] or float "
                     "in [-1, 1] (convert with .astype(np.uint8))")


def to_minus_one_one(x: jax.Array) -> jax.Array:
  """uint8 [0, 255] -> float32 [-1, 1] (x / 127.5 - 1); float input is taken as [-1, 1];
  other dtypes are an error (`check_pixels`)."""
  check_pixels(x)
  if x.dtype == jnp.uint8:
    return x.astype(jnp.float32) / 127.5 - 1.0
  return x.astype(jnp.float32)
