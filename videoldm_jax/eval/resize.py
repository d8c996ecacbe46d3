"""Bilinear resizing of frames, in the two conventions that metric code uses.

The resize in front of a metric network changes its features noticeably (for I3D,
TF1's legacy bilinear and half-pixel bilinear give visibly different logits), so the
convention is explicit everywhere:

  "half_pixel"  pixel centres at (i + 0.5): output pixel i samples the input at
                (i + 0.5) * in / out - 0.5, two-tap linear interpolation, NO
                antialiasing when shrinking. This is `jax.image.resize(...,
                "bilinear", antialias=False)`, PyTorch's `F.interpolate(mode="bilinear",
                align_corners=False)` (pytorch-fid, StyleGAN-V) and TF2's
                `tf.image.resize(..., antialias=False)`.
  "tf1"         TF1's `tf.compat.v1.image.resize_bilinear` default (align_corners=False,
                half_pixel_centers=False): output pixel i samples the input at
                i * in / out, the upper neighbour clamped to the last row/column. This
                is what google-research/frechet_video_distance applies before I3D.
"""

import jax
import jax.numpy as jnp

METHODS = ("half_pixel", "tf1")


def resize_bilinear(x_BxHxWxC: jax.Array, height: int, width: int,
                    method: str = "half_pixel") -> jax.Array:
  """Resizes the two axes before the last, (..., H, W, C) -> (..., height, width, C).

  Any number of leading axes (e.g. (B, T, H, W, C) videos). Float in, float out
  (integer input is converted to float32 first). A size that does not change is a
  no-op in both conventions.
  """
  if method not in METHODS:
    raise ValueError(f"unknown resize method {method!r}; expected one of {METHODS}")
  if not jnp.issubdtype(x_BxHxWxC.dtype, jnp.floating):
    x_BxHxWxC = x_BxHxWxC.astype(jnp.float32)
  *lead, h, w, c = x_BxHxWxC.shape
  if (h, w) == (height, width):
    return x_BxHxWxC
  if method == "half_pixel":
    return jax.image.resize(x_BxHxWxC, (*lead, height, width, c), "bilinear",
                            antialias=False)
  x = _tf1_axis(x_BxHxWxC, x_BxHxWxC.ndim - 3, height)
  return _tf1_axis(x, x.ndim - 2, width)


def _tf1_axis(x: jax.Array, axis: int, out_size: int) -> jax.Array:
  """TF1 legacy bilinear along one axis: src = i * in / out, upper tap clamped."""
  in_size = x.shape[axis]
  if in_size == out_size:
    return x
  src = jnp.arange(out_size, dtype=jnp.float32) * (in_size / out_size)
  lo = jnp.floor(src).astype(jnp.int32)
  hi = jnp.minimum(lo + 1, in_size - 1)
  frac = src - lo.astype(jnp.float32)
  shape = [1] * x.ndim
  shape[axis] = out_size
  frac = frac.reshape(shape).astype(x.dtype)
  a, b = jnp.take(x, lo, axis=axis), jnp.take(x, hi, axis=axis)
  return a + (b - a) * frac
