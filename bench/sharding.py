"""Per-device memory of the W2 key-frame train step under FSDP on 1, 2, 4, 8 fake CPU
devices: the sharded train state (parameters, Adam moments, EMA) per device against
total / N, and XLA's `memory_analysis()` argument and temporary bytes of the compiled
step. One clip per device (global batch N), as FSDP runs.

  python -m bench.sharding                 # sets 8 fake CPU devices itself
  python -m bench.sharding --devices=1,2,4,8 --mode=temporal,full
"""

import argparse
import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                           + " --xla_force_host_platform_device_count=8")

import jax  # noqa: E402
import numpy as np  # noqa: E402

from bench import workloads  # noqa: E402
from bench.common import emit  # noqa: E402
from bench.train_step import compile_step  # noqa: E402
from videoldm_jax import sharding  # noqa: E402


def per_device_bytes(tree, shardings) -> tuple[int, int]:
  """(bytes on the fullest device, total bytes) of arrays laid out by `shardings`."""
  per_device: dict = {}
  total = 0
  for x, s in zip(jax.tree_util.tree_leaves(tree), jax.tree_util.tree_leaves(shardings)):
    itemsize = np.dtype(x.dtype).itemsize
    total += int(np.prod(x.shape)) * itemsize
    shard = int(np.prod(s.shard_shape(x.shape))) * itemsize
    for d in s.device_set:
      per_device[d] = per_device.get(d, 0) + shard
  return max(per_device.values()), total


def run(workload: str, mode: str, n: int) -> dict:
  case = workloads.build(workload, "keyframe", mode, batch=n)
  mesh = sharding.make_mesh({"data": 1, "fsdp": n, "tensor": 1}, jax.devices()[:n])
  compiled, _, state, _, shardings, compile_s = compile_step(case, mesh)
  trained = (state.trainable, state.opt_state, state.ema)
  trained_sh = (shardings.trainable, shardings.opt_state, shardings.ema)
  train_dev, train_total = per_device_bytes(trained, trained_sh)
  all_dev, all_total = per_device_bytes(state, shardings)
  mem = compiled.memory_analysis()
  return dict(bench="sharding", workload=workload, stage="keyframe", mode=mode, devices=n,
              batch=n, trained_state_bytes_per_device=train_dev,
              trained_state_bytes_total=train_total,
              trained_state_ratio_to_ideal=train_dev / (train_total / n),
              state_bytes_per_device=all_dev, state_bytes_total=all_total,
              state_ratio_to_ideal=all_dev / (all_total / n),
              xla_argument_bytes=int(mem.argument_size_in_bytes),
              xla_temp_bytes=int(mem.temp_size_in_bytes),
              xla_output_bytes=int(mem.output_size_in_bytes),
              xla_alias_bytes=int(mem.alias_size_in_bytes), compile_s=compile_s)


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--workload", default="W2")
  parser.add_argument("--mode", default="temporal,full")
  parser.add_argument("--devices", default="1,2,4,8")
  args = parser.parse_args()
  for mode in args.mode.split(","):
    for n in (int(x) for x in args.devices.split(",")):
      emit(run(args.workload, mode, n))


if __name__ == "__main__":
  main()
