"""Mechanism only: logical axis names -> mesh placements. Policies live in configs.

Models name every parameter dimension with a logical axis (see `models/layers.py`);
a rule list maps those names onto mesh axes ("data", "fsdp", "tensor").
"""

from typing import Any, Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "tensor")

# Default placement: weights are split over "fsdp" along their output channels / model
# width and over "tensor" along attention heads and MLP width; spatial kernel dims and
# norms are never split. A config may replace this list.
DEFAULT_RULES: tuple[tuple[str, Any], ...] = (
    ("batch", ("data", "fsdp")),
    ("conv_kh", None), ("conv_kw", None), ("conv_in", None),
    ("conv_out", "fsdp"),
    ("embed", "fsdp"),
    ("mlp", "tensor"), ("heads", "tensor"), ("vocab", "tensor"),
    ("norm", None),
)
KNOWN_LOGICAL_AXES = frozenset(name for name, _ in DEFAULT_RULES)


def make_mesh(shape: dict[str, int], devices: Sequence[jax.Device] | None = None) -> Mesh:
  """Mesh over `devices` with axes `MESH_AXES`; one size may be -1 (fill the rest).

  Axes are Auto (GSPMD): jax.make_mesh's Explicit default would turn logical
  constraints into assertions.
  """
  devices = list(jax.devices() if devices is None else devices)
  unknown = set(shape) - set(MESH_AXES)
  if unknown:
    raise ValueError(f"mesh axes {sorted(unknown)} are unknown; use {MESH_AXES}")
  sizes = [shape.get(a, 1) for a in MESH_AXES]
  if sizes.count(-1) > 1:
    raise ValueError(f"at most one mesh axis may be -1, got {shape}")
  known = int(np.prod([s for s in sizes if s != -1]))
  if -1 in sizes:
    if len(devices) % known:
      raise ValueError(f"{len(devices)} devices do not divide into mesh {shape}")
    sizes[sizes.index(-1)] = len(devices) // known
  if int(np.prod(sizes)) != len(devices):
    raise ValueError(f"mesh {dict(zip(MESH_AXES, sizes))} needs {int(np.prod(sizes))} "
                     f"devices, have {len(devices)}")
  return Mesh(np.asarray(devices).reshape(sizes), MESH_AXES,
              axis_types=(AxisType.Auto,) * len(MESH_AXES))


def shardings_for(logical_specs: Any, mesh: Mesh, shapes: Any,
                  rules: Sequence[tuple[str, Any]] = DEFAULT_RULES) -> Any:
  """Logical PartitionSpecs (from `params.logical_axes`) -> NamedShardings.

  `shapes` is the matching tree of arrays or ShapeDtypeStructs. A dimension whose size
  the assigned mesh axes do not divide (a 3-row label table on a 2-way axis, say) is
  replicated instead of failing: such tensors are small by construction.
  """
  mesh_specs = nn.logical_to_mesh(logical_specs, list(rules))
  is_spec = lambda x: isinstance(x, PartitionSpec)

  def fit(spec: PartitionSpec, leaf) -> NamedSharding:
    dims = []
    for size, axes in zip(leaf.shape, tuple(spec) + (None,) * (len(leaf.shape) - len(spec))):
      names = (axes,) if isinstance(axes, str) else tuple(axes or ())
      ways = int(np.prod([mesh.shape[a] for a in names])) if names else 1
      dims.append(axes if size % ways == 0 else None)
    return NamedSharding(mesh, PartitionSpec(*dims))

  return jax.tree_util.tree_map(fit, mesh_specs, shapes, is_leaf=is_spec)
