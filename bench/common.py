"""Shared measurement helpers for the benchmarks: timing, memory, JSON lines."""

import argparse
import json
import os
import resource
import sys
import time
from typing import Callable

import numpy as np

from videoldm_jax.train.perf import compiled_flops, matmul_peak_flops

# The trainer's measurements (train/perf.py) are the benchmarks' too: one definition.
__all__ = ["compiled_flops", "matmul_peak_flops", "time_fn", "peak_host_rss_bytes", "emit"]


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


def emit(record: dict) -> None:
  """One JSON line on stdout, with the XLA_FLAGS the process ran under (the package
  adds its defaults at import: videoldm_jax/xla_flags.py) and its GLIBC_TUNABLES
  (videoldm_jax/host_memory.py)."""
  record = {**record, "xla_flags": os.environ.get("XLA_FLAGS", ""),
            "glibc_tunables": os.environ.get("GLIBC_TUNABLES", "")}
  print(json.dumps(record, sort_keys=True), flush=True)
  sys.stdout.flush()


def refuse_below(parser: argparse.ArgumentParser, args: argparse.Namespace,
                 **least: int) -> None:
  """parser.error naming the first --NAME below its least value, before any compile: a
  count that times nothing (0 runs printed NaN figures, 0 rounds failed after both
  sides had compiled)."""
  for name, low in least.items():
    if getattr(args, name) < low:
      parser.error(f"--{name} must be >= {low}, got {getattr(args, name)}")


def refuse_unknown(parser: argparse.ArgumentParser, flag: str, given: str, known) -> None:
  """parser.error naming the comma-separated values of --`flag` that are not in `known`,
  before any compile: an unknown workload was a bare KeyError after the matmul peak had
  been measured, and an unknown compile_fit case ran nothing and exited 0."""
  unknown = [x for x in given.split(",") if x not in known]
  if unknown:
    parser.error(f"--{flag}: unknown {', '.join(map(repr, unknown))}; known: "
                 f"{', '.join(known)}")
