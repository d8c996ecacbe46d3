"""Shared measurement helpers for the benchmarks: matmul peak, timing, memory, JSON."""

import json
import resource
import sys
import time
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np


def matmul_peak_flops(n: int = 4096, dtype=jnp.float32, repeats: int = 5) -> float:
  """FLOP/s of a large square matmul on the default device: the MFU denominator."""
  a = jnp.ones((n, n), dtype)
  f = jax.jit(lambda x: x @ x)
  f(a).block_until_ready()
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    f(a).block_until_ready()
    times.append(time.perf_counter() - t0)
  return 2 * n ** 3 / float(np.median(times))


def time_fn(fn: Callable[[], object], warmup: int = 2, steps: int = 5) -> float:
  """Median seconds of `fn()` (which must block until its result is ready)."""
  for _ in range(warmup):
    fn()
  times = []
  for _ in range(steps):
    t0 = time.perf_counter()
    fn()
    times.append(time.perf_counter() - t0)
  return float(np.median(times))


def peak_host_rss_bytes() -> int:
  """Peak resident set size of this process so far."""
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def compiled_flops(compiled) -> float:
  """FLOPs per call from XLA's cost analysis of a compiled function (per device)."""
  cost = compiled.cost_analysis()
  if isinstance(cost, (list, tuple)):
    cost = cost[0]
  return float(cost.get("flops", float("nan")))


def emit(record: dict) -> None:
  """One JSON line on stdout."""
  print(json.dumps(record, sort_keys=True), flush=True)
  sys.stdout.flush()
