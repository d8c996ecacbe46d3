"""Memory-efficient softmax attention for long sequences on CPU (flash-attention style).

XLA materialises attention's (B, H, L, S) logits, probabilities and their gradients as
whole arrays. At the first level of a 32 x 32-latent UNet that is 1024 x 1024 floats per
frame and head, hundreds of MB per step that stream through memory several times, and
the training step's time went mostly there (bench/README.md, profiling notes). Here each
(batch x head) is processed on its own, in blocks of queries whose logits fit in a core's
L2 cache. The forward pass keeps only the output and the per-row log-sum-exp; the
backward pass recomputes each block's probabilities from them (as FlashAttention does),
so nothing of size L x S is ever stored and the step's memory no longer grows with L x S.

Numerics: the same softmax(q k^T / sqrt(d)) v in float32, rounded differently
(~1e-6 relative); gradients match `jax.grad` of the plain formula to the same level.
"""

import functools

import jax
import jax.numpy as jnp

# Logits per query block: 256K floats (1 MB, one core's L2 here). On the idle 2-core
# EPYC the attention of (32 heads, 1024 x 1024, d 32) took forward + backward 254 / 256 /
# 244 ms with blocks of 128 / 256 / 1024 queries, the plain formula 461 ms; blocks of
# 1 MB keep the working set in cache for longer sequences too (bench/README.md).
BLOCK_ELEMENTS = 256 * 1024


def query_block(num_queries: int, num_keys: int) -> int:
  """The largest divisor of num_queries with block x num_keys <= BLOCK_ELEMENTS (>= 1)."""
  target = max(1, BLOCK_ELEMENTS // max(num_keys, 1))
  for b in range(min(target, num_queries), 0, -1):
    if num_queries % b == 0:
      return b
  return 1


def _forward_one(q, k, v, block: int):
  """One head: q (L, D), k / v (S, D) -> (out (L, D), log-sum-exp (L,))."""
  length, dim = q.shape
  scale = dim ** -0.5

  def one_block(q_blk):
    s = (q_blk * scale) @ k.T
    m = jnp.max(s, axis=-1, keepdims=True)
    p = jnp.exp(s - m)
    total = jnp.sum(p, axis=-1, keepdims=True)
    return (p @ v) / total, (m + jnp.log(total))[:, 0]

  out, lse = jax.lax.map(one_block, q.reshape(length // block, block, dim))
  return out.reshape(length, dim), lse.reshape(length)


def _backward_one(q, k, v, out, lse, d_out, block: int):
  """Gradients (dq, dk, dv) of one head, probabilities recomputed block by block."""
  length, dim = q.shape
  scale = dim ** -0.5
  delta = jnp.sum(d_out * out, axis=-1)  # rowsum(dO * O) = rowsum(P * dP)
  n = length // block
  xs = (q.reshape(n, block, dim), d_out.reshape(n, block, dim), lse.reshape(n, block),
        delta.reshape(n, block))

  def one_block(carry, x):
    dk, dv = carry
    q_blk, do_blk, lse_blk, delta_blk = x
    p = jnp.exp((q_blk * scale) @ k.T - lse_blk[:, None])
    dv = dv + p.T @ do_blk
    ds = p * (do_blk @ v.T - delta_blk[:, None])
    dk = dk + (ds.T @ q_blk) * scale
    return (dk, dv), (ds @ k) * scale

  (dk, dv), dq = jax.lax.scan(one_block, (jnp.zeros_like(k), jnp.zeros_like(v)), xs)
  return dq.reshape(length, dim), dk, dv


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _attention(q, k, v, block):
  return jax.lax.map(lambda a: _forward_one(*a, block)[0], (q, k, v))


def _attention_fwd(q, k, v, block):
  out, lse = jax.lax.map(lambda a: _forward_one(*a, block), (q, k, v))
  return out, (q, k, v, out, lse)


def _attention_bwd(block, residuals, d_out):
  q, k, v, out, lse = residuals
  return jax.lax.map(lambda a: _backward_one(*a, block), (q, k, v, out, lse, d_out))


_attention.defvjp(_attention_fwd, _attention_bwd)


def blocked_attention(q_NxLxD: jax.Array, k_NxSxD: jax.Array, v_NxSxD: jax.Array
                      ) -> jax.Array:
  """softmax(q k^T / sqrt(D)) v per head, (N, L, D) x (N, S, D) -> (N, L, D) float32,
  N = batch x heads, without storing any (L, S) array across the forward/backward."""
  f32 = lambda x: x.astype(jnp.float32)
  block = query_block(q_NxLxD.shape[1], k_NxSxD.shape[1])
  return _attention(f32(q_NxLxD), f32(k_NxSxD), f32(v_NxSxD), block)
