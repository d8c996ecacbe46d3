"""Fixed-shape, data-parallel batched application of a network to host arrays.

Every metric network (I3D, Inception-v3, CLIP) runs the same way: a host array of N
inputs is cut into batches of one fixed size, the last batch is padded, each batch is
sharded over a 1-D "data" mesh of the local devices while the weights are replicated,
and the outputs come back to the host. Because every batch has the same shape, XLA
compiles the network once per input shape (frames, height, width), however many
samples are evaluated.

The jitted function is cached per (fn, mesh): runners built from the same module-level
`fn` (the extractors build theirs with `functools.lru_cache`) share compiled code.

Only this process's devices are used: on several hosts each process evaluates its own
files and the per-process `fvd.FeatureStats` are merged (`FeatureStats.merge`).
"""

import functools
import math
import sys
from typing import Any, Callable, Iterator, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

__all__ = ["BatchedApply", "progress"]


def progress(iterable, total: int | None = None, desc: str = "", enabled: bool = True):
  """`tqdm(iterable)` when tqdm is installed and `enabled`, else the iterable itself
  (with a one-line print per 10% of `total`, so long runs still show progress)."""
  if not enabled:
    return iterable
  try:
    from tqdm import tqdm
  except ImportError:
    return _print_progress(iterable, total, desc)
  return tqdm(iterable, total=total, desc=desc, leave=False)


def _print_progress(iterable, total, desc):
  step = max(1, (total or 0) // 10)
  for i, item in enumerate(iterable):
    if total and (i + 1) % step == 0:
      # stderr, as tqdm's bar: videoldm-eval's stdout is its JSON result.
      print(f"{desc}: {i + 1}/{total}", file=sys.stderr, flush=True)
    yield item


class BatchedApply:
  """`fn(variables, x_BxS...) -> y_BxF...` applied to host arrays in fixed-size batches.

  The effective batch size is `batch_size` rounded up to a multiple of the number of
  devices (each device gets an equal share). Weights are put on the devices once,
  replicated; inputs are sharded along their first axis (NamedSharding, "data" axis).
  """

  def __init__(self, fn: Callable[[Any, jax.Array], Any], variables: Any, batch_size: int,
               devices: Sequence[jax.Device] | None = None):
    """Args:
      fn: pure function of (variables, batch); its outputs all have the batch axis first.
        Pass the same function object for the same computation to reuse compilations.
      variables: pytree of arrays (e.g. {'params': ..., 'batch_stats': ...}).
      batch_size: samples per step (before rounding up to the device count), >= 1.
      devices: devices of the mesh; default `jax.local_devices()`.
    """
    if batch_size < 1:
      raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    devices = list(jax.local_devices() if devices is None else devices)
    self.mesh = Mesh(np.asarray(devices), ("data",))
    self.batch_size = math.ceil(batch_size / len(devices)) * len(devices)
    self.data_sharding = NamedSharding(self.mesh, PartitionSpec("data"))
    self.variables = jax.device_put(variables, NamedSharding(self.mesh, PartitionSpec()))
    self._fn = _jitted(fn, self.mesh)

  def _batches(self, x: np.ndarray) -> Iterator[tuple[np.ndarray, int]]:
    for start in range(0, x.shape[0], self.batch_size):
      chunk = np.asarray(x[start:start + self.batch_size])
      n = chunk.shape[0]
      if n < self.batch_size:
        # Pad by repeating the last sample (not zeros): keeps the padded rows inside
        # the input range, so they cannot produce NaNs; they are dropped afterwards.
        pad = np.repeat(chunk[-1:], self.batch_size - n, axis=0)
        chunk = np.concatenate([chunk, pad], axis=0)
      yield chunk, n

  def iterate(self, x: np.ndarray, show_progress: bool = False,
              desc: str = "") -> Iterator[Any]:
    """Yields `fn`'s outputs (host numpy, padding removed), one batch at a time.

    The next batch is dispatched before the previous result is copied to the host, so
    the device works while the host waits for the copy.
    """
    if x.shape[0] == 0:
      return
    pending = None
    total = math.ceil(x.shape[0] / self.batch_size)
    for chunk, n in progress(self._batches(x), total, desc, show_progress):
      out = self._fn(self.variables, jax.device_put(chunk, self.data_sharding))
      if pending is not None:
        yield _to_host(*pending)
      pending = (out, n)
    if pending is not None:
      yield _to_host(*pending)

  def __call__(self, x: np.ndarray, show_progress: bool = False, desc: str = "") -> Any:
    """All outputs for x (N, ...) stacked along the first axis, as host numpy arrays."""
    outs = list(self.iterate(x, show_progress, desc))
    if not outs:
      raise ValueError("no inputs (N = 0)")
    return jax.tree_util.tree_map(lambda *ys: np.concatenate(ys, axis=0), *outs)


@functools.lru_cache(maxsize=None)
def _jitted(fn: Callable, mesh: Mesh) -> Callable:
  """One jit object per (fn, mesh): jax then compiles once per input shape, and runners
  sharing `fn` share the executables."""
  replicated = NamedSharding(mesh, PartitionSpec())
  data = NamedSharding(mesh, PartitionSpec("data"))

  def full_precision_fn(variables, x):
    # Metrics must not depend on an accelerator's default matmul precision (bfloat16
    # passes on TPU, TF32 on GPUs): every matmul / conv traced here runs in float32.
    with jax.default_matmul_precision("highest"):
      return fn(variables, x)

  return jax.jit(full_precision_fn, in_shardings=(replicated, data), out_shardings=data)


def _to_host(out, n: int):
  return jax.tree_util.tree_map(lambda y: np.asarray(jax.device_get(y))[:n], out)
