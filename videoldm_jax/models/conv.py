"""Convolutions whose kernel gradient XLA:CPU leaves slow: the stride-1 convolutions
with size-keeping zero padding of the ResBlocks (3x3) take their weight gradient from
the C++ kernel of models/native_matmul.py.

XLA computes a convolution's weight gradient as another convolution, over the batch,
after transposing x to (C, H, W, B) (48 ms of transposes in a W1 full step) and runs it
on Eigen at 140-183 GFLOP/s alone on the W1 / W2 ResBlock shapes; the kernel reads x in
place for every tap at 190-214 (bench/README.md). The forward pass and the input
gradient stay XLA's convolutions, so values are those of `lax.conv_general_dilated`
and gradients equal its gradients to float32 rounding (tests/test_native_matmul.py).
"""

import jax
from jax import lax
from jax.custom_derivatives import SymbolicZero

from videoldm_jax.models import matmul, native_matmul

_NHWC = ("NHWC", "HWIO", "NHWC")


def _conv(x, w):
  pad = tuple((k // 2, k // 2) for k in w.shape[:2])
  return lax.conv_general_dilated(x, w, (1, 1), pad, dimension_numbers=_NHWC)


@jax.custom_vjp
def conv_same(x_BxHxWxI: jax.Array, w_KHxKWxIxO: jax.Array) -> jax.Array:
  """Stride-1 convolution of (B, H, W, I) with an odd (KH, KW, I, O) kernel and zero
  padding KH // 2, KW // 2: (B, H, W, O); its kernel gradient from the C++ kernel."""
  return _conv(x_BxHxWxI, w_KHxKWxIxO)


def _fwd(x, w):
  # As in models/matmul.py: a frozen kernel (temporal-only training) keeps no x.
  return _conv(x.value, w.value), (w.value, x.value if w.perturbed else None)


def _bwd(residuals, dy):
  w, x = residuals
  if isinstance(dy, SymbolicZero):
    return None, None
  x_shape = jax.ShapeDtypeStruct(dy.shape[:-1] + (w.shape[2],), dy.dtype)
  dx, = jax.linear_transpose(lambda x_: _conv(x_, w), x_shape)(dy)
  if x is None:
    return dx, None
  return dx, native_matmul.conv_weight_grad(x, dy, w.shape[:2]).astype(w.dtype)


conv_same.defvjp(_fwd, _bwd, symbolic_zeros=True)


def conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation=None,
                         rhs_dilation=None, dimension_numbers=None, feature_group_count=1,
                         precision=None, **kwargs):
  """`lax.conv_general_dilated` for `nn.Conv(conv_general_dilated=...)`: a stride-1,
  size-keeping, NHWC x HWIO float32 convolution on a CPU target goes through
  `conv_same` where the kernel takes it; anything else is `lax.conv_general_dilated`
  itself."""
  from videoldm_jax.models import attention  # the target platform lives there

  def plain():
    return lax.conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation,
                                    rhs_dilation, dimension_numbers, feature_group_count,
                                    precision=precision, **kwargs)

  if (attention.target_platform() != "cpu" or not matmul.USE_KERNEL or lhs.ndim != 4
      or rhs.ndim != 4 or feature_group_count != 1 or precision is not None or kwargs
      or isinstance(padding, str)):
    return plain()
  same = tuple((k // 2, k // 2) for k in rhs.shape[:2])
  dy = jax.ShapeDtypeStruct(lhs.shape[:3] + (rhs.shape[3],), lhs.dtype)
  if (tuple(window_strides) != (1, 1) or tuple(map(tuple, padding)) != same
      or tuple(lhs_dilation or (1, 1)) != (1, 1) or tuple(rhs_dilation or (1, 1)) != (1, 1)
      or lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers)
      != lax.conv_dimension_numbers(lhs.shape, rhs.shape, _NHWC)
      or rhs.dtype != lhs.dtype
      or not native_matmul.conv_supports(lhs, dy, rhs.shape[:2])):
    return plain()
  return conv_same(lhs, rhs)
