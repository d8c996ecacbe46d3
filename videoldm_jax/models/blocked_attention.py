"""Memory-efficient softmax attention for long sequences (flash-attention style).

XLA materialises attention's (B, H, L, S) logits, probabilities and their gradients as
whole arrays. At the first level of a 32 x 32-latent UNet that is 1024 x 1024 floats per
frame and head, hundreds of MB per step that stream through memory several times, and
the training step's time went mostly there (bench/README.md, profiling notes). Here each
(batch x head) is processed on its own, in blocks of queries whose logits fit in the
cores' L2 caches. The forward pass keeps only the output and the per-row log-sum-exp; the
backward pass recomputes each block's probabilities from them (as FlashAttention does),
so nothing of size L x S is ever stored and the step's memory no longer grows with L x S.

Two layouts of the same computation:
  blocked_attention          (N, L, D), one (batch x head) after another: the CPU path,
                             sized for a core's cache; for arrays on one device.
  blocked_attention_batched  (B, H, L, D), one head after another, all of the batch at
                             once: the accelerator path. The loop never runs along the
                             batch, which a mesh shards (a loop over a sharded axis
                             would make XLA gather every device's batch to each device).

Numerics: the same softmax(q k^T / sqrt(d)) v in float32, rounded differently
(~1e-6 relative); gradients match `jax.grad` of the plain formula to the same level.
"""

import functools

import jax
import jax.numpy as jnp

# Logits per query block: 256K floats (1 MB; each of the two threads' half is one Zen 2
# core's 512 KB L2). On the idle 2-core EPYC the attention of (32 heads, 1024 x 1024,
# d 32) took forward + backward 254 / 256 / 244 ms with blocks of 128 / 256 / 1024
# queries, the plain formula 461 ms; blocks of 1 MB keep the working set in cache for
# longer sequences too (bench/README.md).
BLOCK_ELEMENTS = 256 * 1024

# The smallest attention (queries x keys per head) worth the blocked path. With the
# untransposed backward, on the 2-core EPYC (16 MB L3; forward + backward):
# (64 heads, 256 x 256, d 32) 35.6 ms blocked vs 47.8 ms plain; (16, 256 x 256, d 64)
# 13.5 vs 12.8; (128, 64 x 64, d 32) 6.7 vs 4.8 ms (the loop's per-head overhead wins).
MIN_BLOCKED_ELEMENTS = 64 * 1024


def query_block(num_queries: int, num_keys: int, elements: int = BLOCK_ELEMENTS) -> int:
  """The largest divisor of num_queries with block x num_keys <= elements (>= 1)."""
  target = max(1, elements // max(num_keys, 1))
  for b in range(min(target, num_queries), 0, -1):
    if num_queries % b == 0:
      return b
  return 1


def _forward_one(q, k, v, block: int):
  """One head: q (L, D), k / v (S, D) -> (out (L, D), log-sum-exp (L,))."""
  length, dim = q.shape
  k_t = (k * dim ** -0.5).T  # (D, S), transposed once per head, outside the block loop

  def one_block(q_blk):
    s = q_blk @ k_t
    m = jnp.max(s, axis=-1, keepdims=True)
    p = jnp.exp(s - m)
    total = jnp.sum(p, axis=-1, keepdims=True)
    return (p @ v) / total, (m + jnp.log(total))[:, 0]

  out, lse = jax.lax.map(one_block, q.reshape(length // block, block, dim))
  return out.reshape(length, dim), lse.reshape(length)


def _blocks_transposed(x_LxD: jax.Array, n: int) -> jax.Array:
  """(L, D) -> (n, D, L / n): each query block's rows as columns."""
  return jnp.transpose(x_LxD.reshape(n, -1, x_LxD.shape[1]), (0, 2, 1))


def _backward_one(q, k, v, out, lse, d_out, block: int):
  """Gradients (dq, dk, dv) of one head, probabilities recomputed block by block.

  Every dot in the loop is a plain (M, K) x (K, N) product. The textbook dv += p^T dO
  and dk += ds^T q contract over the rows of a (block, S) array; XLA CPU ran those 4-5x
  slower than the same FLOPs untransposed (bench/README.md). Here the loop carries
  dk^T and dv^T (D, S) and takes dO^T, q^T (transposed once, outside the loop) instead.
  """
  length, dim = q.shape
  scale = dim ** -0.5
  delta = jnp.sum(d_out * out, axis=-1)  # rowsum(dO * O) = rowsum(P * dP)
  n = length // block
  k_scaled = k * scale
  k_t, v_t = k_scaled.T, v.T
  xs = (q.reshape(n, block, dim), _blocks_transposed(q * scale, n),
        d_out.reshape(n, block, dim), _blocks_transposed(d_out, n),
        lse.reshape(n, block), delta.reshape(n, block))

  def one_block(carry, x):
    dk_t, dv_t = carry
    q_blk, q_t_blk, do_blk, do_t_blk, lse_blk, delta_blk = x
    p = jnp.exp(q_blk @ k_t - lse_blk[:, None])
    dv_t = dv_t + do_t_blk @ p
    ds = p * (do_blk @ v_t - delta_blk[:, None])
    dk_t = dk_t + q_t_blk @ ds
    return (dk_t, dv_t), ds @ k_scaled

  (dk_t, dv_t), dq = jax.lax.scan(one_block, (jnp.zeros_like(k_t), jnp.zeros_like(v_t)), xs)
  return dq.reshape(length, dim), dk_t.T, dv_t.T


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _attention(q, k, v, block, batched):
  return _attention_fwd(q, k, v, block, batched)[0]


def _per_head(fn, block: int, batched: bool):
  """fn(arrays of one head..., block) as a function of the arrays, vmapped over the batch
  axis (axis 0 of each) when `batched`."""
  one = functools.partial(fn, block=block)
  return jax.vmap(one) if batched else one


def _attention_fwd(q, k, v, block, batched):
  fwd = _per_head(_forward_one, block, batched)
  out, lse = jax.lax.map(lambda a: fwd(*a), (q, k, v))
  return out, (q, k, v, out, lse)


def _attention_bwd(block, batched, residuals, d_out):
  q, k, v, out, lse = residuals
  bwd = _per_head(_backward_one, block, batched)
  return jax.lax.map(lambda a: bwd(*a), (q, k, v, out, lse, d_out))


_attention.defvjp(_attention_fwd, _attention_bwd)


def blocked_attention(q_NxLxD: jax.Array, k_NxSxD: jax.Array, v_NxSxD: jax.Array
                      ) -> jax.Array:
  """softmax(q k^T / sqrt(D)) v per head, (N, L, D) x (N, S, D) -> (N, L, D) float32,
  N = batch x heads, without storing any (L, S) array across the forward/backward."""
  f32 = lambda x: x.astype(jnp.float32)
  block = query_block(q_NxLxD.shape[1], k_NxSxD.shape[1])
  return _attention(f32(q_NxLxD), f32(k_NxSxD), f32(v_NxSxD), block, False)


# Logits per (batch element, head) and query block on accelerators: 4M floats (16 MB);
# the whole local batch's block is live at once.
BATCHED_BLOCK_ELEMENTS = 4 * 1024 * 1024


def blocked_attention_batched(q_BxHxLxD: jax.Array, k_BxHxSxD: jax.Array,
                              v_BxHxSxD: jax.Array) -> jax.Array:
  """As `blocked_attention`, (B, H, L, D) x (B, H, S, D) -> (B, H, L, D) float32, looping
  over heads and query blocks only (module docstring: safe with a sharded batch)."""
  heads_first = lambda x: jnp.swapaxes(x.astype(jnp.float32), 0, 1)
  block = query_block(q_BxHxLxD.shape[2], k_BxHxSxD.shape[2], BATCHED_BLOCK_ELEMENTS)
  out = _attention(heads_first(q_BxHxLxD), heads_first(k_BxHxSxD), heads_first(v_BxHxSxD),
                   block, True)
  return jnp.swapaxes(out, 0, 1)
