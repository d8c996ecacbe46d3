"""Where one stage's train step spends its time: a jax.profiler trace of a few steps,
each XLA op's time summed over the trace, joined with the optimised HLO (its opcode,
what a fusion computes, its shape and the jaxpr source line XLA recorded).

Prints JSON lines: one per op among the `--top` slowest (ms per step, share of the
traced op time), then one per category (fusions around a dot, elementwise fusions,
transposes, reductions, copies, ...), then the wall time per step and the part of it
no synchronous op covers (on XLA:CPU: the convolutions, which run asynchronously on
Eigen's pool and whose trace events time only their launch). The numbers behind
bench/README.md's profiling notes.

  JAX_PLATFORMS=cpu python -m bench.profile_step --workload=W2 --stage=keyframe \
      --mode=full --top=25
"""

import argparse
import collections
import os
import re
import tempfile
import time
from pathlib import Path

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402

from bench import workloads  # noqa: E402
from bench.common import emit  # noqa: E402
from bench.train_step import compile_step  # noqa: E402

# `%name = f32[8,32,32,128]{3,2,1,0} opcode(...` in XLA's HLO text; tuple shapes too.
_INSTRUCTION = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(\(.*?\)|\S+)\s+([\w\-]+)\(")
_CALLS = re.compile(r"calls=%?([\w.\-]+)")
_SOURCE = re.compile(r'op_name="([^"]*)"')


def hlo_index(hlo_text: str) -> dict:
  """{instruction name: (opcode, shape, category, op_name)} of every instruction of the
  optimised module. A fusion's category is the heaviest opcode it contains
  (convolution > dot > reduce > the rest: elementwise)."""
  computations: dict = {}
  current = None
  rows = []
  for line in hlo_text.splitlines():
    if line and not line.startswith(" ") and "{" in line:
      current = line.split()[0] if not line.startswith("ENTRY") else line.split()[1]
      current = current.lstrip("%")
      computations[current] = set()
      continue
    m = _INSTRUCTION.match(line)
    if not m or current is None:
      continue
    name, shape, opcode = m.groups()
    computations[current].add(opcode)
    calls = _CALLS.search(line)
    source = _SOURCE.search(line)
    rows.append((name, opcode, shape, calls.group(1) if calls else None,
                 source.group(1) if source else ""))
  index = {}
  for name, opcode, shape, calls, source in rows:
    category = opcode
    if opcode == "fusion" and calls in computations:
      inner = computations[calls]
      category = next((f"fusion({k})" for k in ("convolution", "dot", "reduce",
                                                  "transpose", "copy") if k in inner),
                      "fusion(elementwise)")
    index[name] = (opcode, shape, category, source)
  return index


def op_times(trace_dir: Path) -> collections.Counter:
  """{event name: total seconds} over every event of the host planes of the trace."""
  traces = sorted(trace_dir.rglob("*.xplane.pb"))
  if not traces:
    raise FileNotFoundError(f"no *.xplane.pb under {trace_dir}: did the trace run?")
  data = jax.profiler.ProfileData.from_file(str(traces[-1]))
  totals: collections.Counter = collections.Counter()
  for plane in data.planes:
    for line in plane.lines:
      # XLA:CPU's thunk executor records each op under its HLO instruction name on the
      # worker threads' lines; python and runtime lines name no HLO instruction.
      for event in line.events:
        totals[event.name] += event.duration_ns / 1e9
  return totals


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--workload", default="W2")
  parser.add_argument("--stage", default="keyframe")
  parser.add_argument("--mode", default="temporal")
  parser.add_argument("--steps", type=int, default=3, help="traced steps")
  parser.add_argument("--top", type=int, default=25)
  parser.add_argument("--trace_dir", default="", help="keep the trace here (TensorBoard)")
  args = parser.parse_args()

  case = workloads.build(args.workload, args.stage, args.mode)
  compiled, _, state, batch, _, _ = compile_step(case)
  index = hlo_index(compiled.as_text())
  for _ in range(2):
    state, _ = compiled(state, batch)
  jax.block_until_ready(state)
  trace_dir = Path(args.trace_dir or tempfile.mkdtemp(prefix="videoldm-profile-"))
  with jax.profiler.trace(str(trace_dir)):
    t0 = time.perf_counter()
    for _ in range(args.steps):
      state, _ = compiled(state, batch)
    jax.block_until_ready(state)
    wall = time.perf_counter() - t0

  totals = {k: v for k, v in op_times(trace_dir).items() if k in index}
  op_total = sum(totals.values())
  case_id = dict(workload=args.workload, stage=args.stage, mode=args.mode)
  for name, seconds in sorted(totals.items(), key=lambda kv: -kv[1])[:args.top]:
    opcode, shape, category, source = index[name]
    emit(dict(bench="profile_op", **case_id, op=name, category=category, shape=shape,
              ms_per_step=1e3 * seconds / args.steps, share=seconds / op_total,
              source=source[-160:]))
  by_category: collections.Counter = collections.Counter()
  for name, seconds in totals.items():
    by_category[index[name][2]] += seconds
  for category, seconds in by_category.most_common():
    emit(dict(bench="profile_category", **case_id, category=category,
              ms_per_step=1e3 * seconds / args.steps, share=seconds / op_total))
  # XLA:CPU's Eigen convolutions complete asynchronously: their events time only the
  # launch (0.05-0.25 ms each), so the step's wall time not covered by synchronous ops is
  # mostly theirs. Reported as its own line rather than folded into "convolution".
  emit(dict(bench="profile_total", **case_id, wall_ms_per_step=1e3 * wall / args.steps,
            op_ms_per_step=1e3 * op_total / args.steps,
            unattributed_ms_per_step=1e3 * (wall - op_total) / args.steps,
            trace_dir=str(trace_dir)))


if __name__ == "__main__":
  main()
