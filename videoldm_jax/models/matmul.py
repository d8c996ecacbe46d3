"""The matmul of dense layers, with a weight gradient XLA:CPU runs on its fast path.

A dense layer y = x W on tokens x (N, a) has the weight gradient dW = x^T dy, a dot that
contracts the token axis of both operands. XLA:CPU hands dots to YNNPACK only in the
canonical (M, K) x (K, N) form; this one goes to Eigen instead, which runs it at
70-144 GFLOP/s alone on the 2-core EPYC (the tall outputs (512, 128) and (1024, 256)
at ~70) and asynchronously, so in the train step it shows up as idle gaps rather than
as an op (`bench/profile_step.py`'s timeline: ~0.9 s of the 6.6 s W2 temporal step).
Materialising x^T first (an optimisation barrier stops XLA from folding the transpose
back into the dot) makes it a canonical dot that YNNPACK takes: 86-156 GFLOP/s on the
same shapes, the transpose included (bench/README.md).

That transpose is only fast when it reads one large array. When x is a product of two
large arrays (GEGLU's h * gelu(gate) before the feed-forward's out-projection), XLA
fuses the product into the transpose, whose loop then reads both with a stride of a
whole row and stalls: 40-73 ms per (8192, 512) in the W2 step, against ~3 ms to
transpose one materialised array. `dense_matmul_chunked` computes dW over row chunks of
~1 MB, dW = sum_c x_c^T dy_c, so each fused transpose works on what fits in cache
(`weight_grad="chunked"` in `layers.dense`).

Where it applies (float32, dy's width a multiple of 16, the C++ kernels built), dW
comes from the C++ kernel of models/native_matmul.py instead, which reads x^T in place
at 173-190 GFLOP/s alone on the W1 / W2 shapes (bench/README.md); the XLA forms above
remain for bfloat16, other widths and machines without a compiler.

Only the backward pass changes, and only its weight gradient: the forward and dx are
the plain dots, so values are those of `x @ W` and gradients equal its gradients to
float32 rounding (tests/test_matmul.py). On other platforms
(GPU / TPU), whose matmul units take transposed operands natively, dense layers use
`lax.dot_general` unchanged.
"""

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.custom_derivatives import SymbolicZero

from videoldm_jax.models import native_matmul

# Whether weight gradients go to the C++ kernel where it takes them (bench/ab_step.py
# turns it off for the A/B against XLA's dots).
USE_KERNEL = True


def _matmul(x: jax.Array, w: jax.Array) -> jax.Array:
  return lax.dot_general(x, w, (((x.ndim - 1,), (0,)), ((), ())))


def _weight_grad_transposed(x_NxA: jax.Array, dy_NxB: jax.Array) -> jax.Array:
  """x^T dy (A, B) with x^T materialised: one canonical (A, N) x (N, B) dot."""
  return _matmul(lax.optimization_barrier(x_NxA.T), dy_NxB)


# Elements of x per chunk of the chunked weight gradient: 256K floats (1 MB), so the
# chunk of each operand the fused transpose reads fits a core's L2 with room to spare.
# Alone, with x a product (x + b) * y of two arrays, GFLOP/s: (16384, 256) x 64,
# (8192, 512) x 128, (2048, 1024) x 256: one fused transpose then a dot 11, 34, 42;
# chunks of 1024 rows 43, 55, 62. Chunks of 64K / 128K / 256K / 512K elements (each
# chunk's dot left to Eigen) 48 / 44 / 47 / 43, 66 / 61 / 59 / 58, 20 / 49 / 57 / 57.
CHUNK_ELEMENTS = 256 * 1024
# Fewer rows than this make each chunk's dot too thin (K = 64 ran at 20 GFLOP/s above).
MIN_CHUNK_ROWS = 256


def chunk_rows(num_rows: int, width: int) -> int:
  """Rows per chunk: the largest divisor of num_rows with rows x width <=
  CHUNK_ELEMENTS, or num_rows itself (one chunk) when that divisor is below
  MIN_CHUNK_ROWS."""
  target = max(1, CHUNK_ELEMENTS // max(width, 1))
  for rows in range(min(target, num_rows), MIN_CHUNK_ROWS - 1, -1):
    if num_rows % rows == 0:
      return rows
  return num_rows


def _weight_grad_chunked(x_NxA: jax.Array, dy_NxB: jax.Array) -> jax.Array:
  """x^T dy (A, B) as the sum over row chunks c of x_c^T dy_c (see the module
  docstring); the transposed variant when there would be one chunk."""
  (n, a), b = x_NxA.shape, dy_NxB.shape[1]
  rows = chunk_rows(n, a)
  if rows == n:
    return _weight_grad_transposed(x_NxA, dy_NxB)

  def add_chunk(acc, chunk):
    return acc + _weight_grad_transposed(*chunk), None

  chunks = (x_NxA.reshape(n // rows, rows, a), dy_NxB.reshape(n // rows, rows, b))
  # The sum over chunks in at least float32, as one dot would accumulate its products.
  acc = jnp.zeros((a, b), jnp.promote_types(jnp.result_type(x_NxA, dy_NxB), jnp.float32))
  return lax.scan(add_chunk, acc, chunks)[0]


def linear_in_x(forward, input_grad, weight_grad):
  """`forward(x, w)`, linear in x, as a custom_vjp function whose backward pass is
  `input_grad(dy, w)` and `weight_grad(x, dy, w)`; x is kept for the backward pass
  only when w is differentiated (a frozen W, the image model in temporal-only training,
  needs no x) and neither gradient is computed for a symbolic-zero dy."""
  def fwd(x, w):
    # symbolic_zeros: the primals arrive wrapped with whether they are differentiated.
    # (An empty array of x's dtype: dx is cast back to it, bf16 x times a float32 w
    # gave a float32 dx.)
    return forward(x.value, w.value), (w.value, x.value if w.perturbed else None,
                                       jnp.zeros((0,), x.value.dtype))

  def bwd(residuals, dy):
    w, x, x_dtype = residuals
    if isinstance(dy, SymbolicZero):
      return None, None
    dx = input_grad(dy, w).astype(x_dtype.dtype)
    return dx, None if x is None else weight_grad(x, dy, w).astype(w.dtype)

  op = jax.custom_vjp(forward)
  op.defvjp(fwd, bwd, symbolic_zeros=True)
  return op


def _with_weight_grad(weight_grad):
  def input_grad(dy, w):
    return lax.dot_general(dy, w, (((dy.ndim - 1,), (1,)), ((), ())))

  def dense_weight_grad(x, dy, w):
    rows = math.prod(x.shape[:-1])  # (not -1: a layer of 0 features cannot infer it)
    x, dy = jnp.reshape(x, (rows, x.shape[-1])), jnp.reshape(dy, (rows, dy.shape[-1]))
    if USE_KERNEL and native_matmul.supports(x, dy):
      return native_matmul.weight_grad(x, dy)
    return weight_grad(x, dy)

  return linear_in_x(_matmul, input_grad, dense_weight_grad)


dense_matmul = _with_weight_grad(_weight_grad_transposed)
dense_matmul.__doc__ = """x (..., a) @ W (a, b) -> (..., b), with dW = (materialised x^T) @ dy."""
dense_matmul_chunked = _with_weight_grad(_weight_grad_chunked)
dense_matmul_chunked.__doc__ = """x (..., a) @ W (a, b) -> (..., b), with dW summed over
row chunks of x (for x a fused product of large arrays; module docstring)."""
WEIGHT_GRADS = {"transposed": dense_matmul, "chunked": dense_matmul_chunked}


def dense_dot_general(lhs, rhs, dimension_numbers, precision=None,
                      preferred_element_type=None, weight_grad: str = "transposed",
                      **kwargs):
  """`lax.dot_general` for `nn.Dense(dot_general=...)`: the dense contraction (last
  axis of x with the first of a 2-D kernel) goes through `WEIGHT_GRADS[weight_grad]`
  when compiling for a CPU; anything else, or any other platform, is `lax.dot_general`
  itself."""
  from videoldm_jax.models import attention  # the target platform lives there

  dense = (((lhs.ndim - 1,), (0,)), ((), ()))
  if (attention.target_platform() == "cpu" and rhs.ndim == 2 and precision is None
      and preferred_element_type is None and not kwargs
      and tuple(map(tuple, dimension_numbers[0])) == dense[0]
      and tuple(map(tuple, dimension_numbers[1])) == dense[1]):
    return WEIGHT_GRADS[weight_grad](lhs, rhs)
  return lax.dot_general(lhs, rhs, dimension_numbers, precision=precision,
                         preferred_element_type=preferred_element_type, **kwargs)


# For `nn.Dense(dot_general=...)` on inputs that are products of large arrays; one
# object, so modules using it compare equal (models/params.py memoises on modules).
dense_dot_general_chunked = functools.partial(dense_dot_general, weight_grad="chunked")
