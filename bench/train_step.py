"""Train-step benchmark of every stage on the W1 / W2 workloads (bench/workloads.py).

One JSON line per (workload, stage, mode): median seconds per step over `--steps` timed
steps after compile and `--warmup` warm-ups, samples/s, compile seconds, parameters
(total, trainable), model FLOPs per step (2 x MACs of matmuls, convolutions and
attention, forward + backward, counted from the step's jaxpr: `train/flops.py`) and
XLA's own cost-analysis count, MFU = model FLOPs / step time / peak, where peak is a
large matmul of the compute dtype (`--dtype`) measured in this process, XLA's temporary
bytes, the peak host memory of the process so far and, on accelerators, the device's
peak bytes in use.

  JAX_PLATFORMS=cpu python -m bench.train_step --workload=W1,W2 --stage=keyframe \
      --mode=temporal,full
  JAX_PLATFORMS=cpu python -m bench.train_step --workload=W1 \
      --stage=predictor,interpolator,upsampler,decoder --mode=temporal,full
  # on a GPU (bench/gpu_run.sh): the SD 1.5-sized key-frame step in bf16
  JAX_PLATFORMS=cuda python -m bench.train_step --workload=SD15 --dtype=bfloat16
"""

import argparse
import os
import platform
import subprocess
import sys
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import Mesh, NamedSharding, PartitionSpec  # noqa: E402
from typing import Optional  # noqa: E402

from bench import workloads  # noqa: E402
from bench.common import (compiled_flops, emit, matmul_peak_flops,  # noqa: E402
                          peak_host_rss_bytes, refuse_below)
from videoldm_jax import host_memory, sharding  # noqa: E402
from videoldm_jax.models import attention  # noqa: E402
from videoldm_jax.train import flops as flops_lib  # noqa: E402
from videoldm_jax.train import step as step_lib  # noqa: E402
from videoldm_jax.train.state import split  # noqa: E402


def compile_step(case: workloads.Case, mesh: Optional[Mesh] = None,
                 rules=sharding.DEFAULT_RULES):
  """(compiled step, jitted step, state, batch, state shardings, compile seconds) of
  `case`: on one device by default, else on `mesh` with parameters (and their optimiser
  state and EMA) placed by the logical-axis `rules` and the batch split over
  ("data", "fsdp")."""
  mesh = mesh or sharding.make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, jax.devices()[:1])
  tx, state, shardings = sharded_state(case, mesh, rules)
  batch_sh = jax.tree_util.tree_map(
      lambda _: NamedSharding(mesh, PartitionSpec(("data", "fsdp"))), case.batch)
  batch = step_lib.put_global(case.batch, batch_sh)
  step = step_lib.build_train_step(case.stage, tx, seed=0, shardings=shardings,
                                   batch_sharding=batch_sh)
  t0 = time.perf_counter()
  compiled = step.lower(state, batch).compile()
  return compiled, step, state, batch, shardings, time.perf_counter() - t0


def sharded_state(case: workloads.Case, mesh: Mesh, rules=sharding.DEFAULT_RULES):
  """(optimizer, train state, state shardings) of `case` on `mesh`: parameters, their
  optimiser state and EMA placed by the logical-axis `rules`."""
  tx = workloads.optimizer(case)
  param_shardings = sharding.shardings_for(case.axes, mesh, case.params, rules)
  abstract = jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype),
                                    case.params)
  shardings = step_lib.state_shardings(param_shardings, case.stage, tx, abstract, mesh)
  return tx, step_lib.init_state(case.params, case.stage, tx, shardings), shardings


def step_runner(compiled, state, batch):
  """A callable that runs `compiled` once on the state it holds (updated in place) and
  `batch`, blocks until the new state is ready and returns the step's metrics."""
  holder = {"state": state}

  def run():
    holder["state"], metrics = compiled(holder["state"], batch)
    jax.block_until_ready(holder["state"])
    return metrics

  return run


def run(workload: str, stage: str, mode: str, *, dtype: str, remat: str, steps: int,
        warmup: int, peak: float, batch: Optional[int] = None) -> dict:
  case = workloads.build(workload, stage, mode, dtype=dtype, remat=remat, batch=batch)
  compiled, step, state, batch, _, compile_s = compile_step(case)
  model_flops = flops_lib.model_flops(step, state, batch)
  xla_flops = compiled_flops(compiled)
  mem = compiled.memory_analysis()
  for _ in range(warmup):
    state, metrics = compiled(state, batch)
  jax.block_until_ready(state)
  times = []
  for _ in range(steps):
    t0 = time.perf_counter()
    state, metrics = compiled(state, batch)
    jax.block_until_ready(state)
    times.append(time.perf_counter() - t0)
  loss = float(metrics["loss"])
  if not np.isfinite(loss):
    raise FloatingPointError(f"{workload}/{stage}/{mode}: loss is {loss}")
  t = float(np.median(times))
  trainable, _ = split(case.params, case.stage.is_trainable)
  device_stats = jax.devices()[0].memory_stats() or {}
  return dict(
      bench="train_step", workload=workload, stage=stage, mode=mode, dtype=dtype,
      attention=attention.implementation()[0],
      remat=remat, description=case.description, batch=case.samples,
      step_s=t, step_s_min=float(np.min(times)), samples_per_s=case.samples / t,
      compile_s=compile_s, params=workloads.params_count(case.params),
      trainable_params=workloads.params_count(trainable),
      model_gflop=model_flops / 1e9, xla_gflop=xla_flops / 1e9,
      peak_gflops=peak / 1e9, mfu=model_flops / t / peak, mfu_xla=xla_flops / t / peak,
      temp_bytes=int(mem.temp_size_in_bytes), argument_bytes=int(mem.argument_size_in_bytes),
      peak_host_rss_bytes=peak_host_rss_bytes(),
      device_peak_bytes=device_stats.get("peak_bytes_in_use"), loss=loss, steps=steps,
      warmup=warmup,
      device=jax.devices()[0].device_kind, cpus=os.cpu_count(), machine=platform.machine(),
      jax=jax.__version__)


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--workload", default="W1,W2")
  parser.add_argument("--stage", default="keyframe")
  parser.add_argument("--mode", default="temporal,full")
  parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
  parser.add_argument("--remat", default="none", choices=["none", "full", "dots"])
  parser.add_argument("--batch", type=int, default=None,
                      help="clips per step (default: the workload's; SD15's is the per-GPU "
                           "batch of configs/keyframe_sd15_8xh100.py, 1)")
  parser.add_argument("--steps", type=int, default=5)
  parser.add_argument("--warmup", type=int, default=2)
  parser.add_argument("--attention", default="auto",
                      help="comma-separated of models/attention.py's IMPLEMENTATIONS: auto "
                           "| plain (XLA's materialised attention everywhere) | blocked "
                           "(XLA's blocked loop, the CPU path without the C++ kernel) | native")
  parser.add_argument("--isolate", default=True, action=argparse.BooleanOptionalAction,
                      help="run each case in its own process (default), so that no case "
                           "runs beside the programs and heap of the ones before it (W2 "
                           "after four W1 cases once measured 8.65 s/step, alone 6.5 s), "
                           "with the GLIBC_TUNABLES for CPU runs (videoldm_jax/host_memory.py)")
  args = parser.parse_args()
  if args.steps < 5:
    parser.error("--steps must be >= 5 (the median of at least 5 timed steps)")
  refuse_below(parser, args, warmup=0)
  if args.batch is not None and args.batch < 1:
    parser.error("--batch must be >= 1")
  # After the checks: a refused flag costs one interpreter start, not two.
  host_memory.restart_with_tunables()  # CPU runs: the malloc settings they are timed under
  cases = [(w, s, m, i) for w in args.workload.split(",") for s in args.stage.split(",")
           for m in args.mode.split(",") for i in args.attention.split(",")]
  if args.isolate and len(cases) > 1:
    for w, s, m, i in cases:
      subprocess.run([sys.executable, "-m", "bench.train_step", f"--workload={w}",
                      f"--stage={s}", f"--mode={m}", f"--attention={i}",
                      f"--dtype={args.dtype}", f"--remat={args.remat}", f"--steps={args.steps}",
                      f"--warmup={args.warmup}"]
                     + ([f"--batch={args.batch}"] if args.batch is not None else []),
                     check=True)  # each case restarts itself with the host's tunables
    return
  peak_dtype = {"float32": np.float32, "bfloat16": jax.numpy.bfloat16}[args.dtype]
  peak = matmul_peak_flops(dtype=peak_dtype)
  for workload, stage, mode, impl in cases:
    attention.set_implementation(impl)  # read when the step is traced
    emit(run(workload, stage, mode, dtype=args.dtype, remat=args.remat,
             steps=args.steps, warmup=args.warmup, peak=peak, batch=args.batch))


if __name__ == "__main__":
  main()
