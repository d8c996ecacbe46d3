"""Map a PyTorch state dict (diffusers / transformers naming) onto a Flax param tree.

The Flax models name their modules after the diffusers / transformers modules
(`down_blocks_0/resnets_1/conv1`), so the torch key of every Flax leaf follows from its
path: indexed containers turn `name_N` into `name.N`, and the leaf kinds map as

  kernel (conv, rank 4)  <- weight (O, I, kh, kw)     transposed to (kh, kw, I, O)
  kernel (conv3d, rank 5)<- weight (O, I, t, kh, kw)  transposed to (t, kh, kw, I, O)
  kernel (dense, rank 2) <- weight (O, I)             transposed to (I, O)
  scale / embedding      <- weight                    as is
  bias                   <- bias                      as is

Every problem (a Flax leaf without a torch key, a shape that does not match, a torch
key that nothing used) is collected and raised together in one `ConversionError`, so a
user sees the whole mismatch at once with both shapes and both names.
"""

import re
from typing import Any, Callable, Iterable, Mapping

import jax
import numpy as np
from flax import traverse_util

# Module containers whose children are numbered (`down_blocks.0`, `to_out.0`, ...).
INDEXED_CONTAINERS = frozenset({
    "down_blocks", "up_blocks", "resnets", "attentions", "transformer_blocks",
    "downsamplers", "upsamplers", "to_out", "net", "layers",
})
_INDEXED = re.compile(r"^(?P<name>[A-Za-z_]+?)_(?P<idx>\d+)$")
_LEAF_NAMES = {"kernel": "weight", "scale": "weight", "embedding": "weight", "bias": "bias"}


class ConversionError(ValueError):
  """A checkpoint does not fit the model; the message lists every offending key."""


def flax_path_to_torch_key(path: tuple[str, ...]) -> str:
  """('down_blocks_0', 'resnets_1', 'conv1', 'kernel') -> 'down_blocks.0.resnets.1.conv1.weight'."""
  parts = []
  for name in path[:-1]:
    m = _INDEXED.match(name)
    if m and m.group("name") in INDEXED_CONTAINERS:
      parts += [m.group("name"), m.group("idx")]
    else:
      parts.append(name)
  if path[-1] not in _LEAF_NAMES:
    raise ConversionError(f"no torch counterpart for Flax leaf kind {path[-1]!r} at "
                          f"{'/'.join(path)}")
  parts.append(_LEAF_NAMES[path[-1]])
  return ".".join(parts)


def torch_to_flax_array(leaf_name: str, value: np.ndarray) -> np.ndarray:
  """Re-layout one torch tensor for the Flax leaf `leaf_name` (see module docstring)."""
  if leaf_name == "kernel":
    if value.ndim == 4:
      return np.transpose(value, (2, 3, 1, 0))
    if value.ndim == 5:
      return np.transpose(value, (2, 3, 4, 1, 0))
    if value.ndim == 2:
      return np.transpose(value, (1, 0))
  return value


def flax_to_torch_array(leaf_name: str, value: np.ndarray) -> np.ndarray:
  """Inverse of `torch_to_flax_array` (used to export Flax weights to torch layout)."""
  if leaf_name == "kernel":
    if value.ndim == 4:
      return np.transpose(value, (3, 2, 0, 1))
    if value.ndim == 5:
      return np.transpose(value, (4, 3, 0, 1, 2))
    if value.ndim == 2:
      return np.transpose(value, (1, 0))
  return value


def _shape(x) -> tuple[int, ...]:
  return tuple(int(d) for d in x.shape)


def load_state_dict(abstract_params: Mapping[str, Any], state_dict: Mapping[str, np.ndarray],
                    *, what: str, source: str,
                    key_fn: Callable[[tuple[str, ...]], str] = flax_path_to_torch_key,
                    ignore: Iterable[str] = (), dtype=np.float32,
                    names: Callable[[str], str] | None = None) -> dict:
  """Builds the Flax param tree of `abstract_params` from a torch-layout state dict.

  Args:
    abstract_params: nested dict of leaves with `.shape` (e.g. from `jax.eval_shape`,
      unboxed), the tree to fill.
    state_dict: flat {torch_key: numpy array}.
    what: model name for messages ("UNet", "VAE", ...).
    source: file or folder the state dict came from, for messages.
    key_fn: Flax path -> torch key.
    ignore: regexes of torch keys that are known not to be parameters (buffers).
    dtype: dtype of the returned arrays.
    names: torch key -> the key as `source` names it, for messages (a single file's
      original LDM key, renamed to the diffusers one before loading); the torch key
      itself where None.

  Returns:
    nested dict of numpy arrays with exactly the paths and shapes of `abstract_params`.

  Raises:
    ConversionError: listing every missing key, shape mismatch, non-float tensor and
      unused key.
  """
  ignore_re = [re.compile(p) for p in ignore]
  # (A single file's keys were named as diffusers names them, which its user cannot
  # find in it: "missing: down_blocks.0.resnets.0.conv1.weight".)
  def shown(k: str) -> str:
    given = k if names is None else names(k)
    return given if given.endswith(k) else f"{given} (diffusers {k})"
  flat = traverse_util.flatten_dict(dict(abstract_params))
  out, problems, used = {}, [], set()
  for path, leaf in flat.items():
    key = key_fn(path)
    if key not in state_dict:
      problems.append(f"missing: {shown(key)} (for Flax param {'/'.join(path)}, shape "
                      f"{_shape(leaf)})")
      continue
    used.add(key)
    value = torch_to_flax_array(path[-1], np.asarray(state_dict[key]))
    if _shape(value) != _shape(leaf):
      problems.append(f"shape mismatch: {shown(key)} has "
                      f"{tuple(np.asarray(state_dict[key]).shape)} (-> {_shape(value)} in "
                      f"Flax layout), Flax param {'/'.join(path)} expects {_shape(leaf)}")
      continue
    if value.dtype.kind in "iub":
      # (An integer or boolean tensor in a weight's place was cast silently: a damaged
      # or mislabelled file. bfloat16, kind "V", is a float.)
      problems.append(f"dtype: {shown(key)} is {value.dtype}, Flax param "
                      f"{'/'.join(path)} expects floating-point weights")
      continue
    out[path] = value.astype(dtype)
  unused = sorted(k for k in state_dict
                  if k not in used and not any(r.search(k) for r in ignore_re))
  problems += [f"unmapped: {shown(k)} {tuple(np.asarray(state_dict[k]).shape)} is not used "
               "by the model" for k in unused]
  if problems:
    listed = "\n  ".join(problems[:40])
    more = f"\n  ... and {len(problems) - 40} more" if len(problems) > 40 else ""
    raise ConversionError(f"{what} checkpoint {source} does not match the model "
                          f"({len(problems)} problems):\n  {listed}{more}")
  return traverse_util.unflatten_dict(out)


def export_state_dict(params: Mapping[str, Any],
                      key_fn: Callable[[tuple[str, ...]], str] = flax_path_to_torch_key
                      ) -> dict[str, np.ndarray]:
  """Flax param tree -> flat torch-layout state dict (the inverse of `load_state_dict`)."""
  flat = traverse_util.flatten_dict(dict(params))
  return {key_fn(p): flax_to_torch_array(p[-1], np.asarray(jax.device_get(v)))
          for p, v in flat.items()}
