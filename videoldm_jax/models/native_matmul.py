"""The dense layers' weight gradient dW = x^T dy through the C++ kernel for XLA:CPU
(native/matmul_cpu.cc), which reads x^T in place: no transpose before a canonical dot,
no Eigen dot contracting the token axis (models/matmul.py says why both are slow).

Under a mesh each device computes the sum over its own tokens and the partial sums are
added across the devices that split the tokens (an all-reduce, as XLA's own dot would
do); the weight's axes are computed whole on every device.
"""

import jax
import jax.numpy as jnp
from jax.experimental.custom_partitioning import custom_partitioning
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from videoldm_jax.native import build

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


def _partition(mesh, arg_shapes, result_shape):
  tokens = tuple(arg_shapes[0].sharding.spec)[:1] or (None,)
  tokens = tokens[0]
  args = (NamedSharding(mesh, P(tokens, None)),) * 2

  def per_device(x, dy):
    dw = _ffi_weight_grad(x, dy)
    return dw if tokens is None else jax.lax.psum(dw, tokens)

  return mesh, per_device, NamedSharding(mesh, P(None, None)), args


_weight_grad = custom_partitioning(_ffi_weight_grad)
_weight_grad.def_partition(partition=_partition, sharding_rule="n a, n b -> a b",
                           need_replication_factors=("a", "b"))


def weight_grad(x_NxA: jax.Array, dy_NxB: jax.Array) -> jax.Array:
  """x^T dy: (N, A) x (N, B) -> (A, B) float32, each element summed over the N tokens
  in order. Only for operands `supports` accepts."""
  if not supports(x_NxA, dy_NxB):
    raise ValueError(f"the C++ weight gradient takes 2-D float32 x (N, A) and dy (N, B) "
                     f"with B a multiple of {WIDTH_MULTIPLE} and a built kernel "
                     f"({build.load('matmul')[1] or 'built'}); got {x_NxA.dtype}"
                     f"{x_NxA.shape} and {dy_NxB.dtype}{dy_NxB.shape}")
  return _weight_grad(x_NxA, dy_NxB)


def call_flops(target_name: str, operand_shapes) -> int:
  """Model FLOPs of the kernel's custom call (train/flops.py): 2 N A B, those of the
  dot it replaces; 0 for other targets."""
  if target_name != "videoldm_weight_grad":
    return 0
  (n, a), (_, b) = operand_shapes[:2]
  return 2 * n * a * b
