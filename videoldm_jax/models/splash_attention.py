"""Softmax attention through Pallas' splash-attention kernel, for TPUs.

`jax.experimental.pallas.ops.tpu.splash_attention` runs FlashAttention's blocked
algorithm on the TPU's cores: the logits exist one (block_q, block_kv) tile at a time,
and the backward pass recomputes them from the saved log-sum-exp, so no (L, S) array
per head is kept. XLA cannot partition the kernel's custom call, so under a mesh it
runs in a `shard_map` over the batch and head axes (`attention.partitioned`); each
device computes its own batch elements and heads. On other platforms the kernel runs in
Pallas' interpreter (what the CPU tests check against the formula).

Memory (`python -m bench.splash_attention`: compiled for a TPU v5e from libtpu's
topology description on a CPU host; bench/README.md has the table): one SD 1.5
level-0 self-attention of a 16-frame clip (8 heads, 2560 tokens, head dim 40, bf16),
forward + backward, keeps 640 MiB of temporaries against the formula's 4800 MiB on one
chip. No TPU run has timed the kernel yet, and in whole SD 1.5 steps it took less
memory in some cases and more in one, so it is opt-in (attention="splash").
"""

import functools
import math
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as sm
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

TILE = 128  # sequence lengths must be multiples of this (the TPU's lane width)
# The largest head dim given to the kernel. The SD VAE's single 512-wide attention head
# would need blocks of ~18 MiB in the backward pass, over the 16 MiB of VMEM a v5e or
# v5p kernel gets by default (an estimate: not compiled yet); it keeps XLA's formula.
MAX_HEAD_DIM = 256


def supports(num_queries: int, num_keys: int, head_dim: Optional[int] = None) -> bool:
  """Whether the kernel takes these sequence lengths (multiples of TILE) and head dim
  (at most MAX_HEAD_DIM; None: not checked)."""
  return (num_queries % TILE == 0 and num_keys % TILE == 0
          and (head_dim is None or head_dim <= MAX_HEAD_DIM))


def _block(n: int) -> int:
  return next(b for b in (512, 256, TILE) if n % b == 0)


@functools.lru_cache(maxsize=64)
def _kernel(heads: int, num_queries: int, num_keys: int, interpret: bool):
  """The kernel for (heads, L, D) x (heads, S, D), full (unmasked) attention."""
  bq, bkv = _block(num_queries), _block(num_keys)
  blocks = sk.BlockSizes(block_q=bq, block_kv=bkv, block_kv_compute=bkv,
                         block_q_dkv=bq, block_kv_dkv=bkv, block_kv_dkv_compute=bkv,
                         block_q_dq=bq, block_kv_dq=bkv)
  mask = sm.MultiHeadMask([sm.FullMask((num_queries, num_keys))] * heads)
  # Concrete tables even when first asked for inside a trace (a shard_map's body makes
  # constants tracers): the kernel is cached across traces.
  with jax.ensure_compile_time_eval():
    return sk.make_splash_mha(mask, head_shards=1, q_seq_shards=1, block_sizes=blocks,
                              interpret=interpret)


def _one_shard(q, k, v, interpret: bool):
  """(B, H, L, D) x (B, H, S, D) -> (B, H, L, D) on the arrays at hand."""
  return jax.vmap(_kernel(q.shape[1], q.shape[2], k.shape[2], interpret))(q, k, v)


def precision_allows(dtype) -> bool:
  """Whether the kernel compiles for `dtype` under jax_default_matmul_precision: Mosaic
  refuses half-precision matmuls at a float32 contract precision ("highest"; the
  kernel's matmuls take the default when it is lowered)."""
  half = jnp.dtype(dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
  return not half or jax.config.jax_default_matmul_precision in (
      None, "default", "fastest", "bfloat16")


def shards(mesh: Optional[Mesh], axes: Sequence[str]) -> int:
  """How many ways `axes` of `mesh` split a dimension (1 without a mesh)."""
  return 1 if mesh is None else math.prod(mesh.shape[a] for a in axes)


def attention(q_BxHxLxD: jax.Array, k_BxHxSxD: jax.Array, v_BxHxSxD: jax.Array, *,
              mesh: Optional[Mesh] = None, batch_axes: Sequence[str] = (),
              head_axes: Sequence[str] = (), interpret: Optional[bool] = None
              ) -> jax.Array:
  """softmax(q k^T / sqrt(D)) v per batch element and head: (B, H, L, D) x (B, H, S, D)
  -> (B, H, L, D) in v's dtype. L and S must be multiples of TILE (`supports`); under
  `mesh`, B must divide by the `batch_axes` and H by the `head_axes` (each device runs
  its own shard). `interpret` (default: off a TPU) runs Pallas' interpreter."""
  b, h, length, _ = q_BxHxLxD.shape
  if not supports(length, k_BxHxSxD.shape[2]):
    raise ValueError(f"splash attention: sequence lengths {length} and "
                     f"{k_BxHxSxD.shape[2]} must be multiples of {TILE}")
  if interpret is None:
    interpret = jax.default_backend() != "tpu"
  # The kernel takes q pre-scaled.
  q = (q_BxHxLxD * jnp.asarray(q_BxHxLxD.shape[-1] ** -0.5, q_BxHxLxD.dtype))
  run = functools.partial(_one_shard, interpret=interpret)
  if mesh is not None and mesh.size > 1:
    nb, nh = shards(mesh, batch_axes), shards(mesh, head_axes)
    if b % nb or h % nh:
      raise ValueError(f"splash attention: batch {b} and heads {h} must divide by the "
                       f"mesh's {nb} batch and {nh} head shards")
    spec = P(tuple(batch_axes) or None, tuple(head_axes) or None)
    run = jax.shard_map(run, mesh=mesh, in_specs=(spec,) * 3, out_specs=spec,
                        check_vma=False)
  return run(q, k_BxHxSxD, v_BxHxSxD).astype(v_BxHxSxD.dtype)
