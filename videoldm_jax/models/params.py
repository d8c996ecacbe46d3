"""Parameter-tree helpers shared by all models: abstract shapes, axis names, init.

`init_params` builds parameters on the host with NumPy from the abstract tree, each
leaf seeded by (seed, its path). Nothing is compiled: jitting `Module.init` makes XLA
compile one random-number kernel per leaf, which on CPU costs ~20 s for a small video
UNet. The values depend only on the seed and the path, not on the mesh, the number of
hosts or the order in which modules were created.
"""

import collections
import zlib
from typing import Any, Callable, Optional

import flax.linen as nn
import jax
import numpy as np
from flax import traverse_util

from videoldm_jax.models.layers import InitPartitioned


# Tracing `module.init` takes ~1 s for a small video UNet, and set-up asks for the same
# tree several times (shapes, logical axes, host init; the trainer 7 times per start).
# The boxed tree is immutable, so it is kept per (module, method, input shapes).
_ABSTRACT_CACHE: collections.OrderedDict = collections.OrderedDict()
_ABSTRACT_CACHE_SIZE = 16


def _cache_key(module: nn.Module, inputs, method):
  leaves, treedef = jax.tree_util.tree_flatten(inputs)
  spec = tuple((tuple(x.shape), str(x.dtype)) if hasattr(x, "shape") and hasattr(x, "dtype")
               else x for x in leaves)
  key = (module, method, treedef, spec)
  try:
    hash(key)
  except TypeError:  # an unhashable module field or input: trace every time
    return None
  return key


def _boxed_abstract(module: nn.Module, *inputs, method=None) -> dict[str, Any]:
  key = _cache_key(module, inputs, method)
  if key is not None and key in _ABSTRACT_CACHE:
    _ABSTRACT_CACHE.move_to_end(key)
    return _ABSTRACT_CACHE[key]
  variables = jax.eval_shape(lambda: module.init(jax.random.key(0), *inputs, method=method))
  if key is not None:
    _ABSTRACT_CACHE[key] = variables["params"]
    while len(_ABSTRACT_CACHE) > _ABSTRACT_CACHE_SIZE:
      _ABSTRACT_CACHE.popitem(last=False)
  return variables["params"]


def abstract_params(module: nn.Module, *inputs, method=None) -> dict[str, Any]:
  """Unboxed tree of `jax.ShapeDtypeStruct` for `module`'s params; nothing allocated."""
  return nn.unbox(_boxed_abstract(module, *inputs, method=method))


def logical_axes(module: nn.Module, *inputs, method=None) -> dict[str, Any]:
  """Tree of `PartitionSpec`s of logical axis names, one per parameter."""
  return nn.get_partition_spec(_boxed_abstract(module, *inputs, method=method))


def leaf_seed(seed: int, path: tuple[str, ...]) -> list[int]:
  """NumPy seed sequence of one parameter: the run's seed and a hash of its path."""
  return [int(seed), zlib.crc32("/".join(path).encode())]


def init_params(module: nn.Module, seed: int, *inputs, method=None,
                where: Optional[Callable[[tuple[str, ...]], bool]] = None) -> dict[str, Any]:
  """Freshly initialised, unboxed float32 NumPy params of `module` (see module doc).

  `where(path)` restricts the result to some leaves (e.g. only the temporal layers,
  when the spatial ones come from a checkpoint).
  """
  boxed = _boxed_abstract(module, *inputs, method=method)
  flat = traverse_util.flatten_dict(boxed)  # boxes are not dicts: they are the leaves
  out = {}
  for path, box in flat.items():
    if where is not None and not where(path):
      continue
    if not isinstance(box, InitPartitioned) or box.init is None:
      raise TypeError(f"parameter {'/'.join(path)} was not created through "
                      "models.layers.param_init, so it has no host initialiser")
    rng = np.random.default_rng(leaf_seed(seed, path))
    out[path] = box.init.host(rng, box.value.shape).astype(box.value.dtype)
  return traverse_util.unflatten_dict(out)
