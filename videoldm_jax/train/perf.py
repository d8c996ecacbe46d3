"""Throughput accounting shared by the trainer and the benchmarks."""

import logging
import sys
import time
from pathlib import Path
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np


def matmul_peak_flops(n: int | None = None, dtype=jnp.float32, repeats: int = 5,
                      calls: int | None = None) -> float:
  """FLOP/s of a large square matmul on one device: the denominator of MFU.

  n defaults to 2048 on CPU and 8192 on accelerators (a 2048^3 bf16 product takes tens
  of microseconds on a GPU, about the cost of launching it). Operands are random: an
  H200 once ran a bf16 product of zeros 13% faster than one of random data.
  Each timing is the median of `repeats` rounds of `calls` products queued back to
  back (1 on CPU, 20 on accelerators, so that dispatch does not count). Each product
  takes the previous one's result (scaled by 1/sqrt(n) to stay O(1)), so that only two
  results are alive at a time: 20 independent ones held 2.7 GB of bf16 on a GPU,
  which a benchmark's device peak memory then reported as its own."""
  accelerator = jax.local_devices()[0].platform != "cpu"
  n = n or (8192 if accelerator else 2048)
  calls = calls or (20 if accelerator else 1)
  a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32).astype(dtype)
  a = jax.device_put(a, jax.local_devices()[0])
  scale = 1.0 / float(np.sqrt(n))
  f = jax.jit(lambda x, y: (x @ y) * jnp.asarray(scale, x.dtype))
  f(a, a).block_until_ready()
  times = []
  for _ in range(repeats):
    y = a
    t0 = time.perf_counter()
    for _ in range(calls):
      y = f(a, y)
    y.block_until_ready()
    times.append((time.perf_counter() - t0) / calls)
  return 2 * n ** 3 / float(np.median(times))


def compiled_flops(compiled) -> float:
  """FLOPs per call and device from XLA's cost analysis of a compiled function; NaN where
  the backend has none (a log line's figure must not stop a run)."""
  try:
    cost = compiled.cost_analysis()
  except NotImplementedError:
    return float("nan")
  if isinstance(cost, (list, tuple)):
    cost = cost[0] if cost else None
  return float(cost.get("flops", float("nan"))) if isinstance(cost, dict) else float("nan")


def summary_writer(logdir: Path, purge_step: Optional[int] = None):
  """A TensorBoard writer on process 0, None elsewhere. purge_step (a resumed run's first
  step): TensorBoard drops the events of earlier runs from that step on, which a run
  killed after its last checkpoint had already written."""
  if jax.process_index() != 0:
    return None
  writer = _summary_writer_class()(str(logdir), purge_step=purge_step)
  # tensorboardX warns once per non-finite scalar (a dozen lines per log of a diverged
  # run); the trainer reports skipped steps itself and the values are written anyway.
  logging.getLogger("tensorboardX.x2num").setLevel(logging.ERROR)
  return writer


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


class StepTrace:
  """A jax.profiler trace of steps `start + 1 .. start + num` of a training run, written
  to `directory` (TensorBoard's profile plugin / XProf read it; every process writes
  its own). num = 0: no trace. The loop calls `before(step)` before dispatching the
  step after `step` and `after(step, outputs)` once it is dispatched; the trace stops
  when the last traced step's outputs are ready, so it holds their device work."""

  def __init__(self, directory: Path, start: int, num: int):
    if start < 0 or num < 0:
      raise ValueError(f"train.profile_start={start} and train.profile_steps={num} "
                       "must be >= 0")
    self.directory, self.start, self.end = Path(directory), start, start + num
    self.active = False

  def before(self, step: int) -> None:
    if step == self.start and self.end > self.start:
      jax.profiler.start_trace(str(self.directory))
      self.active = True

  def after(self, step: int, outputs, last: bool = False) -> None:
    """`last`: the run ends (or stops) at `step`; an active trace stops there too."""
    if self.active and (step >= self.end or last):
      jax.block_until_ready(outputs)
      jax.profiler.stop_trace()
      self.active = False
      if jax.process_index() == 0:
        print(f"profile of steps {self.start + 1}-{step}: {self.directory} (TensorBoard "
              "profile plugin or XProf)", file=sys.stderr, flush=True)
