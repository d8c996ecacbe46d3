"""The train loop's per-step stop check with several processes: does the host still make
the next batch while the device runs the step?

Runs as N local JAX processes (it starts them itself through
launch/local_multiprocess.sh). Each step dispatches one jitted computation over every
process's devices (a chain of matmuls ending in a sum over all of them, as a train
step's gradient all-reduce does), runs the stop check, then spends `--input_ms` on the
host making the "next batch": a sleep, as a pipeline that waits on file reads or on
decoder threads (which release the GIL) does. As in the train loop (default
`train.max_steps_in_flight`), at most 2 steps stay queued. Two checks take turns, round
by round:

  allgather  each process's SIGTERM flag gathered by a device collective
             (`PreemptionGuard.any_process_requested`; the loop's check before
             2026-12-05). It queues behind the step just dispatched, so the host waits
             for the step before making the next batch.
  service    JAX's preemption service (`PreemptionGuard.should_stop`): a host-local read.

One JSON line per check from process 0: seconds per step (median over rounds of
round time / steps), the device computation alone and the input alone, and the median
host seconds of one check. Overlap shows as step ~ max(device, input) instead of the sum.

  python -m bench.stop_check
  python -m bench.stop_check --num_processes=2 --input_ms=40 --rounds=5
"""

import argparse
import collections
import os
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("JAX_PLATFORMS", "cpu")

ROOT = Path(__file__).parents[1]
CHECKS = ("allgather", "service")
IN_FLIGHT = 2  # configs/*_base.py: train.max_steps_in_flight


def _args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--num_processes", type=int, default=2)
  p.add_argument("--devices_per_process", type=int, default=1)
  p.add_argument("--size", type=int, default=512, help="rows per device = matmul size")
  p.add_argument("--matmuls", type=int, default=24, help="matmuls per step")
  p.add_argument("--input_ms", type=float, default=40.0)
  p.add_argument("--steps", type=int, default=20, help="steps per round and check")
  p.add_argument("--rounds", type=int, default=3)
  # Given by launch/local_multiprocess.sh to each process it starts.
  p.add_argument("--coordinator_address")
  p.add_argument("--process_id", type=int)
  p.add_argument("--cpu_devices", type=int)
  # parse_args, not parse_known_args: a misspelt flag (--inputms=5) ran the defaults.
  args = p.parse_args(argv)
  for name in ("rounds", "steps"):  # (0 printed NaN figures; bench.common imports JAX)
    if getattr(args, name) < 1:
      p.error(f"--{name} must be >= 1, got {getattr(args, name)}")
  return args


def _launch(args) -> int:
  """Starts the processes; prints process 0's JSON lines without the launcher's prefix."""
  cmd = ["bash", str(ROOT / "launch/local_multiprocess.sh"),
         f"--num_processes={args.num_processes}",
         f"--devices_per_process={args.devices_per_process}", "--",
         sys.executable, "-m", "bench.stop_check", *sys.argv[1:]]
  proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
  lines = proc.stdout.splitlines()
  for line in lines:
    if line.startswith("[p0] {"):
      print(line[len("[p0] "):], flush=True)
  if proc.returncode != 0:
    print("\n".join(lines[-40:]), proc.stderr[-4000:], file=sys.stderr)
  return proc.returncode


def _run(args) -> None:
  from videoldm_jax import distributed
  distributed.initialize(args.coordinator_address, args.num_processes, args.process_id,
                         args.cpu_devices)
  import jax
  import jax.numpy as jnp
  import numpy as np
  from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

  from bench.common import emit
  from videoldm_jax.train.checkpointing import PreemptionGuard

  mesh = Mesh(np.array(jax.devices()), ("data",))
  n = args.size
  x = jax.make_array_from_callback(
      (n * jax.device_count(), n), NamedSharding(mesh, P("data")),
      lambda idx: np.full((n, n), 0.01, np.float32))
  w = jax.device_put(np.eye(n, dtype=np.float32) * 0.5, NamedSharding(mesh, P()))

  @jax.jit
  def step(x, w):
    for _ in range(args.matmuls):
      x = jnp.tanh(x @ w)
    return jnp.sum(x)  # over every process's rows: a cross-process reduction

  def device_only():
    t0 = time.perf_counter()
    for _ in range(args.steps):
      out = step(x, w)
    out.block_until_ready()
    return (time.perf_counter() - t0) / args.steps

  step(x, w).block_until_ready()  # compile
  guard = PreemptionGuard(0)
  if not guard.uses_jax_service:
    raise SystemExit("stop_check: JAX's preemption service is off in this process")
  counter = 0
  per_step = {c: [] for c in CHECKS}
  check_s = {c: [] for c in CHECKS}
  device = []
  for _ in range(args.rounds):
    device.append(device_only())
    for check in CHECKS:
      t0 = time.perf_counter()
      queued = collections.deque()
      for _ in range(args.steps):
        out = step(x, w)
        counter += 1
        queued.append(out)  # the train loop's default bound on steps in flight
        if len(queued) > IN_FLIGHT:
          queued.popleft().block_until_ready()
        tc = time.perf_counter()
        stop = (guard.any_process_requested() if check == "allgather"
                else guard.should_stop(counter))
        check_s[check].append(time.perf_counter() - tc)
        assert not stop
        time.sleep(args.input_ms / 1e3)  # the next batch
      out.block_until_ready()
      per_step[check].append((time.perf_counter() - t0) / args.steps)
  if jax.process_index() == 0:
    for check in CHECKS:
      emit({"bench": "stop_check", "check": check, "processes": jax.process_count(),
            "devices": jax.device_count(), "step_s": float(np.median(per_step[check])),
            "device_s": float(np.median(device)), "input_s": args.input_ms / 1e3,
            "check_s": float(np.median(check_s[check])), "steps": args.steps,
            "rounds": args.rounds})


def main() -> None:
  args = _args()
  if args.process_id is None:
    sys.exit(_launch(args))
  _run(args)


if __name__ == "__main__":
  main()
