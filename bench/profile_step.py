"""Where one stage's train step spends its time: a jax.profiler trace of a few steps,
each XLA op's time summed over the trace, joined with the optimised HLO (its opcode,
what a fusion computes, its shape and the jaxpr source line XLA recorded).

Prints JSON lines: one per op among the `--top` slowest (ms per step, share of the
traced op time), then one per category (fusions around a dot, elementwise fusions,
transposes, reductions, copies, ...), then the wall time per step and the part of it
no synchronous op covers, then the timeline: how long 0, 1, 2, ... ops were in flight
and, for each idle gap, the category of the op before it. On XLA:CPU the convolutions
and the dots that YNNPACK does not take (weight gradients x^T dy) run asynchronously on
Eigen's pool and their trace events time only the launch, so the gaps after them are
their run time. Last, one line per model part (Flax module path, forward or backward):
its ops' time plus the idle gaps after them. The numbers behind bench/README.md's
profiling notes. The trace is deleted afterwards unless --trace_dir names where to keep it.

  JAX_PLATFORMS=cpu python -m bench.profile_step --workload=W2 --stage=keyframe \
      --mode=full --top=25
  JAX_PLATFORMS=cuda python -m bench.profile_step --workload=SD15 --dtype=bfloat16
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
from bench.common import emit, refuse_below  # noqa: E402
from bench.train_step import compile_step  # noqa: E402
from videoldm_jax import host_memory  # noqa: E402
from videoldm_jax.models import attention  # noqa: E402

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


_MODULE = re.compile(r"[A-Za-z_]\w*")
# Names of control flow and transformations in an op_name path, not Flax modules.
_NOT_MODULES = {"while", "body", "cond", "scan", "map", "checkpoint", "remat", "pjit",
                "closed_call", "custom_vjp_call", "custom_jvp_call"}


def scope_of(op_name: str, depth: int = 4) -> str:
  """The model part an op belongs to, from the `op_name` XLA recorded:
  'fwd:down_blocks_0/attentions/transformer_blocks/attn1' for an op of the forward pass
  under that Flax module path ('bwd:' under a `transpose(...)`, i.e. the backward pass),
  at most `depth` modules deep. Index suffixes below the UNet level are dropped so that
  the two ResBlocks of a level count as one part; the level's index stays."""
  parts = op_name.split("/")
  direction = "bwd" if any(p.startswith("transpose(") for p in parts) else "fwd"
  modules = [p for p in parts[1:-1] if _MODULE.fullmatch(p) and p not in _NOT_MODULES]
  modules = [m if i == 0 else re.sub(r"_\d+$", "", m) for i, m in enumerate(modules)]
  return f"{direction}:{'/'.join(modules[:depth]) or '(top)'}"


def op_events(trace_dir: Path, names) -> list:
  """[(start ns, end ns, name)] of every event of the trace that runs one of `names`
  (the HLO instructions), sorted by start. On CPU those are the host planes' events
  named after the instruction; where the trace has GPU planes, only their kernels
  count, each attributed to the instruction in its `hlo_op` stat (a fusion may launch
  several kernels)."""
  traces = sorted(trace_dir.rglob("*.xplane.pb"))
  if not traces:
    raise FileNotFoundError(f"no *.xplane.pb under {trace_dir}: did the trace run?")
  data = jax.profiler.ProfileData.from_file(str(traces[-1]))
  planes = list(data.planes)
  gpu = [p for p in planes if p.name.startswith("/device:GPU")]
  events = []
  for plane in gpu or planes:
    for line in plane.lines:
      # XLA:CPU's thunk executor records each op under its HLO instruction name on the
      # worker threads' lines; python and runtime lines name no HLO instruction.
      for event in line.events:
        name = event.name if not gpu else dict(event.stats).get("hlo_op")
        if name in names:
          events.append((event.start_ns, event.start_ns + event.duration_ns, name))
  return sorted(events)


def timeline(events: list, category_of) -> tuple[dict, collections.Counter]:
  """How the traced ops cover time: ({ops in flight (0, 1, 2, ...): seconds} over the
  span of `events`, {category of the op that ended last before an idle gap of >= 0.1
  ms: seconds of such gaps}). A long gap after an op that XLA:CPU runs asynchronously
  (an Eigen convolution or dot) is that op still running: its event only timed the
  launch."""
  in_flight: collections.Counter = collections.Counter()
  edges = sorted([(s, 1) for s, _, _ in events] + [(e, -1) for _, e, _ in events])
  level, last = 0, edges[0][0] if edges else 0
  for t, delta in edges:
    in_flight[level] += (t - last) / 1e9
    level, last = level + delta, t
  gaps: collections.Counter = collections.Counter()
  covered_to, last_name = None, None
  for start, end, name in events:
    if covered_to is not None and start - covered_to >= 100_000:
      gaps[category_of(last_name)] += (start - covered_to) / 1e9
    if covered_to is None or end > covered_to:
      covered_to, last_name = end, name
  return dict(sorted(in_flight.items())), gaps


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--workload", default="W2")
  parser.add_argument("--stage", default="keyframe")
  parser.add_argument("--mode", default="temporal")
  parser.add_argument("--steps", type=int, default=3, help="traced steps")
  parser.add_argument("--top", type=int, default=25)
  parser.add_argument("--scope_depth", type=int, default=4,
                      help="Flax module levels per profile_scope line")
  parser.add_argument("--trace_dir", default="", help="keep the trace here (TensorBoard)")
  parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
  parser.add_argument("--attention", default="auto", help="models/attention.py IMPLEMENTATIONS")
  args = parser.parse_args()
  refuse_below(parser, args, steps=1)  # (0 divided by zero after the compile)
  host_memory.restart_with_tunables()  # CPU runs: the malloc settings they are timed under

  attention.set_implementation(args.attention)
  case = workloads.build(args.workload, args.stage, args.mode, dtype=args.dtype)
  compiled, _, state, batch, _, _ = compile_step(case)
  index = hlo_index(compiled.as_text())
  for _ in range(2):
    state, _ = compiled(state, batch)
  jax.block_until_ready(state)
  with tempfile.TemporaryDirectory(prefix="videoldm-profile-") as scratch:
    trace_dir = Path(args.trace_dir or scratch)  # the trace is kept only when asked
    with jax.profiler.trace(str(trace_dir)):
      t0 = time.perf_counter()
      for _ in range(args.steps):
        state, _ = compiled(state, batch)
      jax.block_until_ready(state)
      wall = time.perf_counter() - t0
    events = op_events(trace_dir, index)

  totals: collections.Counter = collections.Counter()
  for start, end, name in events:
    totals[name] += (end - start) / 1e9
  op_total = sum(totals.values())
  case_id = dict(workload=args.workload, stage=args.stage, mode=args.mode, dtype=args.dtype,
                 device=jax.devices()[0].device_kind)
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
  # XLA:CPU's Eigen convolutions and dots complete asynchronously: their events time only
  # the launch (0.05-0.25 ms each), so the step's wall time during which no op is in
  # flight is mostly theirs. Ops on the two threads overlap, so that time is the wall
  # minus the union of the op events, not minus their sum.
  in_flight, gaps = timeline(events, lambda name: index[name][2])
  covered = sum(seconds for level, seconds in in_flight.items() if level > 0)
  emit(dict(bench="profile_total", **case_id, wall_ms_per_step=1e3 * wall / args.steps,
            op_ms_per_step=1e3 * op_total / args.steps,
            unattributed_ms_per_step=1e3 * (wall - covered) / args.steps,
            trace_dir=args.trace_dir or None))
  emit(dict(bench="profile_timeline", **case_id,
            ms_per_step_with_ops_in_flight={
                str(k): 1e3 * v / args.steps for k, v in in_flight.items()},
            idle_gap_ms_per_step_after={
                k: 1e3 * v / args.steps for k, v in gaps.most_common()}))
  # The same time by model part: each part's op time plus the idle gaps that follow its
  # ops (its asynchronous convs and dots still running), so the parts add up to about
  # the wall time.
  scope = lambda name: scope_of(index[name][3], args.scope_depth)
  _, scope_gaps = timeline(events, scope)
  by_scope: collections.Counter = collections.Counter()
  for name, seconds in totals.items():
    by_scope[scope(name)] += seconds
  for part in sorted(set(by_scope) | set(scope_gaps),
                     key=lambda k: -(by_scope[k] + scope_gaps[k]))[:args.top]:
    emit(dict(bench="profile_scope", **case_id, scope=part,
              ms_per_step=1e3 * (by_scope[part] + scope_gaps[part]) / args.steps,
              op_ms_per_step=1e3 * by_scope[part] / args.steps,
              gap_ms_per_step=1e3 * scope_gaps[part] / args.steps))

if __name__ == "__main__":
  main()
