"""Softmax attention through the C++ kernel for XLA:CPU (native/attention_cpu.cc).

The same function as the blocked path of models/blocked_attention.py, with both passes
as XLA FFI custom calls that split (batch, head) pairs over XLA's intra-op threads
(XLA:CPU ran the blocked loop's dots on one core; bench/README.md). Inputs in the
projections' own layout, (B, L, H, D), so no transpose runs around the call.
"""

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental.custom_partitioning import custom_partitioning
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from videoldm_jax.native import build
from videoldm_jax.native.vmap import sequential_vmap


def available() -> bool:
  """Whether the kernel is built and registered (builds it on the first call)."""
  return build.load("attention")[0] is not None


def unavailable_reason() -> str:
  """Why `available()` is False ("" when it is True)."""
  return build.load("attention")[1]


def _ffi_forward(q, k, v):
  b, length, heads, dim = q.shape
  return tuple(jax.ffi.ffi_call(
      "videoldm_attention_forward",
      (jax.ShapeDtypeStruct(q.shape, jnp.float32),
       jax.ShapeDtypeStruct((b, heads, length), jnp.float32)),
      vmap_method="sequential")(q, k, v, scale=np.float32(dim ** -0.5)))


def _ffi_backward(q, k, v, out, lse, d_out):
  return tuple(jax.ffi.ffi_call(
      "videoldm_attention_backward",
      tuple(jax.ShapeDtypeStruct(x.shape, jnp.float32) for x in (q, k, v)),
      vmap_method="sequential")(q, k, v, out, lse, d_out,
                                scale=np.float32(q.shape[-1] ** -0.5)))


# Under a mesh, each device runs the kernel on its own batch elements and heads: the
# calls are partitioned over B and H as the operands are (any other axis is gathered).
# Without this, XLA would gather every operand to every device and compute the whole
# batch on each.
def _partitioned(fn, rule: str, batch_heads_dims: tuple):
  """`fn` as a custom_partitioning op whose operands and results keep the sharding of
  q's batch and head axes; `batch_heads_dims[i]` = (batch dim, head dim) of the i-th
  operand and then of the i-th result."""
  op = custom_partitioning(fn)

  def partition(mesh, arg_shapes, result_shape):
    spec = tuple(arg_shapes[0].sharding.spec) + (None,) * 4
    batch, heads = spec[0], spec[2]

    def sharding(ndim, dims):
      parts = [None] * ndim
      parts[dims[0]], parts[dims[1]] = batch, heads
      return NamedSharding(mesh, P(*parts))

    n_args = len(arg_shapes)
    args = tuple(sharding(len(a.shape), batch_heads_dims[i]) for i, a in enumerate(arg_shapes))
    results = tuple(sharding(len(r.shape), batch_heads_dims[n_args + i])
                    for i, r in enumerate(result_shape))
    return mesh, fn, results, args

  op.def_partition(partition=partition, sharding_rule=rule,
                   need_replication_factors=("l", "d", "s"))  # in order of first use
  return op


_BLHD, _BHL = (0, 2), (0, 1)
_forward = sequential_vmap(_partitioned(
    _ffi_forward, "b l h d, b s h d, b s h d -> b l h d, b h l", (_BLHD,) * 3 + (_BLHD, _BHL)))
_backward = sequential_vmap(_partitioned(
    _ffi_backward,
    "b l h d, b s h d, b s h d, b l h d, b h l, b l h d -> b l h d, b s h d, b s h d",
    (_BLHD,) * 4 + (_BHL, _BLHD) + (_BLHD,) * 3))


@jax.custom_vjp
def _attention(q, k, v):
  return _forward(q, k, v)[0]


def _attention_fwd(q, k, v):
  out, lse = _forward(q, k, v)
  return out, (q, k, v, out, lse)


def _attention_bwd(residuals, d_out):
  return _backward(*residuals, d_out)


_attention.defvjp(_attention_fwd, _attention_bwd)


def call_flops(target_name: str, operand_shapes) -> int:
  """Model FLOPs of one of this module's custom calls (train/flops.py), in torch
  FlopCounterMode's convention for attention: the forward's two matmuls 4 B H L S D;
  the backward's five (logits recomputed, dv, dp, dq, dk) 2.5 times that. 0 for other
  targets."""
  if target_name not in ("videoldm_attention_forward", "videoldm_attention_backward"):
    return 0
  (b, length, heads, dim), (_, keys, _, _) = operand_shapes[:2]
  forward = 4 * b * heads * length * keys * dim
  return forward if target_name == "videoldm_attention_forward" else forward * 5 // 2


def attention(q_BxLxHxD: jax.Array, k_BxSxHxD: jax.Array, v_BxSxHxD: jax.Array
              ) -> jax.Array:
  """softmax(q k^T / sqrt(D)) v per batch element and head: (B, L, H, D) x (B, S, H, D)
  -> (B, L, H, D) float32. CPU only; where the kernel cannot be built (`available()`
  is False) this raises with the reason."""
  if not available():
    raise RuntimeError(f"the C++ attention kernel is unavailable: {unavailable_reason()}")
  # The kernel takes every size from q and k: operands that disagree would be read out
  # of bounds (garbage, no error), and S = 0 divides by zero (SIGFPE).
  q, k, v = q_BxLxHxD.shape, k_BxSxHxD.shape, v_BxSxHxD.shape
  if len(q) != 4 or len(k) != 4 or k != v or (q[0], q[2], q[3]) != (k[0], k[2], k[3]) \
      or k[1] < 1:
    raise ValueError(f"native attention needs q (B, L, H, D) and k, v (B, S, H, D) with "
                     f"the same B, H, D and S >= 1; got q {q}, k {k}, v {v}")
  f32 = lambda x: x.astype(jnp.float32)
  return _attention(f32(q_BxLxHxD), f32(k_BxSxHxD), f32(v_BxSxHxD))
