"""The train state of every stage, split into what trains and what stays frozen."""

from typing import Any, Callable

import jax
import jax.numpy as jnp
from flax import struct, traverse_util

from videoldm_jax.models import partition

Path = tuple[str, ...]


class TrainState(struct.PyTreeNode):
  """Everything a step reads and writes; a pytree of global arrays.

  trainable / frozen: nested dicts holding disjoint leaves of the full parameter tree
    ({'unet': ..., 'vae': ..., 'text_encoder': ...}); `merged()` reassembles it.
  opt_state: optimiser state of `trainable` only.
  ema: exponential moving average of `trainable` (the weights to sample and export).
  skipped: number of steps whose loss or gradient was not finite (update skipped).
  """
  step: jax.Array
  trainable: dict
  frozen: dict
  opt_state: Any
  ema: dict
  skipped: jax.Array

  def merged(self, use_ema: bool = False) -> dict:
    """The full parameter tree, with the EMA weights in place of the trainable ones if
    `use_ema`."""
    return merge(self.ema if use_ema else self.trainable, self.frozen)


def split(params: dict, is_trainable: Callable[[Path], bool]) -> tuple[dict, dict]:
  """Full tree -> (trainable, frozen) nested dicts by the predicate on leaf paths."""
  flat = traverse_util.flatten_dict(params)
  trainable = {k: v for k, v in flat.items() if is_trainable(k)}
  if not trainable:
    raise ValueError("the stage's trainable mask selects no parameter")
  frozen = {k: v for k, v in flat.items() if not is_trainable(k)}
  return traverse_util.unflatten_dict(trainable), traverse_util.unflatten_dict(frozen)


def merge(a: dict, b: dict) -> dict:
  """Union of two nested dicts with disjoint leaves (trainable and frozen, loaded and
  freshly initialised); a path both hold is a ValueError (`partition.merge`)."""
  return partition.merge(a, b, what="the trees merged")


def tree_bytes(tree: Any) -> int:
  """Total bytes of the array leaves of a pytree (global, not per device)."""
  return sum(int(x.size) * jnp.dtype(x.dtype).itemsize for x in jax.tree_util.tree_leaves(tree))
