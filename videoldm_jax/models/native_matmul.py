"""Weight gradients and convolutions through the C++ kernels for XLA:CPU
(native/matmul_cpu.cc): of dense layers, dW = x^T dy with x^T read in place (no
transpose before a canonical dot, no Eigen dot contracting the token axis;
models/matmul.py says why both are slow); of stride-1 size-keeping convolutions, the
kernel gradient with each tap's shifted x read in place, and the convolution itself
(forward pass and input gradient, models/conv.py).

Under a mesh each device computes the weight gradients' sum over its own tokens (batch
elements) and the partial sums are added across the devices that split them (an
all-reduce, as XLA's own dot would do), and convolves its own images; the weight's axes
are computed whole on every device, so operands sharded along their channels (tensor
parallelism) are gathered first.
"""

import functools

import jax
import jax.numpy as jnp
from jax.experimental.custom_partitioning import custom_partitioning
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from videoldm_jax.native import build
from videoldm_jax.native.vmap import sequential_vmap

# dy's width must be whole vectors of the kernel's widest registers (16 floats).
WIDTH_MULTIPLE = 16


def available() -> bool:
  """Whether the kernel is built and registered (builds it on the first call)."""
  return build.load("matmul")[0] is not None


def supports(x_NxA: jax.Array, dy_NxB: jax.Array) -> bool:
  """Whether `weight_grad` takes these operands: 2-D float32, the same number of
  tokens (at least one), dy's width a multiple of WIDTH_MULTIPLE, and the kernel built."""
  return (x_NxA.ndim == 2 and dy_NxB.ndim == 2 and x_NxA.shape[0] == dy_NxB.shape[0] >= 1
          and x_NxA.dtype == dy_NxB.dtype == jnp.float32
          and dy_NxB.shape[1] % WIDTH_MULTIPLE == 0 and available())


def _ffi_weight_grad(x, dy):
  return jax.ffi.ffi_call(
      "videoldm_weight_grad", jax.ShapeDtypeStruct((x.shape[1], dy.shape[1]), jnp.float32),
      vmap_method="sequential")(x, dy)


def _over_leading_axis(fn, rule: str, whole: tuple, summed: bool = True):
  """`fn` (x, y) -> z as a custom_partitioning op that keeps x's sharding of its leading
  (token or batch) axis: with `summed`, x and y are split along it, each device sums
  its own part and the partial sums are all-reduced (z whole); without, only x is split
  and z keeps x's split (each device computes its own images). The operands' other
  axes (factors `whole` of `rule`) are whole on every device."""
  op = custom_partitioning(fn)

  def partition(mesh, arg_shapes, result_shape):
    lead = (tuple(arg_shapes[0].sharding.spec) + (None,))[0]
    split = (lead, lead if summed else None)
    args = tuple(NamedSharding(mesh, P(s, *[None] * (len(a.shape) - 1)))
                 for a, s in zip(arg_shapes, split))

    def per_device(x, y):
      z = fn(x, y)
      return jax.lax.psum(z, lead) if summed and lead is not None else z

    z_lead = None if summed else lead
    z_sharding = NamedSharding(mesh, P(z_lead, *[None] * (len(result_shape.shape) - 1)))
    return mesh, per_device, z_sharding, args

  op.def_partition(partition=partition, sharding_rule=rule, need_replication_factors=whole)
  return op


_weight_grad = sequential_vmap(
    _over_leading_axis(_ffi_weight_grad, "n a, n b -> a b", ("a", "b")))


def weight_grad(x_NxA: jax.Array, dy_NxB: jax.Array) -> jax.Array:
  """x^T dy: (N, A) x (N, B) -> (A, B) float32, each element summed over the N tokens
  in order. Only for operands `supports` accepts."""
  if not supports(x_NxA, dy_NxB):
    raise ValueError(f"the C++ weight gradient takes 2-D float32 x (N, A) and dy (N, B) "
                     f"with B a multiple of {WIDTH_MULTIPLE} and a built kernel "
                     f"({build.load('matmul')[1] or 'built'}); got {x_NxA.dtype}"
                     f"{x_NxA.shape} and {dy_NxB.dtype}{dy_NxB.shape}")
  return _weight_grad(x_NxA, dy_NxB)


def _ffi_conv_weight_grad(x, dy, kernel_hw):
  return jax.ffi.ffi_call(
      "videoldm_conv_weight_grad",
      jax.ShapeDtypeStruct((*kernel_hw, x.shape[-1], dy.shape[-1]), jnp.float32),
      vmap_method="sequential")(x, dy)


@functools.cache
def _conv_weight_grad_op(kernel_hw: tuple):
  """The partitioned conv weight gradient of one kernel size (the batch's partial sums
  all-reduced, as `_over_leading_axis`)."""
  def fn(x, dy):
    return _ffi_conv_weight_grad(x, dy, kernel_hw)

  return sequential_vmap(
      _over_leading_axis(fn, "b h w i, b h w o -> u v i o", ("h", "w", "i", "o")))


def conv_supports(x_BxHxWxI: jax.Array, dy_BxHxWxO: jax.Array, kernel_hw: tuple) -> bool:
  """Whether `conv_weight_grad` takes these operands: 4-D float32 of one spatial shape,
  an odd kernel, dy's channels a multiple of WIDTH_MULTIPLE, and the kernel built."""
  return (x_BxHxWxI.ndim == 4 and x_BxHxWxI.shape[:3] == dy_BxHxWxO.shape[:3]
          and min(x_BxHxWxI.shape[1:3]) >= 1  # (the kernel divides by W: SIGFPE at 0)
          and x_BxHxWxI.dtype == dy_BxHxWxO.dtype == jnp.float32
          and len(kernel_hw) == 2 and all(k % 2 == 1 for k in kernel_hw)
          and dy_BxHxWxO.shape[-1] % WIDTH_MULTIPLE == 0 and available())


def conv_weight_grad(x_BxHxWxI: jax.Array, dy_BxHxWxO: jax.Array, kernel_hw: tuple
                     ) -> jax.Array:
  """The kernel gradient (KH, KW, I, O) of a stride-1 convolution with zero padding
  KH // 2, KW // 2 (the output keeps x's size) from its input x (B, H, W, I) and output
  gradient dy (B, H, W, O), float32. Only for operands `conv_supports` accepts."""
  kernel_hw = tuple(int(k) for k in kernel_hw)
  if not conv_supports(x_BxHxWxI, dy_BxHxWxO, kernel_hw):
    raise ValueError(f"the C++ conv weight gradient takes 4-D float32 x and dy of one "
                     f"spatial shape, an odd kernel and dy's channels a multiple of "
                     f"{WIDTH_MULTIPLE} ({build.load('matmul')[1] or 'built'}); got "
                     f"{x_BxHxWxI.dtype}{x_BxHxWxI.shape}, {dy_BxHxWxO.dtype}"
                     f"{dy_BxHxWxO.shape}, kernel {kernel_hw}")
  return _conv_weight_grad_op(kernel_hw)(x_BxHxWxI, dy_BxHxWxO)


def _ffi_conv_same(x, k):
  return jax.ffi.ffi_call(
      "videoldm_conv_same", jax.ShapeDtypeStruct(x.shape[:3] + (k.shape[3],), jnp.float32),
      vmap_method="sequential")(x, k)


_conv_same = sequential_vmap(_over_leading_axis(
    _ffi_conv_same, "b h w i, u v i o -> b h w o", ("h", "w", "i", "u", "v", "o"),
    summed=False))

# The kernel's widest kernel row (taps per row held on the stack).
MAX_KERNEL_WIDTH = 15


def conv_same_supports(x_BxHxWxI: jax.Array, k_KHxKWxIxO: jax.Array) -> bool:
  """Whether `conv_same` takes these operands: 4-D float32 x and kernel, an odd kernel
  at most MAX_KERNEL_WIDTH wide, x's channels the kernel's inputs, the kernel's outputs
  a multiple of WIDTH_MULTIPLE, and the library built."""
  return (x_BxHxWxI.ndim == 4 and k_KHxKWxIxO.ndim == 4
          and min(x_BxHxWxI.shape[1:3]) >= 1  # (an empty image: XLA's, no kernel call)
          and x_BxHxWxI.dtype == k_KHxKWxIxO.dtype == jnp.float32
          and x_BxHxWxI.shape[-1] == k_KHxKWxIxO.shape[2]
          and all(k % 2 == 1 for k in k_KHxKWxIxO.shape[:2])
          and k_KHxKWxIxO.shape[1] <= MAX_KERNEL_WIDTH
          and k_KHxKWxIxO.shape[3] % WIDTH_MULTIPLE == 0 and available())


def conv_same(x_BxHxWxI: jax.Array, k_KHxKWxIxO: jax.Array) -> jax.Array:
  """The stride-1 convolution (cross-correlation) of x (B, H, W, I) with an odd kernel
  (KH, KW, I, O) and zero padding KH // 2, KW // 2: (B, H, W, O) float32, every
  element summed over the taps in order. Only for operands `conv_same_supports` takes."""
  if not conv_same_supports(x_BxHxWxI, k_KHxKWxIxO):
    raise ValueError(f"the C++ convolution takes 4-D float32 x (B, H, W, I) and an odd "
                     f"kernel (KH, KW, I, O) at most {MAX_KERNEL_WIDTH} wide with O a "
                     f"multiple of {WIDTH_MULTIPLE} ({build.load('matmul')[1] or 'built'});"
                     f" got {x_BxHxWxI.dtype}{x_BxHxWxI.shape} and kernel "
                     f"{k_KHxKWxIxO.dtype}{k_KHxKWxIxO.shape}")
  return _conv_same(x_BxHxWxI, k_KHxKWxIxO)


def call_flops(target_name: str, operand_shapes, result_shapes) -> int:
  """Model FLOPs of the kernels' custom calls (train/flops.py): those of the dot or
  convolution they replace, 2 N A B and 2 B H W KH KW I O; 0 for other targets."""
  if target_name == "videoldm_weight_grad":
    (n, a), (_, b) = operand_shapes[:2]
    return 2 * n * a * b
  if target_name == "videoldm_conv_weight_grad":
    (b, h, w, _), (kh, kw, i, o) = operand_shapes[0], result_shapes[0]
    return 2 * b * h * w * kh * kw * i * o
  if target_name == "videoldm_conv_same":
    (b, h, w, _), (kh, kw, i, o) = operand_shapes[:2]
    return 2 * b * h * w * kh * kw * i * o
  return 0
