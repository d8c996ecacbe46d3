"""Throughput accounting shared by the trainer and the benchmarks."""

import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np


def matmul_peak_flops(n: int = 2048, dtype=jnp.float32, repeats: int = 5) -> float:
  """FLOP/s of a large square matmul on one device: the denominator of MFU."""
  a = jax.device_put(jnp.ones((n, n), dtype), jax.local_devices()[0])
  f = jax.jit(lambda x: x @ x)
  f(a).block_until_ready()
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    f(a).block_until_ready()
    times.append(time.perf_counter() - t0)
  return 2 * n ** 3 / float(np.median(times))


def compiled_flops(compiled) -> float:
  """FLOPs per call and device from XLA's cost analysis of a compiled function."""
  cost = compiled.cost_analysis()
  if isinstance(cost, (list, tuple)):
    cost = cost[0]
  return float(cost.get("flops", float("nan")))


def summary_writer(logdir: Path):
  """A TensorBoard writer on process 0, None elsewhere."""
  if jax.process_index() != 0:
    return None
  return _summary_writer_class()(str(logdir))


def _summary_writer_class():
  """tensorboardX's SummaryWriter, imported (lazily: only process 0 writes) without
  PyTorch. tensorboardX imports torch whenever it is installed, only to accept torch
  tensors, which we never pass; that import took 2.5 of tensorboardX's 2.8 s at every
  trainer start wherever torch is installed (the test environment, many users'
  machines). A None entry in sys.modules makes `import torch` raise ImportError, as if
  torch were absent; the entry is removed again right after."""
  if "torch" in sys.modules or "tensorboardX" in sys.modules:
    from tensorboardX import SummaryWriter
    return SummaryWriter
  sys.modules["torch"] = None
  try:
    from tensorboardX import SummaryWriter
  finally:
    if "torch" in sys.modules and sys.modules["torch"] is None:
      del sys.modules["torch"]
  return SummaryWriter
