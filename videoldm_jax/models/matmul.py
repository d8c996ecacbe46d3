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

Only the backward pass changes, and only its weight gradient: the forward and dx are
the plain dots, so values are those of `x @ W` and gradients equal its gradients to
float32 rounding (tests/test_matmul.py). On other platforms
(GPU / TPU), whose matmul units take transposed operands natively, dense layers use
`lax.dot_general` unchanged.
"""

import jax
import jax.numpy as jnp
from jax import lax
from jax.custom_derivatives import SymbolicZero


def _matmul(x: jax.Array, w: jax.Array) -> jax.Array:
  return lax.dot_general(x, w, (((x.ndim - 1,), (0,)), ((), ())))


@jax.custom_vjp
def dense_matmul(x_NxA: jax.Array, w_AxB: jax.Array) -> jax.Array:
  """x (..., a) @ W (a, b) -> (..., b), with dW computed as (materialised x^T) @ dy."""
  return _matmul(x_NxA, w_AxB)


def _fwd(x, w):
  # symbolic_zeros: the primals arrive wrapped with whether they are differentiated. A
  # frozen W (the image model in temporal-only training) needs no x kept for dW.
  y = _matmul(x.value, w.value)
  return y, (w.value, x.value if w.perturbed else None)


def _bwd(residuals, dy):
  w, x = residuals
  if isinstance(dy, SymbolicZero):
    return None, None
  dx = lax.dot_general(dy, w, (((dy.ndim - 1,), (1,)), ((), ())))
  if x is None:
    return dx, None
  x_t = lax.optimization_barrier(jnp.reshape(x, (-1, x.shape[-1])).T)  # (a, N)
  dw = _matmul(x_t, jnp.reshape(dy, (-1, dy.shape[-1])))
  return dx, dw.astype(w.dtype)


dense_matmul.defvjp(_fwd, _bwd, symbolic_zeros=True)


def dense_dot_general(lhs, rhs, dimension_numbers, precision=None,
                      preferred_element_type=None, **kwargs):
  """`lax.dot_general` for `nn.Dense(dot_general=...)`: the dense contraction (last
  axis of x with the first of a 2-D kernel) goes through `dense_matmul` when compiling
  for a CPU; anything else, or any other platform, is `lax.dot_general` itself."""
  from videoldm_jax.models import attention  # the target platform lives there

  dense = (((lhs.ndim - 1,), (0,)), ((), ()))
  if (attention.target_platform() == "cpu" and rhs.ndim == 2 and precision is None
      and preferred_element_type is None and not kwargs
      and tuple(map(tuple, dimension_numbers[0])) == dense[0]
      and tuple(map(tuple, dimension_numbers[1])) == dense[1]):
    return dense_matmul(lhs, rhs)
  return lax.dot_general(lhs, rhs, dimension_numbers, precision=precision,
                         preferred_element_type=preferred_element_type, **kwargs)
