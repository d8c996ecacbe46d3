"""`jax.vmap` for the C++ kernels' partitioned custom calls.

The kernels are `custom_partitioning` ops (so that XLA splits them over a mesh), and
`custom_partitioning` has no batching rule: `jax.vmap` of any CPU layer that reached a
kernel (attention, a dense layer's weight gradient, a convolution) raised
NotImplementedError. `sequential_vmap` gives an op the rule `jax.lax.map` does: one call
per mapped element, each the op itself (so nested vmaps recurse), unmapped operands
shared. vmap is rare in training (per-example gradients, ensembles), so the simple
rule is enough; the model's batch axis is the fast path.
"""

from typing import Callable

import jax


def sequential_vmap(op: Callable) -> Callable:
  """`op` (positional array operands -> an array or a tuple of arrays) with a vmap rule
  that maps it over the batch one element at a time."""
  wrapped = jax.custom_batching.custom_vmap(op)

  @wrapped.def_vmap
  def rule(axis_size, in_batched, *args):
    mapped = [a for a, b in zip(args, in_batched) if b]

    def one(xs):
      it = iter(xs)
      return wrapped(*(next(it) if b else a for a, b in zip(args, in_batched)))

    out = jax.lax.map(one, mapped)
    return out, jax.tree_util.tree_map(lambda _: True, out)

  return wrapped
