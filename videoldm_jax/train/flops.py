"""Model FLOPs of a JAX function, counted from its jaxpr.

The convention is that of PyTorch's `FlopCounterMode`: 2 x multiply-accumulates of
every matmul (`dot_general`, attention's two einsums included) and convolution, in
whatever the function executes: for a training step, the forward pass and the backward
pass, weight gradients only for what is differentiated. Elementwise work, norms and
reductions are not counted. Unlike XLA's cost analysis (which sees the optimised, fused
program and counts elementwise FLOPs too), this is a property of the model and of the
set of trainable parameters, so it is the numerator of MFU.

The jaxpr is pruned of dead code first, so work whose result is unused is not counted;
remat recomputation is counted (it is executed). Loops count their trip count times
(`scan`); `while` loops, whose trip count is unknown, count one iteration. The C++
attention kernel's custom calls and cuDNN's fused attention count as the attention they
compute; a Pallas kernel (splash attention) counts its body's matmuls once per block of
its grid, which is what it executes (its backward recomputes the logits twice), and a
shard_map's body counts once per shard (per distinct split of its inputs). So the
attention's share depends on its path: 3x the forward's matmuls for the formula, 4.5x
for splash; compare MFU across attention paths with that in mind.
"""

import math
from typing import Any, Callable, Optional

import jax
from jax.extend import core as jcore

from videoldm_jax.models import native_attention, native_matmul

try:  # the DCE pass lives in jax's internals; the public jaxpr API has no equivalent
  from jax._src.interpreters.partial_eval import dce_jaxpr
except ImportError:  # pragma: no cover
  dce_jaxpr = None


def dot_general_flops(lhs_shape, rhs_shape, out_shape, dimension_numbers) -> int:
  """2 x (output elements) x (contracted size)."""
  (lhs_contract, _), _ = dimension_numbers
  return 2 * math.prod(out_shape) * math.prod(lhs_shape[d] for d in lhs_contract)


def conv_flops(lhs_shape, rhs_shape, out_shape, dimension_numbers,
               lhs_dilation: Optional[tuple] = None) -> int:
  """2 x (output elements) x (kernel input features x kernel window).

  Holds for grouped convolutions (the kernel's input-feature dim is already per group)
  and for the weight-gradient convolutions of the backward pass (batch groups). A
  transposed convolution (an output larger than its input: the input gradient of a
  strided or VALID convolution, which JAX writes with lhs dilation or wide padding) is
  counted at its input's positions, as torch counts a transposed convolution, so that
  an input gradient costs what its forward does: the products with the zeros that the
  dilation inserts are not model work. With lhs dilation (`lhs_dilation`, from the
  equation) a dim counts its input's positions x the smaller of window and output:
  the kernel gradient of a transposed convolution, whose window is the large output
  gradient and whose output the kernel's taps, then costs its forward too (it was
  counted at window x taps, 4x at stride 2). (A convolution padded past "same" is
  counted at its input's positions; torch counts its output's.)"""
  rhs_spec = dimension_numbers.rhs_spec  # (out feature, in feature, *spatial)
  lhs_spec, out_spec = dimension_numbers.lhs_spec, dimension_numbers.out_spec
  rest = out_shape[out_spec[0]] * out_shape[out_spec[1]]  # batch x output features
  dims = zip(lhs_spec[2:], rhs_spec[2:], out_spec[2:], lhs_dilation or (1,) * len(out_spec))
  pairs = math.prod(  # (output position, tap) pairs per dim
      lhs_shape[i] * min(rhs_shape[k], out_shape[o]) if d > 1
      else min(out_shape[o], lhs_shape[i]) * rhs_shape[k] for i, k, o, d in dims)
  return 2 * rest * pairs * rhs_shape[rhs_spec[1]]


# cuDNN's fused attention (jax.nn.dot_product_attention(implementation="cudnn")) in a
# jaxpr: jax's forward and backward primitives (the "_wrapper" ones are what jax binds),
# their first two operands (B, T, N, H) queries and (B, S, N, H) keys, and the matmuls
# each runs in torch's convention (forward: logits, weights x values; backward: logits
# recomputed, dv, dp, dq, dk).
CUDNN_ATTENTION_MATMULS = {"dot_product_attention_fwd": 2,
                           "dot_product_attention_fwd_wrapper": 2,
                           "dot_product_attention_bwd": 5,
                           "dot_product_attention_bwd_wrapper": 5}


def attention_matmul_flops(query_shape, key_shape, matmuls: int) -> int:
  """`matmuls` matmuls of (B, T, N, H) queries against (B, S, N, H) keys: each
  2 B N T S H."""
  (b, length, heads, dim), keys = query_shape, key_shape[1]
  return 2 * b * heads * length * keys * dim * matmuls


def _sub_jaxprs(value: Any):
  if isinstance(value, jcore.ClosedJaxpr):
    yield value.jaxpr
  elif isinstance(value, jcore.Jaxpr):
    yield value
  elif isinstance(value, (tuple, list)):
    for v in value:
      yield from _sub_jaxprs(v)


def _shard_count(params: dict) -> int:
  """Distinct shards a shard_map's body runs on: the sizes of the manual mesh axes that
  split its inputs (devices along an axis no input uses repeat the same work)."""
  used = set()
  for spec in params["in_specs"]:
    for part in spec:
      used.update((part,) if isinstance(part, str) else (part or ()))
  mesh = params["mesh"]
  return math.prod(mesh.shape[a] for a in used & set(params["newly_manual_axes"]))


def jaxpr_flops(jaxpr: jcore.Jaxpr) -> int:
  """Matmul + convolution FLOPs of `jaxpr`, recursing into nested jaxprs."""
  total = 0
  for eqn in jaxpr.eqns:
    name = eqn.primitive.name
    if name == "dot_general":
      lhs, rhs = (v.aval.shape for v in eqn.invars)
      total += dot_general_flops(lhs, rhs, eqn.outvars[0].aval.shape,
                                 eqn.params["dimension_numbers"])
      continue
    if name == "conv_general_dilated":
      total += conv_flops(eqn.invars[0].aval.shape, eqn.invars[1].aval.shape,
                          eqn.outvars[0].aval.shape, eqn.params["dimension_numbers"],
                          eqn.params.get("lhs_dilation"))
      continue
    if name == "ffi_call":  # our C++ kernels (a model's only custom calls)
      target, shapes = eqn.params["target_name"], [v.aval.shape for v in eqn.invars]
      total += (native_attention.call_flops(target, shapes)
                + native_matmul.call_flops(target, shapes,
                                           [v.aval.shape for v in eqn.outvars]))
      continue
    if name in CUDNN_ATTENTION_MATMULS:
      total += attention_matmul_flops(eqn.invars[0].aval.shape, eqn.invars[1].aval.shape,
                                      CUDNN_ATTENTION_MATMULS[name])
      continue
    if name == "shard_map":  # the body sees one shard's shapes: count every shard once
      total += _shard_count(eqn.params) * jaxpr_flops(eqn.params["jaxpr"])
      continue
    if name == "pallas_call":  # a Pallas kernel (splash attention): its body per block
      total += math.prod(eqn.params["grid_mapping"].grid) * jaxpr_flops(eqn.params["jaxpr"])
      continue
    if name == "cond":  # one branch runs: count the most expensive
      total += max(jaxpr_flops(b.jaxpr) for b in eqn.params["branches"])
      continue
    times = eqn.params.get("length", 1) if name == "scan" else 1
    for value in eqn.params.values():
      for sub in _sub_jaxprs(value):
        total += times * jaxpr_flops(sub)
  return total


def model_flops(fn: Callable, *args, **kwargs) -> int:
  """Matmul + convolution FLOPs of one call of `fn(*args, **kwargs)` (arrays or
  ShapeDtypeStructs; nothing is executed), dead code removed."""
  closed = jax.make_jaxpr(fn)(*args, **kwargs)
  jaxpr = closed.jaxpr
  if dce_jaxpr is not None:
    jaxpr, _ = dce_jaxpr(jaxpr, [True] * len(jaxpr.outvars), instantiate=True)
  return jaxpr_flops(jaxpr)
