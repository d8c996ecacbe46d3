"""Pieces shared by the metric networks: inference BatchNorm, precision, input range."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

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


# Float frames beyond this are refused: google-research's FVD code takes ANY dtype as
# [0, 255] (cast, then 2 x / 255 - 1), and torch code often keeps frames as float
# [0, 1], so ported clips would otherwise pass unscaled (features far off) without an
# error. The margin over 1 leaves room for unclipped decoder outputs.
FLOAT_LIMIT = 2.0


def check_float_range(x, what: str = "frames") -> None:
  """Host-side check of an input batch (any shape): float values must lie in [-1, 1]
  (up to FLOAT_LIMIT), else a ValueError naming `what`, the peak and the conversions.
  Integer input is left to `check_pixels`."""
  x = np.asarray(x)
  if jnp.issubdtype(x.dtype, jnp.floating) and x.size:
    peak = float(np.max(np.abs(x)))
    if not peak <= FLOAT_LIMIT:  # (NaN too)
      raise ValueError(f"float {what} must be in [-1, 1], got max |x| = {peak:.4g} "
                       f"(uint8 [0, 255] {what}: pass them as uint8; float [0, 255]: "
                       f"x / 127.5 - 1; float [0, 1]: 2 x - 1)")


def to_minus_one_one(x: jax.Array) -> jax.Array:
  """uint8 [0, 255] -> float32 [-1, 1] (x / 127.5 - 1); float input is taken as [-1, 1];
  other dtypes are an error (`check_pixels`)."""
  check_pixels(x)
  if x.dtype == jnp.uint8:
    return x.astype(jnp.float32) / 127.5 - 1.0
  return x.astype(jnp.float32)
