"""Split a video model's parameters into spatial theta (the image model) and temporal phi.

A leaf is temporal when any component of its path starts with `temporal_` (the naming
rule of `models/temporal.py`); everything else is the image model, with exactly the
image model's paths and shapes. Image checkpoints therefore go in and out of a video
model by plain tree operations.
"""

from typing import Any, Mapping

from flax import traverse_util

SPATIAL, TEMPORAL = "spatial", "temporal"
Path = tuple[str, ...]


def is_temporal(path: Path) -> bool:
  """True for a parameter of the temporal layers phi."""
  return any(str(p).startswith("temporal_") for p in path)


def labels(params: Mapping[str, Any]) -> dict:
  """Tree of 'spatial' / 'temporal' strings with the structure of `params`."""
  flat = traverse_util.flatten_dict(dict(params))
  return traverse_util.unflatten_dict(
      {k: TEMPORAL if is_temporal(k) else SPATIAL for k in flat})


def split(params: Mapping[str, Any]) -> tuple[dict, dict]:
  """params -> (spatial theta, temporal phi), each a nested dict of the original leaves."""
  flat = traverse_util.flatten_dict(dict(params))
  spatial = {k: v for k, v in flat.items() if not is_temporal(k)}
  temporal = {k: v for k, v in flat.items() if is_temporal(k)}
  return traverse_util.unflatten_dict(spatial), traverse_util.unflatten_dict(temporal)


def merge(spatial: Mapping[str, Any], temporal: Mapping[str, Any],
          what: str = "spatial and temporal trees") -> dict:
  """Inverse of `split` (and of `train.state.split`): the union of two nested dicts with
  disjoint leaves. A path both hold, as a leaf or as a leaf in one and a sub-tree in the
  other, is a ValueError naming it and `what`: one tree's weights silently replaced the
  other's."""
  flat = traverse_util.flatten_dict(dict(spatial))
  other = traverse_util.flatten_dict(dict(temporal))
  inner = lambda keys: {k[:i] for k in keys for i in range(1, len(k))}
  shared = (flat.keys() & other.keys()) | (flat.keys() & inner(other)) | (
      other.keys() & inner(flat))
  if shared:
    names = sorted("/".join(map(str, k)) for k in shared)
    raise ValueError(f"{what} share paths: {names[:5]}"
                     + (f" and {len(names) - 5} more" if len(names) > 5 else ""))
  flat.update(other)
  return traverse_util.unflatten_dict(flat)


def check_same_structure(expected: Mapping[str, Any], given: Mapping[str, Any], *,
                         what: str, source: str) -> None:
  """Raises ValueError listing every path missing, unexpected, or of another shape."""
  e = traverse_util.flatten_dict(dict(expected))
  g = traverse_util.flatten_dict(dict(given))
  problems = [f"missing: {'/'.join(k)} (expected shape {tuple(e[k].shape)})"
              for k in sorted(e.keys() - g.keys())]
  problems += [f"unexpected: {'/'.join(k)} shape {tuple(g[k].shape)}"
               for k in sorted(g.keys() - e.keys())]
  problems += [f"shape mismatch: {'/'.join(k)} is {tuple(g[k].shape)} in {source}, the "
               f"model expects {tuple(e[k].shape)}"
               for k in sorted(e.keys() & g.keys()) if tuple(e[k].shape) != tuple(g[k].shape)]
  if problems:
    shown = "\n  ".join(problems[:30])
    more = f"\n  ... and {len(problems) - 30} more" if len(problems) > 30 else ""
    raise ValueError(f"{what} from {source} does not fit the model ({len(problems)} "
                     f"problems):\n  {shown}{more}")


def with_image_params(video_params: Mapping[str, Any], image_params: Mapping[str, Any],
                      source: str) -> dict:
  """Replaces theta of `video_params` by `image_params` (an image UNet's tree) and keeps
  phi. The image tree must have exactly theta's paths and shapes."""
  spatial, temporal = split(video_params)
  check_same_structure(spatial, image_params, what="image UNet parameters", source=source)
  return merge(image_params, temporal)
