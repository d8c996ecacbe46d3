"""The stride-1 convolutions with size-keeping zero padding (the ResBlocks' 3x3, the
temporal layers' (3, 1, 1)) through the C++ kernels of models/native_matmul.py on CPU:
the forward pass, the input gradient (the same convolution of dy with the flipped,
transposed kernel) and the kernel gradient.

XLA computes a convolution's weight gradient as another convolution, over the batch,
after transposing x to (C, H, W, B) (48 ms of transposes in a W1 full step) and runs it
on Eigen at 140-183 GFLOP/s alone on the W1 / W2 ResBlock shapes; the kernel reads x in
place for every tap at 190-214. Its forward convolutions run on Eigen at 138-204, the
kernel's at 205-217 (bench/README.md). Values equal `lax.conv_general_dilated`'s to
float32 rounding (tests/test_native_matmul.py); where a kernel does not take the
operands (channels not whole vectors, bfloat16, no compiler) that part stays XLA's.
"""

import jax
import jax.numpy as jnp
from jax import lax

from videoldm_jax.models import matmul, native_matmul

_NHWC = ("NHWC", "HWIO", "NHWC")

# The forward pass and input gradient through the C++ convolution where it takes the
# operands (False: XLA's convolutions, the kernel gradient still the C++ one, and the
# temporal layers' convolution a concatenated matmul, as before the late night of
# 2026-12-04).
USE_NATIVE_CONV = True


def _xla_conv(x, w):
  pad = tuple((k // 2, k // 2) for k in w.shape[:2])
  return lax.conv_general_dilated(x, w, (1, 1), pad, dimension_numbers=_NHWC)


def _conv(x, w):
  if USE_NATIVE_CONV and native_matmul.conv_same_supports(x, w):
    return native_matmul.conv_same(x, w)
  return _xla_conv(x, w)


def _input_grad(dy, w):
  """dx of `_conv(x, w)`: for a stride-1 size-keeping odd kernel, the same convolution
  of dy with the kernel flipped in space and its channel axes swapped (the C++ one),
  else XLA's transpose of its convolution."""
  w_flipped = jnp.flip(w, (0, 1)).swapaxes(2, 3)
  if USE_NATIVE_CONV and native_matmul.conv_same_supports(dy, w_flipped):
    return native_matmul.conv_same(dy, w_flipped)
  x_shape = jax.ShapeDtypeStruct(dy.shape[:-1] + (w.shape[2],), dy.dtype)
  return jax.linear_transpose(lambda x_: _xla_conv(x_, w), x_shape)(dy)[0]


def _kernel_grad(x, dy, w):
  return native_matmul.conv_weight_grad(x, dy, w.shape[:2])


_conv_same = matmul.linear_in_x(_conv, _input_grad, _kernel_grad)


def conv_same(x_BxHxWxI: jax.Array, w_KHxKWxIxO: jax.Array) -> jax.Array:
  """Stride-1 convolution of (B, H, W, I) with an odd (KH, KW, I, O) kernel and zero
  padding KH // 2, KW // 2: (B, H, W, O); its gradients from the C++ kernels (x kept
  for the kernel gradient only when the kernel trains)."""
  return _conv_same(x_BxHxWxI, w_KHxKWxIxO)


def takes(x_BxHxWxI: jax.Array, w_KHxKWxIxO: jax.Array) -> bool:
  """Whether `conv_same` runs on the C++ kernels for these operands: a CPU target, the
  kernels on (`matmul.USE_KERNEL`), float32 NHWC x and HWIO kernel (odd, at most
  native_matmul.MAX_KERNEL_WIDTH wide) with whole vectors of output channels."""
  from videoldm_jax.models import attention  # the target platform lives there

  if attention.target_platform() != "cpu" or not matmul.USE_KERNEL:
    return False
  if x_BxHxWxI.ndim != 4 or w_KHxKWxIxO.ndim != 4 or w_KHxKWxIxO.dtype != x_BxHxWxI.dtype:
    return False
  dy = jax.ShapeDtypeStruct(x_BxHxWxI.shape[:3] + (w_KHxKWxIxO.shape[3],), x_BxHxWxI.dtype)
  return (native_matmul.conv_supports(x_BxHxWxI, dy, w_KHxKWxIxO.shape[:2])
          and native_matmul.conv_same_supports(x_BxHxWxI, w_KHxKWxIxO))


def conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation=None,
                         rhs_dilation=None, dimension_numbers=None, feature_group_count=1,
                         precision=None, **kwargs):
  """`lax.conv_general_dilated` for `nn.Conv(conv_general_dilated=...)`: a stride-1,
  size-keeping, NHWC x HWIO convolution that `takes` accepts goes through `conv_same`;
  anything else is `lax.conv_general_dilated` itself."""
  def plain():
    return lax.conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation,
                                    rhs_dilation, dimension_numbers, feature_group_count,
                                    precision=precision, **kwargs)

  if (lhs.ndim != 4 or rhs.ndim != 4 or feature_group_count != 1 or precision is not None
      or kwargs or isinstance(padding, str) or not takes(lhs, rhs)):
    return plain()
  same = tuple((k // 2, k // 2) for k in rhs.shape[:2])
  if (tuple(window_strides) != (1, 1) or tuple(map(tuple, padding)) != same
      or tuple(lhs_dilation or (1, 1)) != (1, 1) or tuple(rhs_dilation or (1, 1)) != (1, 1)
      or lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers)
      != lax.conv_dimension_numbers(lhs.shape, rhs.shape, _NHWC)):
    return plain()
  return conv_same(lhs, rhs)
