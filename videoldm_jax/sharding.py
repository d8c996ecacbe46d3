"""Mechanism only: logical axis names -> mesh placements. Policies live in configs.

Models name every parameter dimension with a logical axis (see `models/layers.py`);
a rule list maps those names onto mesh axes ("data", "fsdp", "tensor").
"""

from typing import Any, Sequence

import flax.linen as nn
import jax
import numpy as np
from absl import logging
from jax.experimental import mesh_utils
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "tensor")

# Default placement: weights are split over "fsdp" along their output channels / model
# width and over "tensor" along attention heads and MLP width; kernel window dims (time
# and space), norms and scalars (mix factors) are never split. A config may replace
# this list. (Batches are split over config.batch_axes, not by a rule.)
DEFAULT_RULES: tuple[tuple[str, Any], ...] = (
    ("conv_kt", None), ("conv_kh", None), ("conv_kw", None), ("conv_in", None),
    ("conv_out", "fsdp"),
    ("embed", "fsdp"),
    ("mlp", "tensor"), ("heads", "tensor"), ("vocab", "tensor"),
    ("norm", None), ("scalar", None),
)
KNOWN_LOGICAL_AXES = frozenset(name for name, _ in DEFAULT_RULES)
# Configs written before batches followed config.batch_axes alone carry a rule for it:
# accepted where it agrees with config.batch_axes (`check_batch_split`).
_BATCH = "batch"


def _fill(shape: dict[str, int], n: int | None, what: str) -> list[int]:
  """Axis sizes in MESH_AXES order for `n` devices; one size may be -1 (the rest).
  n=None: as many devices as the sizes ask for (no -1)."""
  field = f"config.{'dcn_mesh' if what.startswith('dcn') else 'mesh'}"
  unknown = set(shape) - set(MESH_AXES)
  if unknown:
    raise ValueError(f"{field} axes {sorted(unknown)} are unknown; use {MESH_AXES}")
  odd = {a: v for a, v in shape.items()
         if not isinstance(v, (int, np.integer)) or isinstance(v, bool)}
  if odd:  # (int() made 2.5 a 2 and "8" an 8, silently)
    raise ValueError(f"{field}: sizes must be whole numbers, got {odd}")
  sizes = [int(shape.get(a, 1)) for a in MESH_AXES]
  bad = {a: s for a, s in zip(MESH_AXES, sizes) if s < 1 and s != -1}
  if bad:
    rest = "" if n is None else " (or -1: the rest of the devices)"
    raise ValueError(f"{what} sizes must be >= 1{rest}, got {bad} ({field})")
  if sizes.count(-1) > 1:
    raise ValueError(f"at most one {what} axis may be -1, got {shape}")
  known = int(np.prod([s for s in sizes if s != -1]))
  n = known if n is None else n
  if -1 in sizes:
    if n % known:
      raise ValueError(f"{n} devices do not divide into {what} {shape} ({field})")
    sizes[sizes.index(-1)] = n // known
  if int(np.prod(sizes)) != n:
    # (Named: the config's mesh, e.g. an 8-GPU config started on a 4-GPU host.)
    raise ValueError(f"{what} {dict(zip(MESH_AXES, sizes))} needs {int(np.prod(sizes))} "
                     f"devices, have {n} ({field})")
  return sizes


def make_mesh(shape: dict[str, int], devices: Sequence[jax.Device] | None = None,
              dcn_shape: dict[str, int] | None = None) -> Mesh:
  """Mesh over `devices` with axes `MESH_AXES`; one size may be -1 (fill the rest).

  `shape` is the mesh inside a slice (ICI). With `dcn_shape` (multi-slice, e.g.
  {"data": 2} for two slices) each mesh axis is ici * dcn long and devices are laid
  out so that only the DCN part of an axis crosses slices; slices are told apart by
  `device.slice_index` (TPU multi-slice) or, where devices report none or all the same
  (CPU processes, GPU hosts), by process.
  Axes are Auto (GSPMD): jax.make_mesh's Explicit default would turn logical
  constraints into assertions.
  """
  devices = list(jax.devices() if devices is None else devices)
  dcn_shape = dict(dcn_shape or {})
  if any(v == -1 for v in dcn_shape.values()):
    raise ValueError(f"config.dcn_mesh sizes must be explicit (no -1), got {dcn_shape}")
  # Checked (names, whole sizes) before their product: {"slices": 1} passed unread and
  # int() made {"data": 1.5} one slice, silently.
  dcn = _fill(dcn_shape, None, "dcn mesh")
  slices = int(np.prod(dcn))
  if slices == 1:
    sizes = _fill(shape, len(devices), "mesh")
    # Topology-aware on TPUs (neighbouring chips share an axis); a plain reshape on
    # other platforms.
    grid = mesh_utils.create_device_mesh(sizes, devices, allow_split_physical_axes=True)
    return Mesh(grid, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))
  # Slices are the devices' slice_index (TPU multi-slice); where every device reports
  # one slice (CPU processes, GPU hosts) each process is one. (Checked before the ICI
  # shape, which a wrong slice count would otherwise be blamed on.)
  slice_ids = {getattr(d, "slice_index", None) for d in devices}
  granule_is_process = None in slice_ids or len(slice_ids) == 1
  granules = len({d.process_index for d in devices}) if granule_is_process else len(slice_ids)
  if granules != slices:
    raise ValueError(f"config.dcn_mesh {dcn_shape} needs {slices} "
                     f"{'processes' if granule_is_process else 'slices'}, the devices are "
                     f"in {granules}")
  if len(devices) % slices:
    raise ValueError(f"{len(devices)} devices do not split into {slices} slices")
  ici = _fill(shape, len(devices) // slices, "mesh")
  # As for one slice: an ICI shape may need a physical axis split (e.g. fsdp=16 on 8x8).
  grid = mesh_utils.create_hybrid_device_mesh(ici, dcn, devices,
                                              process_is_granule=granule_is_process,
                                              allow_split_physical_axes=True)
  return Mesh(grid, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))


def check_rules(rules: Sequence[tuple[str, Any]]) -> None:
  """Refuses rules (config.rules) that are not (logical axis, mesh axis | tuple of mesh
  axes | None) pairs, that name a logical axis the models do not use, or one twice, or
  a mesh axis the mesh does not have, or one twice in an entry, or that leave a
  logical axis without a placement (its weights would stay whole on every device,
  silently)."""
  for i, r in enumerate(rules):
    value = r[1] if isinstance(r, (tuple, list)) and len(r) == 2 else None
    if (not isinstance(r, (tuple, list)) or len(r) != 2 or not isinstance(r[0], str)
        or not (value is None or isinstance(value, str) or (
            isinstance(value, (tuple, list)) and all(isinstance(a, str) for a in value)))):
      raise ValueError(f"config.rules[{i}] = {r!r}: expected (logical axis, mesh axis | "
                       "tuple of mesh axes | None)")
  names = [r[0] for r in rules]
  twice = sorted({n for n in names if names.count(n) > 1})
  if twice:
    # flax takes the first: a later entry meant as an override would be ignored.
    raise ValueError(f"config.rules names logical axes {twice} more than once")
  unknown = sorted(set(names) - KNOWN_LOGICAL_AXES - {_BATCH})
  if unknown:
    raise ValueError(f"config.rules: logical axes {unknown} are not the models'; they name "
                     f"{sorted(KNOWN_LOGICAL_AXES)}")
  missing = sorted(KNOWN_LOGICAL_AXES - set(names))
  if missing:
    raise ValueError(f"config.rules gives no placement for logical axes {missing}: give "
                     "each a mesh axis, or None to keep it whole")
  bad = sorted({a for n in names for a in mesh_axes(rules, n)} - set(MESH_AXES))
  if bad:
    raise ValueError(f"config.rules: mesh axes {bad} are not the mesh's {MESH_AXES}")
  for n in names:
    axes = mesh_axes(rules, n)
    if len(set(axes)) != len(axes):  # (JAX's DuplicateSpecError, naming no config field)
      raise ValueError(f"config.rules: logical axis {n!r} is placed on {axes}, which "
                       "names a mesh axis twice")


def mesh_axes(rules: Sequence[tuple[str, Any]], logical: str) -> tuple[str, ...]:
  """The mesh axes that `rules` assign to the logical axis `logical` (() if none), e.g.
  ('tensor',) for "heads" under DEFAULT_RULES."""
  for name, axes in rules:
    if name == logical:
      return (axes,) if isinstance(axes, str) else tuple(axes or ())
  return ()


def shardings_for(logical_specs: Any, mesh: Mesh, shapes: Any,
                  rules: Sequence[tuple[str, Any]] = DEFAULT_RULES) -> Any:
  """Logical PartitionSpecs (from `params.logical_axes`) -> NamedShardings.

  `shapes` is the matching tree of arrays or ShapeDtypeStructs. A dimension whose size
  the assigned mesh axes do not divide (a 3-row label table on a 2-way axis, say) is
  replicated instead of failing; when that replicates more than 1% of the bytes (a
  mesh axis that does not divide the model's widths), a warning names the largest.
  """
  check_rules(rules)
  mesh_specs = nn.logical_to_mesh(logical_specs, list(rules))
  is_spec = lambda x: isinstance(x, PartitionSpec)
  # (extra bytes per device, path, shape, mesh axes not split) of leaves split less than
  # the rules say
  less_split = []

  def fit(path, spec: PartitionSpec, leaf) -> NamedSharding:
    dims, dropped, ways_kept, ways_all = [], [], 1, 1
    for size, axes in zip(leaf.shape, tuple(spec) + (None,) * (len(leaf.shape) - len(spec))):
      names = (axes,) if isinstance(axes, str) else tuple(axes or ())
      ways = int(np.prod([mesh.shape[a] for a in names])) if names else 1
      ways_all *= ways
      if size % ways:
        dims.append(None)
        dropped.append("x".join(names))
      else:
        dims.append(axes)
        ways_kept *= ways
    if dropped:
      nbytes = int(np.prod(leaf.shape)) * np.dtype(leaf.dtype).itemsize
      less_split.append((nbytes / ways_kept - nbytes / ways_all, jax.tree_util.keystr(path),
                         leaf.shape, dropped))
    return NamedSharding(mesh, PartitionSpec(*dims))

  out = jax.tree_util.tree_map_with_path(fit, mesh_specs, shapes, is_leaf=is_spec)
  total = sum(int(np.prod(x.shape)) * np.dtype(x.dtype).itemsize
              for x in jax.tree_util.tree_leaves(shapes))
  extra = sum(b for b, *_ in less_split)
  if total and extra > 0.01 * total:
    biggest = ", ".join(f"{p} {tuple(s)} not over {', '.join(a)}"
                        for _, p, s, a in sorted(less_split, reverse=True)[:3])
    logging.warning("sharding: %d arrays are split less than the rules say, %.1f MiB more "
                    "per device (the tree: %.1f MiB): a dimension is not divisible by its "
                    "mesh axes (%s); choose mesh sizes that divide the model's widths",
                    len(less_split), extra / 2**20, total / 2**20, biggest)
  return out


def check_batch_split(batch_size: int, grad_accum: int, mesh: Mesh,
                      batch_axes: Sequence[str], where: str = "",
                      rules: Sequence[tuple[str, Any]] = ()) -> None:
  """Refuses a global batch (and its grad_accum microbatches) that the batch axes of
  `mesh` cannot split evenly: the step would fail in XLA's partitioner with an error
  naming no config field, or compute microbatch rows redundantly on every device. A
  "batch" entry of `rules` (older configs) must agree with `batch_axes`, which alone
  split the batch; the rules must not put the attention heads on a batch axis. Given
  `rules`, a mesh axis longer than 1 that splits neither the batch nor a weight is
  refused too (its devices would all compute the same step)."""
  if rules:
    check_rules(rules)
  bad = sorted(set(batch_axes) - set(MESH_AXES))
  if bad:  # (a bare KeyError below)
    raise ValueError(f"config.batch_axes={tuple(batch_axes)}: {bad} are not the mesh's "
                     f"axes {MESH_AXES}")
  if len(set(batch_axes)) != len(batch_axes):
    raise ValueError(f"config.batch_axes={tuple(batch_axes)} names a mesh axis twice")
  if any(r[0] == _BATCH for r in rules) and mesh_axes(rules, _BATCH) != tuple(batch_axes):
    raise ValueError(f"config.rules places logical axis 'batch' on "
                     f"{mesh_axes(rules, _BATCH)}, but batches are split over "
                     f"config.batch_axes={tuple(batch_axes)}; the rule places nothing: "
                     "remove it (or make config.batch_axes the split you meant)")
  both = sorted(set(batch_axes) & set(mesh_axes(rules, "heads")))
  if both:  # (else refused by attention.partitioned at the step's trace, after the load)
    raise ValueError(f"config.batch_axes={tuple(batch_axes)} and the attention heads "
                     f"(config.rules: 'heads' on {mesh_axes(rules, 'heads')}) share mesh "
                     f"axes {both}; one mesh axis cannot split both")
  if grad_accum < 1:
    raise ValueError(f"config.train.grad_accum={grad_accum} must be >= 1 (microbatches "
                     "per step)")
  split = int(np.prod([mesh.shape[a] for a in batch_axes]))
  on = f" on {where}" if where else ""
  placed = {a for n, _ in rules if n != _BATCH for a in mesh_axes(rules, n)}
  idle = [a for a in mesh.axis_names if mesh.shape[a] > 1 and a not in batch_axes
          and a not in placed]
  if rules and idle:
    # Neither the batch nor a weight is split over them: every device along such an axis
    # ran the whole step on the same rows (data=8 with batch_axes=("fsdp",): ~6x the
    # FLOPs per device, the same losses, no word).
    raise ValueError(f"mesh {dict(mesh.shape)}{on}: mesh axes {idle} split neither the "
                     f"batch (config.batch_axes={tuple(batch_axes)}) nor any weight "
                     "(config.rules): each device along them would repeat the others' "
                     "work; add them to config.batch_axes or give them size 1 in "
                     "config.mesh")
  if batch_size % split:
    raise ValueError(f"config.data.batch_size={batch_size} does not split over the batch "
                     f"axes {tuple(batch_axes)} of mesh {dict(mesh.shape)} ({split} ways)"
                     f"{on}; use a multiple of {split}")
  if grad_accum > 1 and (batch_size % grad_accum or (batch_size // grad_accum) % split):
    raise ValueError(f"config.data.batch_size={batch_size} / train.grad_accum={grad_accum} "
                     f"must be a whole microbatch that splits over the batch axes "
                     f"{tuple(batch_axes)} of mesh {dict(mesh.shape)} ({split} ways){on}; "
                     f"use a batch size that is a multiple of {split * grad_accum}")
  shared = shared_batch_shards(mesh.devices, mesh.axis_names, batch_axes)
  if shared:
    shard, procs = next(iter(shared.items()))
    per_process = sum(1 for d in mesh.devices.flat if getattr(d, "process_index", 0) == 0)
    spanning = [a for a in mesh.axis_names if a not in batch_axes
                and _spans_processes(mesh.devices, list(mesh.axis_names).index(a))]
    raise ValueError(
        f"mesh {dict(mesh.shape)}{on}: batch shard {shard} (over {tuple(batch_axes)}) is "
        f"held by devices of processes {procs}, but each process loads rows of its own: "
        f"mesh axes {spanning} outside config.batch_axes span processes. Keep them within "
        f"one process's {per_process} devices (config.mesh), or add them to "
        "config.batch_axes")


def _spans_processes(devices: np.ndarray, axis: int) -> bool:
  """Whether some line of `devices` along `axis` holds devices of several processes."""
  lines = np.moveaxis(devices, axis, -1).reshape(-1, devices.shape[axis])
  return any(len({getattr(d, "process_index", 0) for d in line}) > 1 for line in lines)


def shared_batch_shards(devices: np.ndarray, axis_names: Sequence[str],
                        batch_axes: Sequence[str]) -> dict:
  """{batch shard (its index along batch_axes): [processes]} for the shards that devices
  of several processes hold (the input pipeline gives each process other rows)."""
  owners: dict = {}
  for idx in np.ndindex(devices.shape):
    shard = tuple(idx[list(axis_names).index(a)] for a in batch_axes)
    owners.setdefault(shard, set()).add(getattr(devices[idx], "process_index", 0))
  return {s: sorted(p) for s, p in owners.items() if len(p) > 1}

