"""Parameter-tree helpers shared by all models: abstract shapes, random init."""

from typing import Any

import flax.linen as nn
import jax


def abstract_params(module: nn.Module, *inputs, method=None) -> dict[str, Any]:
  """Unboxed tree of `jax.ShapeDtypeStruct` for `module`'s params; nothing allocated."""
  variables = jax.eval_shape(lambda: module.init(jax.random.key(0), *inputs, method=method))
  return nn.unbox(variables["params"])


def logical_axes(module: nn.Module, *inputs, method=None) -> dict[str, Any]:
  """Tree of `PartitionSpec`s of logical axis names, one per parameter."""
  variables = jax.eval_shape(lambda: module.init(jax.random.key(0), *inputs, method=method))
  return nn.get_partition_spec(variables)["params"]


def init_params(module: nn.Module, key: jax.Array, *inputs, method=None) -> dict[str, Any]:
  """Randomly initialised, unboxed params (jitted, so a large model compiles once)."""
  variables = jax.jit(lambda k: module.init(k, *inputs, method=method))(key)
  return nn.unbox(variables["params"])
