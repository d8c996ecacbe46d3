"""Throughput accounting shared by the trainer and the benchmarks."""

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
  from tensorboardX import SummaryWriter  # imported lazily: only process 0 writes
  return SummaryWriter(str(logdir))
