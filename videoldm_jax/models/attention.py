"""Multi-head attention, GEGLU feed-forward and the SD transformer block.

Module names mirror diffusers (`attn1/to_q`, `ff/net_0/proj`, `transformer_blocks_0`)
so that checkpoints map onto them by `convert.torch_layout.flax_path_to_torch_key`.
"""

import contextlib
from typing import Optional, Sequence

import einops
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from videoldm_jax.models import blocked_attention as blocked_lib
from videoldm_jax.models import native_attention as native_lib
from videoldm_jax.models import splash_attention as splash_lib
from videoldm_jax.models import layers


# Which attention runs (read when a model is traced):
#   "auto"     on CPU the C++ kernel (models/native_attention.py) for all unmasked
#              attention, or XLA's blocked path for long sequences where the kernel
#              cannot be built; on GPUs cuDNN's fused (flash) attention for long
#              unmasked attention in bf16 / fp16 (`cudnn_supports`), XLA's formula for
#              the rest; XLA's formula on TPUs;
#   "plain"    always the formula (the benchmarks' baseline);
#   "blocked"  XLA's blocked path for long sequences on every platform: on an accelerator
#              it trades some speed for memory (no L x S array is stored), which is what
#              lets long clips fit a 16 GiB chip (configs/keyframe_sd15_v5e64.py);
#   "native"   the kernel as in "auto", an error where it is unavailable (CPU only);
#   "splash"   Pallas' splash attention (models/splash_attention.py), meant for TPUs,
#              for long unmasked attention whose lengths are multiples of 128 and head
#              dim at most 256, in a program traced under `partitioned` (the train
#              step) whose batch and heads split over the mesh; XLA's formula for the
#              rest. Off a TPU it runs in Pallas' interpreter (slow: for tests). Not
#              "auto"'s choice on TPUs until a TPU has timed it: compiled for TPUs it
#              took less memory in some SD 1.5 steps and more in another
#              (bench/README.md).
# The platform is the one the program is compiled for: this process's backend, unless
# `set_implementation` names another (videoldm-compile compiles for a TPU on a CPU).
IMPLEMENTATIONS = ("auto", "plain", "blocked", "native", "splash")
_implementation = "auto"
_platform: Optional[str] = None
# (mesh, batch axes, head axes) of the program being traced (`partitioned`).
_partitioning: tuple[Optional[Mesh], tuple[str, ...], tuple[str, ...]] = (None, (), ())


def set_implementation(name: str, platform: Optional[str] = None) -> None:
  """Selects the attention implementation (and the target platform, default this
  process's backend) for models traced from now on."""
  global _implementation, _platform
  if name not in IMPLEMENTATIONS:
    raise ValueError(f"attention implementation must be one of {IMPLEMENTATIONS}, got {name!r}")
  _implementation, _platform = name, platform


def implementation() -> tuple[str, Optional[str]]:
  """(implementation, target platform or None = this process's backend)."""
  return _implementation, _platform


@contextlib.contextmanager
def partitioned(mesh: Mesh, batch_axes: Sequence[str] = (), head_axes: Sequence[str] = ()):
  """`with partitioned(mesh, batch_axes, head_axes):` trace (lower) a program that runs on
  `mesh`, whose `batch_axes` split the activations' batch and `head_axes` the attention
  heads (config.batch_axes and the rules' "heads"): the trainer's and videoldm-compile's
  train step. Only there does a kernel XLA cannot partition (splash attention) run, per
  shard in a shard_map. Elsewhere (sampling, exports, latent caching, benchmarks) no
  mesh is known and the formula runs: Mosaic refuses a program over several devices
  that it cannot partition, and those programs run wherever their inputs live."""
  global _partitioning
  overlap = set(batch_axes) & set(head_axes)
  if overlap:
    raise ValueError(f"mesh axes {sorted(overlap)} split both the batch {tuple(batch_axes)} "
                     f"and the attention heads {tuple(head_axes)}")
  previous, _partitioning = _partitioning, (mesh, tuple(batch_axes), tuple(head_axes))
  try:
    yield
  finally:
    _partitioning = previous


def partitioning() -> tuple[Optional[Mesh], tuple[str, ...], tuple[str, ...]]:
  """What the innermost `partitioned` context set: (mesh or None, batch axes, head axes)."""
  return _partitioning


def target_platform() -> str:
  return _platform or jax.default_backend()


# The smallest attention (queries x keys per head) that takes the C++ kernel on CPU:
# all of it. Until 2026-12-04 only long attention did (>= MIN_BLOCKED_ELEMENTS logits)
# and the rest ran XLA's formula, whose backward runs the temporal attention's thousands
# of 8 x 8 dots one by one. On a 2-core AVX-512 EPYC, in one W1 temporal-stage run
# (bench.ab_step, 6 rounds), the kernel for the temporal attention too took the step
# from 1.885 to 1.723 s; for the cross-attention on one context token as well, in a
# second run, from 1.547 to 1.453 s (W2: 4.018 -> 3.976 s). bench/README.md has the
# rounds.
NATIVE_MIN_LOGITS = 1


def attention_path(num_queries: int, num_keys: int, dtype=None,
                   head_dim: Optional[int] = None) -> str:
  """The computation that unmasked attention with these sequence lengths runs under the
  selected implementation (see IMPLEMENTATIONS): "native" (the C++ kernel: on CPU from
  NATIVE_MIN_LOGITS logits per head), "blocked" (XLA's loop over query blocks, for long
  sequences: >= MIN_BLOCKED_ELEMENTS logits per head), "cudnn" (GPU, "auto", long
  sequences; given the operands' `dtype` and `head_dim`, only where `cudnn_supports`
  takes them), "splash" ("splash": long sequences whose lengths are multiples of 128;
  `dot_product_attention` takes the formula instead where the batch or heads do not
  split over the mesh) or "formula"."""
  if (dtype is None) != (head_dim is None):
    raise ValueError(f"attention_path: give the operands' dtype and head dim together "
                     f"(got dtype={dtype}, head_dim={head_dim})")
  if _implementation == "plain":
    return "formula"
  logits = num_queries * num_keys
  long = logits >= blocked_lib.MIN_BLOCKED_ELEMENTS
  if (long or logits >= NATIVE_MIN_LOGITS) and use_native():
    return "native"
  if long and _implementation == "splash" and splash_lib.supports(num_queries, num_keys,
                                                                 head_dim):
    return "splash"
  if long and (_implementation == "blocked" or target_platform() == "cpu"):
    return "blocked"
  # Short attention (the temporal layers' 8-16 frames) stays with the formula: a flash
  # kernel's query tiles (64-128 rows) would be mostly padding.
  if long and _implementation == "auto" and target_platform() == "gpu" and (
      dtype is None or cudnn_supports(dtype, head_dim, num_queries, num_keys)):
    return "cudnn"
  return "formula"


def cudnn_supports(dtype, head_dim: int, num_queries: int, num_keys: int) -> bool:
  """Whether cuDNN's fused attention takes these inputs, forward and backward: bf16 /
  fp16, a head dim that is a multiple of 8 up to 128 (256 from Hopper, compute
  capability 9.0, on), even sequence lengths (jax 0.11.2 refuses to train on SD's 77
  context tokens: "Unsupported sequence length Q 2560, KV 77"), on an NVIDIA GPU host
  (CUDA; a ROCm build has no cuDNN). A GPU program traced on a CPU host
  (videoldm-compile's CPU proxy of a GPU topology) keeps the formula."""
  if "cuda" not in jax.devices()[0].client.platform_version.lower():
    return False
  if num_queries % 2 or num_keys % 2:
    return False
  if jnp.dtype(dtype) not in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)):
    return False
  capability = getattr(jax.devices()[0], "compute_capability", "0")
  most = 256 if float(capability) >= 9.0 else 128
  return head_dim % 8 == 0 and head_dim <= most


def use_native() -> bool:
  """Whether the selected implementation runs the C++ kernel where `attention_path`
  allows it. Builds the kernel on first use; "native" raises where it cannot."""
  if _implementation not in ("auto", "native"):
    return False
  if target_platform() != "cpu":
    if _implementation == "native":
      raise ValueError(f"attention 'native' is a CPU kernel; the target is {target_platform()}")
    return False
  if _implementation == "native" and not native_lib.available():
    raise RuntimeError(f"attention 'native' requested, but {native_lib.unavailable_reason()}")
  return native_lib.available()


def dot_product_attention(q_BxLxD: jax.Array, k_BxSxD: jax.Array, v_BxSxD: jax.Array,
                          num_heads: int, mask_BxLxS: Optional[jax.Array] = None
                          ) -> jax.Array:
  """Scaled dot-product attention over `num_heads` heads, (B, L, D) -> (B, L, D); or,
  for 4-D inputs (B, L, N, D), (B, S, N, D), N independent sequences per batch
  element, each attending along axis 1 (the temporal layers' frames of each pixel,
  in the frames-major layout of the spatial layers, so that no transpose is needed).

  Logits and softmax run in float32 whatever the compute dtype: SD 2.x overflows in
  half precision otherwise ("upcast_attention"). Unmasked attention may go through the
  C++ kernel or `blocked_attention` (no L x S array stored; see `attention_path`).
  """
  if q_BxLxD.ndim == 4:
    return _attention_per_sequence(q_BxLxD, k_BxSxD, v_BxSxD, num_heads, mask_BxLxS)
  if k_BxSxD.shape[0] not in (1, q_BxLxD.shape[0]):
    raise ValueError(f"dot_product_attention: keys of batch {k_BxSxD.shape[0]} for "
                     f"queries of batch {q_BxLxD.shape[0]}; expected the same or 1 (one "
                     "context shared by the batch)")
  if k_BxSxD.shape[0] != q_BxLxD.shape[0]:
    # One context for the whole batch (B = 1 keys): the formula's einsum broadcast it,
    # the kernels index keys by the queries' batch and must see it repeated.
    k_BxSxD, v_BxSxD = (jnp.broadcast_to(x, q_BxLxD.shape[:1] + x.shape[1:])
                        for x in (k_BxSxD, v_BxSxD))
  path = "formula" if mask_BxLxS is not None else attention_path(
      q_BxLxD.shape[1], k_BxSxD.shape[1], q_BxLxD.dtype, q_BxLxD.shape[-1] // num_heads)
  if path == "splash":
    mesh, batch_axes, head_axes = _partitioning
    if (mesh is None or q_BxLxD.shape[0] % splash_lib.shards(mesh, batch_axes)
        or num_heads % splash_lib.shards(mesh, head_axes)
        or not splash_lib.precision_allows(q_BxLxD.dtype)):
      # No mesh known (see `partitioned`), shards that would not split evenly (XLA
      # partitions the formula), or bf16 at jax_default_matmul_precision="highest",
      # which Mosaic refuses.
      path = "formula"
  if path == "splash":
    q, k, v = (einops.rearrange(x, "b l (h d) -> b h l d", h=num_heads)
               for x in (q_BxLxD, k_BxSxD, v_BxSxD))
    out = splash_lib.attention(q, k, v, mesh=mesh, batch_axes=batch_axes,
                               head_axes=head_axes, interpret=target_platform() != "tpu")
    return einops.rearrange(out, "b h l d -> b l (h d)")
  if path in ("cudnn", "native"):  # (B, L, H*D) viewed as (B, L, H, D): no transpose
    q, k, v = (einops.rearrange(x, "b l (h d) -> b l h d", h=num_heads)
               for x in (q_BxLxD, k_BxSxD, v_BxSxD))
    if path == "native":
      q, k, v = _kernel_layout(q, k, v)
    # cuDNN keeps its logits and softmax in float32; the C++ kernel is float32 throughout.
    out = (jax.nn.dot_product_attention(q, k, v, implementation="cudnn") if path == "cudnn"
           else native_lib.attention(q, k, v))
    if path == "native":  # (pins the output's gradient, the backward kernel's operand)
      out = _kernel_layout(out)[0]
    return einops.rearrange(out.astype(v_BxSxD.dtype), "b l h d -> b l (h d)")
  if path == "blocked":
    if target_platform() == "cpu":  # one (batch, head) at a time, sized for the cache
      q, k, v = (einops.rearrange(x, "b l (h d) -> (b h) l d", h=num_heads)
                 for x in (q_BxLxD, k_BxSxD, v_BxSxD))
      out = blocked_lib.blocked_attention(q, k, v).astype(v_BxSxD.dtype)
      return einops.rearrange(out, "(b h) l d -> b l (h d)", h=num_heads)
    q, k, v = (einops.rearrange(x, "b l (h d) -> b h l d", h=num_heads)
               for x in (q_BxLxD, k_BxSxD, v_BxSxD))
    out = blocked_lib.blocked_attention_batched(q, k, v).astype(v_BxSxD.dtype)
    return einops.rearrange(out, "b h l d -> b l (h d)")
  q, k, v = (einops.rearrange(x, "b l (h d) -> b h l d", h=num_heads)
             for x in (q_BxLxD, k_BxSxD, v_BxSxD))
  scale = q.shape[-1] ** -0.5
  logits = jnp.einsum("bhld,bhsd->bhls", q.astype(jnp.float32), k.astype(jnp.float32)) * scale
  if mask_BxLxS is not None:
    logits = jnp.where(mask_BxLxS[:, None], logits, jnp.finfo(jnp.float32).min)
  weights = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
  out = jnp.einsum("bhls,bhsd->bhld", weights, v)
  return einops.rearrange(out, "b h l d -> b l (h d)")


def _kernel_layout(*operands):
  """(B, L, H, D) operands of the C++ kernel, pinned (on a known mesh, see
  `partitioned`) to batch and heads split as far as they divide, the rest whole: the
  kernel's partitioner takes only such layouts. A tensor axis that splits H * D but not
  H (2 heads on 4 devices) gave an operand split over D, which it cannot take."""
  mesh, batch_axes, head_axes = _partitioning
  if mesh is None:
    return operands
  fits = lambda size, axes: axes and size % splash_lib.shards(mesh, axes) == 0
  b, _, h, _ = operands[0].shape
  spec = PartitionSpec(batch_axes if fits(b, batch_axes) else None, None,
                       head_axes if fits(h, head_axes) else None, None)
  pin = NamedSharding(mesh, spec)
  return tuple(jax.lax.with_sharding_constraint(x, pin) for x in operands)


def _attention_per_sequence(q_BxLxNxD, k_BxSxNxD, v_BxSxNxD, num_heads, mask):
  """`dot_product_attention` of (B, L, N, D) queries on (B, S, N, D) keys and values."""
  if mask is not None:
    raise ValueError("masked attention takes (B, L, D) inputs, got queries of shape "
                     f"{q_BxLxNxD.shape}")
  # N sequences of H heads each are N*H heads of one sequence: (B, L, N*D) is a reshape,
  # which every path takes as it is (the kernel's (B, L, H, D) layout included).
  merge = lambda x: x.reshape(x.shape[:2] + (-1,))
  out = dot_product_attention(merge(q_BxLxNxD), merge(k_BxSxNxD), merge(v_BxSxNxD),
                              q_BxLxNxD.shape[2] * num_heads)
  return out.reshape(q_BxLxNxD.shape[:3] + (-1,))


class Attention(nn.Module):
  """Self- or cross-attention with q/k/v/out projections (diffusers `Attention`)."""
  num_heads: int
  qkv_bias: bool = False
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x_BxLxC: jax.Array, context_BxSxE: Optional[jax.Array] = None
               ) -> jax.Array:
    """(B, L, C) attending to itself or to `context` (B, S, E) -> (B, L, C); or
    (B, L, N, C) -> (B, L, N, C), N sequences per batch element attending along axis 1
    to themselves or to `context` (B, S, N, E) (`dot_product_attention`)."""
    width = x_BxLxC.shape[-1]
    ctx = x_BxLxC if context_BxSxE is None else context_BxSxE
    proj = lambda name: layers.dense(width, ("embed", "heads"), name=name,
                                     use_bias=self.qkv_bias, dtype=self.dtype)
    q, k, v = proj("to_q")(x_BxLxC), proj("to_k")(ctx), proj("to_v")(ctx)
    out = dot_product_attention(q, k, v, self.num_heads)
    return layers.dense(width, ("heads", "embed"), name="to_out_0", dtype=self.dtype)(out)


def gelu(x: jax.Array) -> jax.Array:
  """Exact (erf) GELU, 0.5 x (1 + erf(x / sqrt 2)), as torch's `F.gelu`.

  `jax.nn.gelu(approximate=False)` writes it with erfc, which XLA CPU expands into two
  exponential branches and selects; erf is one rational polynomial. The two differ by
  ~1e-7 absolute, only where GELU is ~0 (bench/README.md has the timing).
  """
  return 0.5 * x * (1.0 + jax.lax.erf(x * np.float32(0.5 ** 0.5).astype(x.dtype)))


@jax.custom_vjp
def gated_gelu(h: jax.Array, gate: jax.Array) -> jax.Array:
  """h * gelu(gate), elementwise on two arrays of one shape; the backward keeps only h
  and gate and recomputes GELU and its derivative from gate.

  Left to autodiff, the train step kept erf(gate / sqrt 2), gelu(gate) and partial
  products of them for the backward, and the backward's fusion of one level-0 GEGLU in
  the W1 step read eight (16, 1024, 256) arrays. Recomputing costs an erf and an exp
  per element; XLA's temporary memory of the key-frame step fell by 6-11% (W1 temporal
  1647 -> 1471 MiB, W2 temporal 3183 -> 2859 MiB) at the same step time within the
  host's noise (bench/README.md).
  """
  return h * gelu(gate)


def _gated_gelu_fwd(h, gate):
  return gated_gelu(h, gate), (h, gate)


def _gated_gelu_bwd(residuals, dy):
  h, gate = residuals
  cdf = 0.5 * (1.0 + jax.lax.erf(gate * np.float32(0.5 ** 0.5).astype(gate.dtype)))
  # d/dx [x Phi(x)] = Phi(x) + x phi(x), phi the standard normal density.
  density = np.float32((2 * np.pi) ** -0.5).astype(gate.dtype) * jnp.exp(-0.5 * gate * gate)
  return dy * (gate * cdf), dy * h * (cdf + gate * density)


gated_gelu.defvjp(_gated_gelu_fwd, _gated_gelu_bwd)


class GEGLU(nn.Module):
  """Gated GELU projection (Shazeer 2020): (B, L, C) -> (B, L, inner).

  One (C, 2 inner) kernel and bias named `proj`, as diffusers stores them, multiplied as
  two (C, inner) halves: the backward then sums two input gradients instead of
  concatenating the halves' (B, L, 2 inner) gradients, and each dot is narrower
  (faster on XLA CPU, bench/README.md).
  """
  inner: int
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    h, gate = layers.DenseHalves(self.inner, ("embed", "mlp"), name="proj",
                                 dtype=self.dtype)(x)
    return gated_gelu(h, gate)


class FeedForward(nn.Module):
  """GEGLU feed-forward with 4x expansion: (B, L, C) -> (B, L, C)."""
  mult: int = 4
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    width = x.shape[-1]
    h = GEGLU(self.mult * width, dtype=self.dtype, name="net_0")(x)
    # h is GEGLU's product of two (B, L, inner) arrays, which XLA fuses into dW's
    # transpose: the chunked weight gradient keeps that transpose in cache.
    return layers.dense(width, ("mlp", "embed"), name="net_2", dtype=self.dtype,
                        weight_grad="chunked")(h)


class BasicTransformerBlock(nn.Module):
  """Pre-LN self-attention, cross-attention to the context, GEGLU FF; all residual.

  With `context=None` the second attention attends to x itself (as diffusers does).
  """
  num_heads: int
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x_BxLxC: jax.Array, context_BxSxE: Optional[jax.Array]) -> jax.Array:
    ln = lambda name: layers.layer_norm(1e-5, name=name, dtype=self.dtype)
    attn = lambda name: Attention(self.num_heads, dtype=self.dtype, name=name)
    x = x_BxLxC + attn("attn1")(ln("norm1")(x_BxLxC))
    x = x + attn("attn2")(ln("norm2")(x), context_BxSxE)
    return x + FeedForward(dtype=self.dtype, name="ff")(ln("norm3")(x))
